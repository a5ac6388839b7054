//! The command line: `herald [--config PATH] <command>`. Each command loads what it needs and
//! reports failures as one readable message; `main` only maps the result to an exit code.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chrono::Utc;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{CONFIG_ENV, DEFAULT_CONFIG_PATH, Settings};
use crate::directory::DirectoryFile;
use crate::dispatch::Dispatcher;
use crate::outbox::Audience;
use crate::preview::{self, PreviewFormat};
use crate::render::{PreferenceSigner, Renderer, TemplateSet, reload};
use crate::store::{Database, RequeueRequest, RequeueSummary, Store};
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Email notifications from an outbox table, over SMTP."
)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, global = true, env = CONFIG_ENV, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade herald's tables (also done by `run`).
    Migrate,
    /// Run the daemon until SIGINT or SIGTERM.
    Run {
        /// Process everything that is due, then exit 0 (non-zero if the transport is down).
        #[arg(long)]
        drain: bool,
    },
    /// Check the configuration and templates; exit non-zero listing every problem.
    Check,
    /// Manage the directory of companies and contacts.
    Directory {
        #[command(subcommand)]
        command: DirectoryCommand,
    },
    /// Insert an outbox row, as an ordering system would.
    Enqueue {
        /// The notification kind, e.g. vxc.approved.
        kind: String,
        /// A JSON payload file, or - for standard input.
        payload: PathBuf,
        /// A key that makes a repeated insert a no-op.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Show counts per state, the oldest pending work and the latest dead deliveries and
    /// failed outbox rows, with their reasons.
    Status,
    /// Requeue deliveries: retrying ones are made due now; with --dead, dead deliveries start
    /// afresh (attempts and age reset, same Message-ID) and failed outbox rows are checked
    /// and expanded again. A running daemon picks them up within its poll interval.
    Retry {
        /// Requeue dead deliveries and failed outbox rows instead of retrying deliveries.
        #[arg(long)]
        dead: bool,
        /// Only this outbox row's deliveries (and the row itself, if it failed).
        #[arg(long, value_name = "ID", conflicts_with = "delivery",
              value_parser = clap::value_parser!(i64).range(1..))]
        event: Option<i64>,
        /// Only this delivery.
        #[arg(long, value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
        delivery: Option<i64>,
    },
    /// Print one notification rendered as it would be sent, with its sample payload; or, with
    /// --serve, show them all on a local page that follows template edits.
    Preview {
        /// The notification kind, e.g. vxc.approval_required (not with --serve).
        #[arg(required_unless_present = "serve")]
        kind: Option<String>,
        /// Serve the preview page on this address (loopback by default).
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8025")]
        serve: Option<String>,
        /// Which copy: provider or customer (default: the kind's first audience).
        #[arg(long, value_parser = parse_audience)]
        audience: Option<Audience>,
        /// A payload file to use instead of the sample.
        #[arg(long)]
        payload: Option<PathBuf>,
        /// What to print.
        #[arg(long, value_enum, default_value = "eml")]
        format: PreviewFormat,
    },
    /// Preference links for the portal.
    Preferences {
        #[command(subcommand)]
        command: PreferencesCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum DirectoryCommand {
    /// Make the directory tables match a YAML file (upsert, and remove what it does not list).
    Import {
        file: PathBuf,
        /// Accept a file that lists no companies, which empties the directory.
        #[arg(long)]
        allow_empty: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PreferencesCommand {
    /// Check a preferences link or token and print whose it is; exit 1 if it is not genuine.
    Verify { link: String },
}

/// Parses the command line, runs the command and maps the result to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let settings = Settings::load(&cli.config)?;
    telemetry::init(settings.log_format);
    // rustls needs exactly one crypto provider; herald builds with ring only.
    drop(rustls::crypto::ring::default_provider().install_default());

    match cli.command {
        Command::Migrate => {
            open_store(&settings).await?;
            println!("database is up to date");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { drain } => run_daemon(settings, drain).await,
        Command::Check => check(&settings),
        Command::Directory {
            command: DirectoryCommand::Import { file, allow_empty },
        } => {
            let directory = DirectoryFile::load(&file)?;
            if directory.companies.is_empty() && !allow_empty {
                bail!(
                    "{} lists no companies: importing it would remove the whole directory; \
                     pass --allow-empty if that is what you want",
                    file.display()
                );
            }
            let store = open_store(&settings).await?;
            let summary = store.replace_directory(&directory).await?;
            println!(
                "imported {} companies and {} contacts from {}; removed {} companies and {} contacts not in the file",
                summary.companies,
                summary.contacts,
                file.display(),
                summary.companies_removed,
                summary.contacts_removed
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue {
            kind,
            payload,
            idempotency_key,
        } => {
            let payload = read_payload(&payload)?;
            if let Err(err) = settings.catalog.validate(&kind, &payload) {
                eprintln!("warning: this row will be marked failed when processed: {err}");
            }
            let store = open_store(&settings).await?;
            match store
                .enqueue(&kind, &payload, idempotency_key.as_deref())
                .await?
            {
                Some(id) => println!("enqueued outbox row {id} ({})", printable(&kind)),
                None => println!("not enqueued: idempotency key already used"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let store = open_existing_store(&settings).await?;
            print_status(&store).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry {
            dead,
            event,
            delivery,
        } => {
            let store = open_existing_store(&settings).await?;
            let request = RequeueRequest {
                dead,
                event,
                delivery,
            };
            let summary = store.requeue(request, Utc::now()).await?;
            print_requeued(request, summary);
            if let (Some(delivery), 0) = (delivery, summary.deliveries) {
                let state = store.delivery_state(delivery).await?;
                println!("{}", why_not_requeued(delivery, dead, state.as_deref()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Preview {
            serve: Some(addr), ..
        } => serve_preview(settings, &addr).await,
        Command::Preview {
            kind,
            audience,
            payload,
            format,
            ..
        } => {
            let kind = kind.expect("clap requires KIND without --serve");
            let renderer = load_renderer(&settings)?;
            let preview = preview::preview(
                &settings,
                &renderer,
                &kind,
                audience,
                payload.as_deref(),
                Utc::now(),
            )?;
            write_stdout(&preview.format(format))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Preferences {
            command: PreferencesCommand::Verify { link },
        } => {
            let signer =
                PreferenceSigner::new(&settings.preferences.url, &settings.preferences.secret);
            match signer.verify(&link) {
                Ok(identity) => {
                    println!(
                        "valid: contact {} <{}>",
                        identity.contact_id, identity.email
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(err) => {
                    println!("invalid: {err}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

/// Opens the database (creating a SQLite file if needed) and brings its tables up to date.
async fn open_store(settings: &Settings) -> Result<Database> {
    let store = Database::connect(&settings.database.url, true).await?;
    store.migrate().await?;
    Ok(store)
}

/// Opens a database that must already exist: a reporting command pointed at a mistyped path
/// says so instead of creating an empty database and reporting that all is quiet.
async fn open_existing_store(settings: &Settings) -> Result<Database> {
    let store = Database::connect(&settings.database.url, false).await?;
    store.migrate().await?;
    Ok(store)
}

/// A renderer with no templates yet: what a template set is validated with.
fn load_renderer_unchecked(settings: &Settings) -> Renderer {
    let signer = PreferenceSigner::new(&settings.preferences.url, &settings.preferences.secret);
    Renderer::new(TemplateSet::empty(), settings.brand.clone(), signer)
}

/// A renderer with the validated template set: the same path as `check` and every reload.
fn load_renderer(settings: &Settings) -> Result<Renderer> {
    let renderer = load_renderer_unchecked(settings);
    match reload::load_validated(settings, &renderer) {
        Ok(validated) => {
            renderer.replace_templates(validated.set);
            Ok(renderer)
        }
        Err(problems) => bail!(
            "the templates do not validate ({} problem(s)); run `herald check` to see them again:\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        ),
    }
}

/// `herald preview --serve ADDR`: the preview page, following template edits like the daemon.
/// A set that does not validate at start is shown as problems on the page, not refused.
async fn serve_preview(settings: Settings, addr: &str) -> Result<ExitCode> {
    let renderer = load_renderer_unchecked(&settings);
    let (status, status_seen) = watch::channel(reload::ReloadStatus::default());
    match reload::load_validated(&settings, &renderer) {
        Ok(validated) => {
            renderer.replace_templates(validated.set);
            status.send_modify(|s| s.good_set = true);
        }
        Err(problems) => {
            // Show what does compile, so that the notifications that are fine still render.
            renderer.replace_templates(
                TemplateSet::load_all(&settings.templates_dir, &settings.catalog).0,
            );
            status.send_modify(|s| s.problems = problems);
        }
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the preview page"))?;
    let (settings, renderer) = (Arc::new(settings), Arc::new(renderer));
    let (stop, shutdown) = watch::channel(false);
    let signals = stop_signals()?;
    tokio::spawn(async move {
        signals.await;
        stop.send_replace(true);
    });
    tokio::spawn(reload::watch_templates(
        settings.clone(),
        renderer.clone(),
        status,
        shutdown.clone(),
    ));
    let site = preview::server::PreviewSite {
        settings,
        renderer,
        status: status_seen,
    };
    preview::server::serve(listener, site, shutdown).await;
    Ok(ExitCode::SUCCESS)
}

async fn run_daemon(settings: Settings, drain: bool) -> Result<ExitCode> {
    // Signals are caught from here on, so that a stop asked for while herald is still starting
    // (loading templates, migrating) ends with a clean exit too.
    let (stop, shutdown) = watch::channel(false);
    let signals = stop_signals()?;
    tokio::spawn(async move {
        signals.await;
        info!("shutdown requested; finishing in-flight sends");
        stop.send_replace(true);
    });

    let renderer = Arc::new(load_renderer(&settings)?);
    let store = open_store(&settings).await?;
    info!(
        config = %settings.source.display(),
        database = %crate::store::redact_url(&settings.database.url),
        transport = %settings.transport.describe(),
        templates = renderer.templates().len(),
        kinds = settings.catalog.kinds().count(),
        mode = if drain { "drain" } else { "daemon" },
        "herald started"
    );
    if settings
        .preferences
        .secret
        .expose()
        .starts_with("demo-only")
    {
        warn!(
            "preferences.secret is the shipped demo value: anyone can forge preference links; set a long random secret for production"
        );
    }

    let settings = Arc::new(settings);
    if !drain {
        // Nobody shows the reload status in the daemon: the log says it all.
        let (status, _) = watch::channel(reload::ReloadStatus {
            good_set: true,
            ..Default::default()
        });
        tokio::spawn(reload::watch_templates(
            settings.clone(),
            renderer.clone(),
            status,
            shutdown.clone(),
        ));
    }
    let dispatcher = Dispatcher::new(store.clone(), settings, renderer);
    if drain {
        let summary = dispatcher.drain(shutdown).await?;
        info!(
            planned = summary.planned,
            attempted = summary.attempted,
            "drain finished"
        );
    } else {
        dispatcher.run(shutdown).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Registers for SIGTERM and SIGINT now, and returns what completes on the first of them.
fn stop_signals() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

fn read_payload(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the payload from standard input")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read payload file {}", path.display()))
    }
}

/// `herald check`: the configuration was already validated by loading it; now compile the
/// templates and, when sample payloads are configured, render each template of every
/// notification with them. Every problem is listed, each once.
fn check(settings: &Settings) -> Result<ExitCode> {
    let renderer = load_renderer_unchecked(settings);
    let (template_count, rendered, problems) = match reload::load_validated(settings, &renderer) {
        Ok(validated) => (validated.set.len(), validated.rendered, Vec::new()),
        Err(problems) => (0, 0, problems),
    };
    if !problems.is_empty() {
        bail!(
            "{} problem(s):\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    println!(
        "ok: {} ({} kinds, {template_count} templates, {rendered} notifications rendered with sample payloads)",
        settings.source.display(),
        settings.catalog.kinds().count(),
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_audience(text: &str) -> Result<Audience, String> {
    Audience::parse(text)
        .ok_or_else(|| format!("{text:?} is not an audience; use provider or customer"))
}

/// Text from the database as a terminal may show it: control characters escaped, so that a
/// producer's `kind` cannot split or forge lines of output.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if crate::outbox::schema::is_disallowed_char(c) {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn print_requeued(request: RequeueRequest, summary: RequeueSummary) {
    let scope = match (request.event, request.delivery) {
        (Some(event), _) => format!(" of outbox row {event}"),
        (_, Some(delivery)) => format!(" (delivery {delivery})"),
        (None, None) => String::new(),
    };
    match (request.dead, request.delivery) {
        (true, None) => {
            println!(
                "requeued {} dead deliveries and {} failed outbox rows{scope}",
                summary.deliveries, summary.events
            );
            if summary.deliveries + summary.events == 0 {
                println!("nothing matched; `herald status` lists what is dead");
            }
        }
        (true, Some(_)) => println!("requeued {} dead deliveries{scope}", summary.deliveries),
        (false, _) => {
            println!(
                "{} retrying deliveries{scope} are due now",
                summary.deliveries
            );
            if summary.deliveries == 0 && request.delivery.is_none() {
                println!("nothing matched; dead deliveries need --dead");
            }
        }
    }
}

/// Why `herald retry --delivery ID` found nothing to do, from the delivery's state.
fn why_not_requeued(delivery: i64, dead: bool, state: Option<&str>) -> String {
    match state {
        None => format!("there is no delivery {delivery}"),
        Some("sent") => format!(
            "delivery {delivery} was sent; herald never sends a delivery twice (insert a new \
             outbox row to notify again)"
        ),
        Some("queued") => format!("delivery {delivery} is queued already"),
        Some("dead") if !dead => format!("delivery {delivery} is dead; add --dead to requeue it"),
        Some("retrying") if dead => {
            format!("delivery {delivery} is retrying, not dead; leave out --dead to send it now")
        }
        Some(state) => format!("delivery {delivery} is {state}"),
    }
}

async fn print_status<S: Store>(store: &S) -> Result<()> {
    use std::fmt::Write as _;
    let report = store.status().await?;
    let line = |counts: &[(String, i64)]| {
        if counts.is_empty() {
            "none".to_string()
        } else {
            counts
                .iter()
                .map(|(state, n)| format!("{state} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut text = String::new();
    writeln!(text, "outbox:     {}", line(&report.outbox))?;
    writeln!(text, "deliveries: {}", line(&report.deliveries))?;
    match report.oldest_pending {
        Some(at) => {
            let age = (Utc::now() - at).num_seconds().max(0);
            writeln!(text, "oldest pending: {age}s (since {})", at.to_rfc3339())?;
        }
        None => writeln!(text, "oldest pending: none")?,
    }
    if !report.recent_failures.is_empty() {
        writeln!(
            text,
            "latest failures (dead deliveries and failed outbox rows), newest first:"
        )?;
        for (what, reason) in &report.recent_failures {
            writeln!(text, "  {}: {}", printable(what), printable(reason))?;
        }
        writeln!(
            text,
            "requeue with `herald retry --dead` (all), `--event ID` or `--delivery ID`; \
             the herald_outbox_status view has every row"
        )?;
    }
    write_stdout(text.as_bytes())
}

/// Writes to standard output. A reader that stopped reading (`herald status | head`) is not
/// an error: what it wanted, it got.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => Ok(written?),
    }
}
