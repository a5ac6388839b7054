//! Logging: human-readable lines by default, JSON with `log.format: json`; the level comes
//! from `RUST_LOG` (default `info`, with sqlx's per-statement logging kept at `warn`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Installs the global subscriber; logs go to standard error so that command output
/// (`status`, `check`) stays clean on standard output.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colour only for a person at a terminal; log files and journald get plain text.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second call (tests running several commands in one process) keeps the first.
    drop(installed);
}
