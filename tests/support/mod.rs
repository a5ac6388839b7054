//! Shared test fixtures: a throwaway herald installation (config, database, mail folder) in
//! a temporary directory, on SQLite or on a fresh PostgreSQL database; a real SMTP server
//! (aiosmtpd) and a scriptable one for faults.
//!
//! PostgreSQL tests use the server named by `HERALD_TEST_POSTGRES` (an admin URL such as
//! `postgres://postgres@127.0.0.1:5432/test`; `scripts/test.sh` sets it). Each test creates
//! and drops its own database. Without the variable they are skipped with a message on
//! standard error; with it set and the server unreachable they fail.

#![allow(dead_code)]

pub mod mime;
pub mod scripted_smtp;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use herald::config::Settings;
use herald::directory::DirectoryFile;
use herald::store::{Database, Store};
use sqlx::{Connection, Executor, Row};

/// The variable naming the PostgreSQL server for tests.
pub const POSTGRES_ENV: &str = "HERALD_TEST_POSTGRES";

/// Which database a test runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    /// The admin URL of a PostgreSQL server; each test makes its own database on it.
    Postgres(String),
}

impl Backend {
    /// The PostgreSQL backend, or `None` (with a message) when no server is configured.
    pub fn postgres() -> Option<Self> {
        match std::env::var(POSTGRES_ENV) {
            Ok(url) if !url.is_empty() => Some(Self::Postgres(url)),
            _ => {
                use std::io::Write;
                // Written straight to the stream so that the test harness does not hide it.
                drop(writeln!(
                    std::io::stderr(),
                    "skipped: PostgreSQL test, {POSTGRES_ENV} is not set (scripts/test.sh sets it)"
                ));
                None
            }
        }
    }
}

/// Runs each named `async fn(Backend)` as two tests, `NAME::sqlite` and `NAME::postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread")]
            async fn sqlite() {
                super::$test($crate::support::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() {
                if let Some(backend) = $crate::support::Backend::postgres() {
                    super::$test(backend).await
                }
            }
        }
    )*};
}

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(REPO).join(relative)
}

/// Where a test's messages go.
#[derive(Debug, Clone, Copy)]
pub enum Sink {
    /// The file transport, into `<tmp>/mail`.
    Files,
    /// SMTP without TLS to 127.0.0.1 on this port.
    Smtp(u16),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    pub sink: Sink,
    pub max_attempts: u32,
    pub initial_backoff: &'static str,
    pub max_backoff: &'static str,
    pub max_age: &'static str,
    pub per_second: u32,
    /// YAML lines added under `rate_limit:` (indented by two spaces), e.g. `per_domain`.
    pub rate_limit_extra: &'static str,
    pub shutdown_grace: &'static str,
    pub smtp_timeout: &'static str,
    /// SMTP sessions per daemon.
    pub smtp_connections: u32,
    /// Deliveries per claim (`delivery.batch_size`).
    pub batch_size: u32,
    /// The templates folder; the repository's own when `None`.
    pub templates: Option<PathBuf>,
}

impl Options {
    /// On SQLite.
    pub fn new(sink: Sink) -> Self {
        Self::on(Backend::Sqlite, sink)
    }

    pub fn on(backend: Backend, sink: Sink) -> Self {
        Self {
            backend,
            sink,
            max_attempts: 3,
            initial_backoff: "100ms",
            max_backoff: "1s",
            max_age: "1d",
            per_second: 1000,
            rate_limit_extra: "",
            shutdown_grace: "5s",
            smtp_timeout: "5s",
            smtp_connections: 4,
            batch_size: 50,
            templates: None,
        }
    }
}

/// A herald installation in a temporary folder, using the repository's templates and
/// catalogue, with the sample directory imported.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// For PostgreSQL: the admin URL and this test's database, dropped with the environment.
    postgres: Option<(String, String)>,
}

impl TestEnv {
    pub async fn new(options: Options) -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let config = dir.path().join("herald.yaml");
        let (database_url, postgres) = match &options.backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.path().join("herald.db").display()),
                None,
            ),
            Backend::Postgres(admin) => {
                let name = format!("herald_test_{:016x}", fastrand::u64(..));
                let mut connection =
                    sqlx::PgConnection::connect(admin)
                        .await
                        .unwrap_or_else(|err| {
                            panic!("{POSTGRES_ENV}={admin} is set but unusable: {err}")
                        });
                connection
                    .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .await
                    .unwrap();
                (with_database(admin, &name), Some((admin.clone(), name)))
            }
        };
        std::fs::write(&config, config_yaml(dir.path(), &database_url, &options)).unwrap();
        let env = Self {
            dir,
            config,
            postgres,
        };
        let directory = DirectoryFile::load(&repo_path("examples/directory.yaml")).unwrap();
        env.store()
            .await
            .replace_directory(&directory)
            .await
            .unwrap();
        env
    }

    pub fn settings(&self) -> Settings {
        Settings::load(&self.config).expect("test configuration is valid")
    }

    pub async fn store(&self) -> Database {
        let store = Database::connect(&self.settings().database.url, true)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    }

    pub fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    /// Runs the herald binary with this installation's configuration. A run that outlasts
    /// [`HERALD_RUN_LIMIT`] is killed and fails the test with what it printed, so that a hang
    /// shows its log instead of stalling the suite.
    pub fn herald(&self, args: &[&str]) -> Output {
        let mut child = self
            .herald_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("herald runs");
        let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let read_out = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut stdout, &mut bytes).map(|_| bytes)
        });
        let read_err = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut stderr, &mut bytes).map(|_| bytes)
        });
        let deadline = Instant::now() + HERALD_RUN_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                drop(child.kill());
                drop(child.wait());
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = read_out.join().unwrap().unwrap();
        let stderr = read_err.join().unwrap().unwrap();
        let Some(status) = status else {
            panic!(
                "herald {args:?} still running after {HERALD_RUN_LIMIT:?}; killed. Its log:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        };
        Output {
            status,
            stdout,
            stderr,
        }
    }

    pub fn herald_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "info");
        command
    }

    /// Starts `herald run` with its log in the test's folder, killed if the test ends first.
    pub fn spawn_daemon(&self, log: &str) -> tokio::process::Child {
        let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
        tokio::process::Command::from(self.herald_command(&["run"]))
            .kill_on_drop(true)
            .stderr(std::process::Stdio::from(log))
            .spawn()
            .unwrap()
    }

    /// Enqueues one of the shipped sample payloads.
    pub async fn enqueue_sample(&self, kind: &str) -> i64 {
        let payload =
            std::fs::read_to_string(repo_path(&format!("examples/payloads/{kind}.json"))).unwrap();
        self.store()
            .await
            .enqueue(kind, &payload, None)
            .await
            .unwrap()
            .unwrap()
    }
}

pub const SAMPLE_KINDS: [&str; 4] = [
    "vxc.approval_required",
    "vxc.approved",
    "vxc.service_up",
    "vxc.speed_change_requested",
];

impl TestEnv {
    /// Runs a statement on this environment's database.
    pub async fn execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        Ok(match self.store().await {
            Database::Sqlite(store) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(store.pool())
                .await?
                .rows_affected(),
            Database::Postgres(store) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(store.pool())
                .await?
                .rows_affected(),
        })
    }

    /// Runs a query and returns every column as text (`NULL` as `None`): select with
    /// `CAST(x AS TEXT)` where a column is not text, so one test reads both backends alike.
    pub async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        fn texts<R: Row>(row: &R) -> Vec<Option<String>>
        where
            for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            (0..row.len()).map(|i| row.try_get(i).unwrap()).collect()
        }
        match self.store().await {
            Database::Sqlite(store) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                .fetch_all(store.pool())
                .await
                .unwrap()
                .iter()
                .map(texts)
                .collect(),
            Database::Postgres(store) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                .fetch_all(store.pool())
                .await
                .unwrap()
                .iter()
                .map(texts)
                .collect(),
        }
    }

    /// (recipient, state, attempts, last error, SMTP reply) per delivery, in id order.
    pub async fn deliveries(&self) -> Vec<(String, String, i64, Option<String>, Option<String>)> {
        self.rows(
            "SELECT recipient_email, state, CAST(attempts AS TEXT), last_error, smtp_reply \
             FROM herald_deliveries ORDER BY id",
        )
        .await
        .into_iter()
        .map(|r| {
            let text = |i: usize| r[i].clone().unwrap_or_default();
            (
                text(0),
                text(1),
                text(2).parse().unwrap(),
                r[3].clone(),
                r[4].clone(),
            )
        })
        .collect()
    }

    /// Runs `herald run --drain`: whether it succeeded, and its log.
    pub async fn drain(&self) -> (bool, String) {
        let mut command = tokio::process::Command::from(self.herald_command(&["run", "--drain"]));
        command.kill_on_drop(true);
        let output = tokio::time::timeout(HERALD_RUN_LIMIT, command.output())
            .await
            .unwrap_or_else(|_| {
                panic!("herald run --drain still running after {HERALD_RUN_LIMIT:?}; killed")
            })
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// The first column of the first row, as text.
    pub async fn value(&self, sql: &str) -> Option<String> {
        self.rows(sql)
            .await
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten())
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs inside the test's runtime: use a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut connection = sqlx::PgConnection::connect(&admin).await?;
                connection
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop a test database: {dropped:?}");
        }
    }
}

/// The admin URL with its database name replaced.
fn with_database(admin: &str, name: &str) -> String {
    let (base, query) = admin
        .split_once('?')
        .map_or((admin, None), |(b, q)| (b, Some(q)));
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

fn config_yaml(dir: &Path, database_url: &str, options: &Options) -> String {
    let transport = match options.sink {
        Sink::Files => format!(
            "kind: file\n  file:\n    dir: {}",
            dir.join("mail").display()
        ),
        Sink::Smtp(port) => format!(
            "kind: smtp\n  smtp:\n    host: 127.0.0.1\n    port: {port}\n    tls: none\n    timeout: {}\n    connections: {}",
            options.smtp_timeout, options.smtp_connections
        ),
    };
    let shipped = std::fs::read_to_string(repo_path("config/herald.yaml")).unwrap();
    let catalogue = &shipped[shipped
        .find("\nrecipients:")
        .expect("shipped config has recipients")..];
    format!(
        "database:\n  url: {database_url}\n  poll_interval: 200ms\n\
         transport:\n  {transport}\n\
         rate_limit:\n  per_second: {per_second}\n  burst: {per_second}\n{rate_limit_extra}\
         retry:\n  max_attempts: {max_attempts}\n  initial_backoff: {backoff}\n  max_backoff: {max_backoff}\n\
         \x20 max_age: {max_age}\n\
         delivery:\n  batch_size: {batch_size}\n  lease: 1m\n  shutdown_grace: {shutdown_grace}\n\
         templates:\n  dir: {templates}\n  samples: {samples}\n\
         brand:\n  name: Interlink Exchange\n  tagline: Connectivity on demand\n\
         \x20 website_url: https://www.interlink.example\n  portal_url: https://portal.interlink.example\n\
         \x20 knowledge_base_url: https://docs.interlink.example\n  support_email: support@interlink.example\n\
         \x20 mailing_address: Level 5, 100 Harbour Street, Sydney NSW 2000, Australia\n\
         \x20 sender:\n    name: Interlink Exchange\n    email: notifications@interlink.example\n\
         preferences:\n  url: https://portal.interlink.example/notifications/preferences\n\
         \x20 secret: test-secret-0123456789abcdef\n{catalogue}",
        per_second = options.per_second,
        max_attempts = options.max_attempts,
        backoff = options.initial_backoff,
        max_backoff = options.max_backoff,
        max_age = options.max_age,
        rate_limit_extra = options.rate_limit_extra,
        shutdown_grace = options.shutdown_grace,
        batch_size = options.batch_size,
        templates = options
            .templates
            .clone()
            .unwrap_or_else(|| repo_path("templates"))
            .display(),
        samples = repo_path("examples/payloads").display(),
    )
}

/// Copies a folder recursively.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A copy of the repository's `config/`, `templates/` and `examples/`, for tests that edit
/// them or run the shipped configuration without touching the working tree's `var/`.
pub fn repo_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for folder in ["config", "templates", "examples"] {
        copy_tree(&repo_path(folder), &dir.path().join(folder));
    }
    dir
}

/// Sends SIGTERM to a process, as a service manager would.
pub fn terminate(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid}");
}

/// A port on loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Postfix's smtp-sink, a real SMTP server that offers PIPELINING (aiosmtpd does not), dumping
/// each message it accepts into a folder. The README's test command installs it.
pub struct PostfixSink {
    pub port: u16,
    pub folder: tempfile::TempDir,
    child: Child,
}

impl PostfixSink {
    pub fn start() -> Self {
        let port = free_port();
        let folder = tempfile::tempdir().unwrap();
        let mut command = Command::new("smtp-sink");
        // smtp-sink refuses to run as root; it writes its dumps as the user it runs as.
        if running_as_root() {
            std::fs::set_permissions(
                folder.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o777),
            )
            .unwrap();
            command.args(["-u", "nobody"]);
        }
        let child = command
            .arg("-d")
            .arg(folder.path().join("message."))
            .args([&format!("127.0.0.1:{port}"), "64"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("smtp-sink (Debian package postfix) is installed: run the tests with scripts/test.sh");
        wait_for_port(port, Duration::from_secs(10));
        Self {
            port,
            folder,
            child,
        }
    }

    /// The messages received so far: (envelope recipient, message bytes). smtp-sink writes
    /// each with its envelope as `X-*-Args` headers first and LF line ends; those headers are
    /// taken off.
    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        std::fs::read_dir(self.folder.path())
            .unwrap()
            .map(|entry| {
                let dump = std::fs::read_to_string(entry.unwrap().path()).unwrap();
                let rcpt = dump
                    .lines()
                    .find_map(|line| line.strip_prefix("X-Rcpt-Args: <"))
                    .and_then(|rest| rest.split('>').next())
                    .expect("smtp-sink dumps the recipient")
                    .to_string();
                let message: String = dump
                    .lines()
                    .skip_while(|line| !line.starts_with("Received: "))
                    .skip(1)
                    .skip_while(|line| line.starts_with('\t'))
                    .flat_map(|line| [line, "\r\n"])
                    .collect();
                (rcpt, message.into_bytes())
            })
            .collect()
    }
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
    })
}

/// The longest one blocking `herald` command of a test may take: far beyond any test's
/// needs, short of CI's patience.
pub const HERALD_RUN_LIMIT: Duration = Duration::from_secs(180);

/// Python's aiosmtpd, a complete SMTP server, recording each message it accepts into a folder
/// (see `smtp_recorder.py`). The README's test command installs it.
pub struct Aiosmtpd {
    pub port: u16,
    pub folder: tempfile::TempDir,
    child: Child,
}

impl Aiosmtpd {
    pub fn start() -> Self {
        let port = free_port();
        let folder = tempfile::tempdir().unwrap();
        // scripts/test.sh installs aiosmtpd into target/test-python and names it here; a plain
        // `cargo test` finds that environment once the script has run.
        let venv = repo_path("target/test-python/bin/python");
        let python = std::env::var("HERALD_TEST_PYTHON").unwrap_or_else(|_| {
            if venv.exists() {
                venv.display().to_string()
            } else {
                "python3".into()
            }
        });
        let child = Command::new(&python)
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "smtp_recorder.Recorder"])
            .arg(folder.path())
            .env("PYTHONPATH", repo_path("tests/support"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 is installed");
        let mut server = Self {
            port,
            folder,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "aiosmtpd ({python}) exited with {status}: run the tests with scripts/test.sh, \
                     which installs it"
                );
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The messages received so far: (envelope JSON, raw bytes), in arrival order.
    pub fn received(&self) -> Vec<(serde_json::Value, Vec<u8>)> {
        let mut names: Vec<_> = std::fs::read_dir(self.folder.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".eml"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|name| {
                let stem = name.trim_end_matches(".eml");
                let meta = std::fs::read_to_string(self.folder.path().join(format!("{stem}.json")))
                    .unwrap();
                let bytes = std::fs::read(self.folder.path().join(name)).unwrap();
                (serde_json::from_str(&meta).unwrap(), bytes)
            })
            .collect()
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}
