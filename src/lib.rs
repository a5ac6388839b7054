//! herald: an email notification daemon for a connectivity marketplace.
//!
//! Ordering systems insert rows into an outbox table; herald expands each row into deliveries
//! for the right contacts ([`outbox`], [`directory`]), renders them from templates
//! ([`render`]), and hands them to an SMTP relay ([`transport`]) with rate limiting and
//! retries ([`dispatch`]). All state lives in the database ([`store`]), so nothing is lost
//! when the daemon stops.

pub mod cli;
pub mod config;
pub mod directory;
pub mod dispatch;
pub mod outbox;
pub mod preview;
pub mod render;
pub mod store;
pub mod telemetry;
pub mod transport;
