//! Configuration in two phases: [`raw`] mirrors the YAML file and rejects unknown keys, then
//! [`Settings::load`] expands `${VAR}` references, resolves paths against the file's folder,
//! parses durations and checks every value, reporting all problems at once with their paths.

mod duration;
pub mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use duration::parse_duration;
pub use raw::{LogFormat, TlsMode};

use crate::outbox::schema::{Catalog, CatalogError};

/// The environment variable that names the configuration file when `--config` is not given.
pub const CONFIG_ENV: &str = "HERALD_CONFIG";
/// Where the configuration is looked for when neither `--config` nor `$HERALD_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "config/herald.yaml";

/// A configuration that could not be loaded. Every problem found is listed, not only the first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration file {path} has {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// A secret from the configuration. It prints as `***` so that it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The validated configuration the rest of the daemon runs on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file these settings came from, for log lines and error messages.
    pub source: PathBuf,
    pub database: DatabaseSettings,
    pub log_format: LogFormat,
    pub transport: TransportSettings,
    pub rate_limit: RateLimitSettings,
    pub retry: RetrySettings,
    pub delivery: DeliverySettings,
    pub templates_dir: PathBuf,
    /// Sample payloads (`<kind>.json`) that `herald check` renders each notification with.
    pub samples_dir: Option<PathBuf>,
    pub brand: Brand,
    pub preferences: PreferenceSettings,
    pub recipients: RecipientRules,
    pub catalog: Catalog,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// The database URL with any relative SQLite path made absolute.
    pub url: String,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub enum TransportSettings {
    /// Write each message as an `.eml` file into a folder (for trying herald out and for tests).
    File {
        dir: PathBuf,
    },
    Smtp(SmtpSettings),
}

impl TransportSettings {
    /// The longest one send can take. A delivery whose lease ends sooner is not started.
    pub fn send_budget(&self) -> Duration {
        match self {
            // MAIL, RCPT, DATA and the message body are each bounded by the timeout.
            Self::Smtp(smtp) => smtp.timeout * 4,
            Self::File { .. } => Duration::from_secs(5),
        }
    }

    /// How many messages one daemon hands over at once.
    pub fn connections(&self) -> usize {
        match self {
            Self::Smtp(smtp) => smtp.connections as usize,
            Self::File { .. } => 1,
        }
    }

    /// A short description for the start-up log line; never includes credentials.
    pub fn describe(&self) -> String {
        match self {
            Self::File { dir } => format!("file:{}", dir.display()),
            Self::Smtp(smtp) => format!("smtp://{}:{} (tls {:?})", smtp.host, smtp.port, smtp.tls),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub credentials: Option<(String, Secret)>,
    /// Bound on each SMTP step (connect, each command, the message data).
    pub timeout: Duration,
    pub helo_name: String,
    /// SMTP sessions per daemon, each carrying one message at a time. A session sends its
    /// next message while its last outcome is committed, so a crash can resend up to two
    /// messages per session.
    pub connections: u32,
}

/// A sustained rate and the burst allowed after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    /// Everything the daemons on one database send, together.
    pub global: Rate,
    /// Each recipient domain not in `domains`; `None` for no limit beyond the global one.
    pub per_domain: Option<Rate>,
    /// Particular recipient domains, keyed in lower-case ASCII (A-labels for IDNs).
    pub domains: BTreeMap<String, Rate>,
}

#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    /// `None`: no limit on the count; `max_age` ends the retries.
    pub max_attempts: Option<NonZeroU32>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long after being queued a delivery may still be sent; after that it is dead.
    pub max_age: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct DeliverySettings {
    pub batch_size: NonZeroU32,
    pub lease: Duration,
    /// At shutdown, how long a send under way may still take before it is abandoned (and the
    /// delivery given back, to be sent again with the same Message-ID).
    pub shutdown_grace: Duration,
}

/// Brand facts that every email shows; templates read them as `brand.*`.
#[derive(Debug, Clone, Serialize)]
pub struct Brand {
    pub name: String,
    pub tagline: String,
    pub website_url: String,
    pub portal_url: String,
    pub knowledge_base_url: String,
    pub support_email: String,
    pub mailing_address: String,
    pub sender_name: String,
    pub sender_email: String,
}

#[derive(Debug, Clone)]
pub struct PreferenceSettings {
    pub url: String,
    pub secret: Secret,
}

/// Who may receive notifications: the roles allowed to subscribe, and each kind's group.
#[derive(Debug, Clone)]
pub struct RecipientRules {
    pub eligible_roles: BTreeSet<String>,
    pub groups: BTreeMap<String, String>,
}

impl RecipientRules {
    /// The rules the domain specifies, for tests and for configurations that leave them out.
    pub fn domain_defaults() -> Self {
        Self {
            eligible_roles: raw::defaults::eligible_roles().into_iter().collect(),
            groups: raw::defaults::groups(),
        }
    }
}

/// The notification groups a contact may subscribe to.
pub const GROUPS: [&str; 6] = [
    "security",
    "ordering",
    "financial",
    "people",
    "company",
    "services",
];

impl Settings {
    /// Reads, expands and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: raw::RawConfig =
            serde_saphyr::from_str(&text).map_err(|err| ConfigError::Parse {
                path: path.to_path_buf(),
                message: without_source_lines(&err.to_string()),
            })?;
        let base = path.parent().map(normalize).unwrap_or_default();
        Self::from_raw(raw, path, &base, &|name| std::env::var(name).ok())
    }

    /// Validates a parsed file. `env` looks up `${VAR}` references; relative paths are taken
    /// from `base`, the configuration file's folder, so the daemon does not depend on its
    /// working directory.
    pub fn from_raw(
        raw: raw::RawConfig,
        path: &Path,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut check = Checker {
            problems: Vec::new(),
            env,
        };

        let database = DatabaseSettings {
            url: resolve_database_url(&check.expand("database.url", &raw.database.url), base),
            poll_interval: check.duration(
                "database.poll_interval",
                &raw.database.poll_interval,
                MS_10,
                HOUR,
            ),
        };
        if let Some(problem) = sqlite_url_problem(&database.url) {
            check.problem(format!("database.url: {problem}"));
        } else if !crate::store::is_supported_url(&database.url) {
            check.problem(format!(
                "database.url: {:?} is not supported; use sqlite://PATH or postgres://USER@HOST/DB",
                raw.database.url
            ));
        }

        let transport = check.transport(&raw.transport, base);
        let rate_limit = check.rate_limit(raw.rate_limit);
        let retry = RetrySettings {
            max_attempts: raw
                .retry
                .max_attempts
                .map(|attempts| check.non_zero("retry.max_attempts", attempts)),
            initial_backoff: check.duration(
                "retry.initial_backoff",
                &raw.retry.initial_backoff,
                MS_10,
                DAY,
            ),
            max_backoff: check.duration(
                "retry.max_backoff",
                &raw.retry.max_backoff,
                MS_10,
                DAY * 7,
            ),
            max_age: check.duration("retry.max_age", &raw.retry.max_age, SECOND, DAY * 30),
        };
        if retry.max_backoff < retry.initial_backoff {
            check.problem("retry.max_backoff: must not be shorter than retry.initial_backoff");
        }
        let delivery = DeliverySettings {
            batch_size: check.non_zero("delivery.batch_size", raw.delivery.batch_size),
            lease: check.duration("delivery.lease", &raw.delivery.lease, SECOND, DAY),
            shutdown_grace: check.duration(
                "delivery.shutdown_grace",
                &raw.delivery.shutdown_grace,
                Duration::ZERO,
                HOUR,
            ),
        };
        let templates_dir =
            normalize(&base.join(check.expand("templates.dir", &raw.templates.dir)));
        let samples_dir = raw
            .templates
            .samples
            .as_ref()
            .map(|dir| normalize(&base.join(check.expand("templates.samples", dir))));
        let brand = check.brand(&raw.brand);
        let problems_before_secret = check.problems.len();
        let preferences = PreferenceSettings {
            url: check.url("preferences.url", &raw.preferences.url),
            secret: Secret(check.expand("preferences.secret", &raw.preferences.secret)),
        };
        if check.problems.len() == problems_before_secret && preferences.secret.expose().len() < 16
        {
            check.problem(
                "preferences.secret: must be at least 16 characters (use a long random value)",
            );
        }
        let recipients = check.recipients(raw.recipients);
        let catalog = match Catalog::from_config(&raw.notifications) {
            Ok(catalog) => catalog,
            Err(CatalogError(problems)) => {
                check.problems.extend(problems);
                Catalog::default()
            }
        };
        for kind in catalog.kinds() {
            if !recipients.groups.contains_key(kind) {
                check.problem(format!(
                    "recipients.groups: no group for notification kind {kind:?}; add `{kind}: GROUP`"
                ));
            }
        }
        if delivery.lease <= transport.send_budget() {
            check.problem(format!(
                "delivery.lease: must be longer than the longest send ({:?} with this transport), \
                 so that a send never outlives its claim",
                transport.send_budget()
            ));
        }

        if !check.problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems: check.problems,
            });
        }
        Ok(Self {
            source: path.to_path_buf(),
            database,
            log_format: raw.log.format,
            transport,
            rate_limit,
            retry,
            delivery,
            templates_dir,
            samples_dir,
            brand,
            preferences,
            recipients,
            catalog,
        })
    }
}

/// The parser's message without the excerpt of the file it appends: the excerpt shows the
/// lines around the problem, and those may hold a password or secret written in the file.
/// Line and column stay in the message.
fn without_source_lines(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Whether a relay host is this machine, where a plaintext login crosses no network.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Removes `.` and `..` components without touching the file system, so that paths in logs
/// read `var/mail`, not `config/../var/mail`.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// What is wrong with a SQLite URL, if anything: herald needs a file, since an in-memory
/// database would lose every notification when the daemon stops.
fn sqlite_url_problem(url: &str) -> Option<&'static str> {
    if !url.starts_with("sqlite:") {
        return None;
    }
    let Some(rest) = url.strip_prefix("sqlite://") else {
        return Some("write a SQLite database as sqlite://PATH");
    };
    let file = rest.split('?').next().unwrap_or_default();
    let in_memory = file.is_empty() || file == ":memory:" || rest.contains("mode=memory");
    in_memory.then_some("needs a file path: an in-memory database would lose every notification")
}

/// Makes a relative `sqlite://` path absolute against the configuration file's folder.
fn resolve_database_url(url: &str, base: &Path) -> String {
    let Some(rest) = url.strip_prefix("sqlite://") else {
        return url.to_string();
    };
    let (file, query) = rest
        .split_once('?')
        .map_or((rest, None), |(f, q)| (f, Some(q)));
    if file.is_empty() || file.starts_with('/') || file == ":memory:" {
        return url.to_string();
    }
    let absolute = normalize(&base.join(file));
    match query {
        Some(query) => format!("sqlite://{}?{query}", absolute.display()),
        None => format!("sqlite://{}", absolute.display()),
    }
}

const MS_10: Duration = Duration::from_millis(10);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// A duration bound as an operator would write it.
fn describe_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => format!("{}ms", duration.as_millis()),
        _ if secs.is_multiple_of(86_400) => format!("{}d", secs / 86_400),
        _ if secs.is_multiple_of(3600) => format!("{}h", secs / 3600),
        _ if secs.is_multiple_of(60) => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

/// Collects problems while converting raw values, so that one run reports them all.
struct Checker<'a> {
    problems: Vec<String>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Checker<'_> {
    fn problem(&mut self, problem: impl Into<String>) {
        self.problems.push(problem.into());
    }

    /// Replaces each `${VAR}` with the variable's value; an unset variable is a problem, never
    /// an empty string, so a forgotten secret stops the daemon instead of weakening it.
    fn expand(&mut self, field: &str, value: &str) -> String {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.problem(format!("{field}: unterminated ${{ in value"));
                return out;
            };
            let name = &after[..end];
            match (self.env)(name) {
                Some(found) if found.is_empty() => self.problem(format!(
                    "{field}: environment variable {name} is set but empty"
                )),
                Some(found) => out.push_str(&found),
                None => self.problem(format!(
                    "{field}: environment variable {name} is not set (the file refers to ${{{name}}})"
                )),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// A duration within `min..=max`: outside those bounds a value is a typo (`0s` polls in a
    /// busy loop; `100000000d` overflows the calendar), so it is refused.
    fn duration(&mut self, field: &str, value: &str, min: Duration, max: Duration) -> Duration {
        match parse_duration(value) {
            Ok(duration) if (min..=max).contains(&duration) => duration,
            Ok(duration) => {
                self.problem(format!(
                    "{field}: {value:?} is out of range; allowed {} to {}",
                    describe_duration(min),
                    describe_duration(max)
                ));
                // The nearest bound, so that checks between fields do not add noise.
                duration.clamp(min, max)
            }
            Err(reason) => {
                self.problem(format!("{field}: {reason}"));
                Duration::from_secs(1)
            }
        }
    }

    fn within(&mut self, field: &str, value: u32, range: std::ops::RangeInclusive<u32>) -> u32 {
        if range.contains(&value) {
            value
        } else {
            self.problem(format!(
                "{field}: {value} is out of range; allowed {} to {}",
                range.start(),
                range.end()
            ));
            value.clamp(*range.start(), *range.end())
        }
    }

    fn non_zero(&mut self, field: &str, value: u32) -> NonZeroU32 {
        NonZeroU32::new(value).unwrap_or_else(|| {
            self.problem(format!("{field}: must be at least 1"));
            NonZeroU32::MIN
        })
    }

    /// An absolute http(s) URL: it is written into every email as a link.
    fn url(&mut self, field: &str, value: &str) -> String {
        let value = self.expand(field, value);
        let rest = value
            .strip_prefix("https://")
            .or_else(|| value.strip_prefix("http://"));
        if rest.is_none_or(|rest| rest.is_empty() || rest.contains(char::is_whitespace)) {
            self.problem(format!(
                "{field}: {value:?} is not an http:// or https:// URL"
            ));
        }
        value
    }

    fn email(&mut self, field: &str, value: &str) -> String {
        let value = self.expand(field, value);
        if !crate::directory::is_plausible_email(&value) {
            self.problem(format!("{field}: {value:?} is not an email address"));
        }
        value
    }

    fn transport(&mut self, raw: &raw::RawTransport, base: &Path) -> TransportSettings {
        match raw.kind {
            raw::TransportKind::File => match &raw.file {
                Some(file) => TransportSettings::File {
                    dir: normalize(&base.join(self.expand("transport.file.dir", &file.dir))),
                },
                None => {
                    self.problem("transport.file: required when transport.kind is file");
                    TransportSettings::File {
                        dir: PathBuf::new(),
                    }
                }
            },
            raw::TransportKind::Smtp => {
                let Some(smtp) = &raw.smtp else {
                    self.problem("transport.smtp: required when transport.kind is smtp");
                    return TransportSettings::File {
                        dir: PathBuf::new(),
                    };
                };
                let host = self.expand("transport.smtp.host", &smtp.host);
                let username = smtp
                    .username
                    .as_ref()
                    .map(|u| self.expand("transport.smtp.username", u));
                let password = smtp
                    .password
                    .as_ref()
                    .map(|p| self.expand("transport.smtp.password", p));
                let credentials = match (username, password) {
                    (Some(user), Some(pass)) => Some((user, Secret(pass))),
                    (None, None) => None,
                    _ => {
                        self.problem("transport.smtp: username and password go together; set both or neither");
                        None
                    }
                };
                let helo_name = smtp
                    .helo_name
                    .as_ref()
                    .map(|h| self.expand("transport.smtp.helo_name", h))
                    .unwrap_or_else(|| "localhost".to_string());
                if credentials.is_some()
                    && smtp.tls == TlsMode::None
                    && !is_loopback_host(&host)
                    && !smtp.allow_plaintext_auth
                {
                    self.problem(format!(
                        "transport.smtp: the password would cross the network to {host:?} \
                         unencrypted; set tls to starttls or implicit, or, for a relay on a \
                         network you trust, allow_plaintext_auth: true"
                    ));
                }
                TransportSettings::Smtp(SmtpSettings {
                    host,
                    port: smtp.port,
                    tls: smtp.tls,
                    credentials,
                    timeout: self.duration(
                        "transport.smtp.timeout",
                        &smtp.timeout,
                        SECOND,
                        MINUTE * 10,
                    ),
                    helo_name,
                    connections: self.within(
                        "transport.smtp.connections",
                        smtp.connections,
                        1..=64,
                    ),
                })
            }
        }
    }

    fn rate_limit(&mut self, raw: raw::RawRateLimit) -> RateLimitSettings {
        let global = Rate {
            per_second: self.non_zero("rate_limit.per_second", raw.per_second),
            burst: self.non_zero("rate_limit.burst", raw.burst),
        };
        let per_domain = raw
            .per_domain
            .map(|rate| self.rate("rate_limit.per_domain", &rate));
        let mut domains = BTreeMap::new();
        for (domain, rate) in &raw.domains {
            let field = format!("rate_limit.domains.{domain}");
            let rate = self.rate(&field, rate);
            // Keys are compared as recipients' domains are: lower-case ASCII, IDNs as A-labels.
            // A key that can never match, or names a domain already listed, is a mistake.
            match idna::domain_to_ascii_strict(domain) {
                Ok(key) if !key.is_empty() && !key.ends_with('.') => {
                    if domains.insert(key.clone(), rate).is_some() {
                        self.problem(format!(
                            "{field}: the same domain as another entry ({key}); list it once"
                        ));
                    }
                }
                _ => self.problem(format!("{field}: {domain:?} is not a domain name")),
            }
        }
        RateLimitSettings {
            global,
            per_domain,
            domains,
        }
    }

    fn rate(&mut self, field: &str, raw: &raw::RawRate) -> Rate {
        let per_second = self.non_zero(&format!("{field}.per_second"), raw.per_second);
        Rate {
            per_second,
            burst: raw.burst.map_or(per_second, |burst| {
                self.non_zero(&format!("{field}.burst"), burst)
            }),
        }
    }

    fn brand(&mut self, raw: &raw::RawBrand) -> Brand {
        Brand {
            name: self.expand("brand.name", &raw.name),
            tagline: self.expand("brand.tagline", &raw.tagline),
            website_url: self.url("brand.website_url", &raw.website_url),
            portal_url: self
                .url("brand.portal_url", &raw.portal_url)
                .trim_end_matches('/')
                .into(),
            knowledge_base_url: self.url("brand.knowledge_base_url", &raw.knowledge_base_url),
            support_email: self.email("brand.support_email", &raw.support_email),
            mailing_address: self.expand("brand.mailing_address", &raw.mailing_address),
            sender_name: self.expand("brand.sender.name", &raw.sender.name),
            sender_email: self.email("brand.sender.email", &raw.sender.email),
        }
    }

    fn recipients(&mut self, raw: raw::RawRecipients) -> RecipientRules {
        for (kind, group) in &raw.groups {
            if !GROUPS.contains(&group.as_str()) {
                self.problem(format!(
                    "recipients.groups.{kind}: unknown group {group:?}; expected one of {}",
                    GROUPS.join(", ")
                ));
            }
        }
        if raw.eligible_roles.is_empty() {
            self.problem("recipients.eligible_roles: empty, so nobody would ever be notified");
        }
        RecipientRules {
            eligible_roles: raw.eligible_roles.into_iter().collect(),
            groups: raw.groups,
        }
    }
}
