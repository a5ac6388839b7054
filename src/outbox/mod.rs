//! The outbox: rows that ordering systems insert, one per business event, and the rules that
//! turn a row's JSON payload into validated facts for the templates.

pub mod schema;

use std::fmt;

use serde::Serialize;

pub use schema::{Catalog, Payload, PayloadError};

/// Which company of a payload a notification is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Audience {
    /// The service provider that owns the port the VXC goes to.
    Provider,
    /// The customer that ordered the VXC.
    Customer,
}

impl Audience {
    pub const ALL: [Audience; 2] = [Audience::Provider, Audience::Customer];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provider => "provider",
            Self::Customer => "customer",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|audience| audience.as_str() == text)
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `herald_outbox` as the daemon reads it.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub id: i64,
    pub kind: String,
    /// The payload as stored. Bytes, not text: a row that is not valid UTF-8 must fail on its
    /// own (as malformed JSON), not stop the daemon from reading the table.
    pub payload: Vec<u8>,
}
