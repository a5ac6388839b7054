//! The configuration file as written by the operator: plain serde structures that reject
//! unknown keys. Nothing here is trusted yet; [`super::Settings::from_raw`] validates it.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub database: RawDatabase,
    #[serde(default)]
    pub log: RawLog,
    pub transport: RawTransport,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub delivery: RawDelivery,
    pub templates: RawTemplates,
    pub brand: RawBrand,
    pub preferences: RawPreferences,
    #[serde(default)]
    pub recipients: RawRecipients,
    pub notifications: BTreeMap<String, RawNotification>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: String,
    /// How often an idle daemon looks for new outbox rows and retries that came due.
    #[serde(default = "defaults::poll_interval")]
    pub poll_interval: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTransport {
    pub kind: TransportKind,
    pub smtp: Option<RawSmtp>,
    pub file: Option<RawFileTransport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Smtp,
    File,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub tls: TlsMode,
    pub username: Option<String>,
    pub password: Option<String>,
    #[serde(default = "defaults::smtp_timeout")]
    pub timeout: String,
    /// The name this daemon gives in EHLO; defaults to `localhost`.
    pub helo_name: Option<String>,
    /// How many SMTP sessions each daemon keeps open and sends over at once.
    #[serde(default = "defaults::smtp_connections")]
    pub connections: u32,
    /// Allows a username and password to be sent unencrypted (`tls: none`) to a host that is
    /// not loopback: only for a relay on a network the operator trusts.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain text; for a relay on loopback or a trusted network only.
    None,
    /// Connect in plain text and upgrade with STARTTLS; refuse a server that cannot.
    #[default]
    Starttls,
    /// TLS from the first byte (usually port 465).
    Implicit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileTransport {
    pub dir: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    #[serde(default = "defaults::per_second")]
    pub per_second: u32,
    #[serde(default = "defaults::burst")]
    pub burst: u32,
    /// The rate for each recipient domain not listed in `domains`; none when absent.
    pub per_domain: Option<RawRate>,
    /// Rates for particular recipient domains (large mailbox providers throttle per domain).
    #[serde(default)]
    pub domains: BTreeMap<String, RawRate>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            per_second: defaults::per_second(),
            burst: defaults::burst(),
            per_domain: None,
            domains: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub per_second: u32,
    /// Defaults to `per_second`.
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// No limit when absent: `max_age` ends the retries.
    pub max_attempts: Option<u32>,
    #[serde(default = "defaults::initial_backoff")]
    pub initial_backoff: String,
    #[serde(default = "defaults::max_backoff")]
    pub max_backoff: String,
    #[serde(default = "defaults::max_age")]
    pub max_age: String,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            max_attempts: None,
            initial_backoff: defaults::initial_backoff(),
            max_backoff: defaults::max_backoff(),
            max_age: defaults::max_age(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    /// How many due deliveries one claim takes.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u32,
    /// How long a claim holds deliveries before another daemon may take them over.
    #[serde(default = "defaults::lease")]
    pub lease: String,
    /// At shutdown, how long a send already under way may take before it is abandoned.
    #[serde(default = "defaults::shutdown_grace")]
    pub shutdown_grace: String,
}

impl Default for RawDelivery {
    fn default() -> Self {
        Self {
            batch_size: defaults::batch_size(),
            lease: defaults::lease(),
            shutdown_grace: defaults::shutdown_grace(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTemplates {
    pub dir: String,
    /// A folder of sample payloads, `<kind>.json`, that `herald check` renders every
    /// notification with.
    pub samples: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBrand {
    pub name: String,
    pub tagline: String,
    pub website_url: String,
    pub portal_url: String,
    pub knowledge_base_url: String,
    pub support_email: String,
    pub mailing_address: String,
    pub sender: RawSender,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSender {
    pub name: String,
    pub email: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPreferences {
    pub url: String,
    pub secret: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipients {
    #[serde(default = "defaults::eligible_roles")]
    pub eligible_roles: Vec<String>,
    #[serde(default = "defaults::groups")]
    pub groups: BTreeMap<String, String>,
}

impl Default for RawRecipients {
    fn default() -> Self {
        Self {
            eligible_roles: defaults::eligible_roles(),
            groups: defaults::groups(),
        }
    }
}

/// One outbox kind: who is told, and which payload fields (beyond the common ones) it carries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotification {
    pub audiences: Vec<String>,
    #[serde(default)]
    pub fields: BTreeMap<String, RawField>,
}

/// A payload field, written either as a bare type (`ordered_at: datetime`) or in full.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawField {
    Type(String),
    Full(RawFieldSpec),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFieldSpec {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub optional: bool,
    pub default: Option<serde_json::Value>,
    pub min: Option<i64>,
    pub max: Option<i64>,
    pub one_of: Option<Vec<String>>,
}

/// Defaults, in one place, with the reason for each value.
pub mod defaults {
    use std::collections::BTreeMap;

    pub fn poll_interval() -> String {
        "1s".into()
    }

    /// Generous for a slow relay, short enough that a hung connection is noticed.
    pub fn smtp_timeout() -> String {
        "30s".into()
    }

    /// Enough to keep a nearby relay busy while one session waits for a reply; Postfix allows
    /// 20 per destination, but herald's relay is one destination for every message.
    pub fn smtp_connections() -> u32 {
        8
    }

    pub fn per_second() -> u32 {
        10
    }

    pub fn burst() -> u32 {
        10
    }

    /// Postfix waits 300 s after a first failure (`minimal_backoff_time`); herald usually
    /// talks to a nearby relay, where a minute is enough for a restart or a greylist.
    pub fn initial_backoff() -> String {
        "1m".into()
    }

    /// Postfix's `maximal_backoff_time` is 4000 s; an hour between attempts at most.
    pub fn max_backoff() -> String {
        "1h".into()
    }

    /// Postfix's `maximal_queue_lifetime`, and RFC 5321 section 4.5.4.1's "4-5 days".
    pub fn max_age() -> String {
        "5d".into()
    }

    /// Within systemd's default stop timeout (90 s), with room to record and close.
    pub fn shutdown_grace() -> String {
        "30s".into()
    }

    pub fn batch_size() -> u32 {
        50
    }

    pub fn lease() -> String {
        "5m".into()
    }

    /// The roles that may subscribe to notification groups (the domain's rule).
    pub fn eligible_roles() -> Vec<String> {
        ["company_admin", "technical_admin", "technical_contact"]
            .map(String::from)
            .to_vec()
    }

    /// The notification group each kind belongs to (the domain's rule).
    pub fn groups() -> BTreeMap<String, String> {
        [
            ("vxc.approval_required", "ordering"),
            ("vxc.approved", "ordering"),
            ("vxc.service_up", "services"),
            ("vxc.speed_change_requested", "ordering"),
            ("vxc.denied", "ordering"),
            ("vxc.expired", "ordering"),
            ("vxc.speed_change_approved", "ordering"),
            ("vxc.speed_change_rejected", "ordering"),
        ]
        .into_iter()
        .map(|(kind, group)| (kind.to_string(), group.to_string()))
        .collect()
    }
}
