//! Transports hand a finished message to the outside world: an SMTP relay in production, or a
//! folder of `.eml` files for trying herald out. [`Outcome`] is the one place where what
//! happened is sorted into sent / retry later / never retry.

mod file;
mod smtp;

use crate::config::TransportSettings;
pub use file::FileTransport;
pub use smtp::SmtpTransport;

/// One message ready to go.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The envelope sender (MAIL FROM).
    pub from: &'a str,
    /// The envelope recipient (RCPT TO): always exactly one.
    pub to: &'a str,
    /// Without angle brackets; names the `.eml` file for the file transport.
    pub message_id: &'a str,
    pub bytes: &'a [u8],
}

/// What one attempt at one message came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server accepted the message; its reply is kept as the receipt.
    Sent { reply: String },
    /// Worth trying again later: a 4xx reply, or the connection failed during the exchange.
    Transient {
        error: String,
        reply: Option<String>,
    },
    /// Will never succeed as it is: a 5xx reply.
    Permanent {
        error: String,
        reply: Option<String>,
    },
}

/// The transport cannot take any message now (the server is down, refuses us, or the folder
/// is not writable). Nothing was attempted, so no delivery is charged an attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// The configured transport.
#[derive(Debug)]
pub enum Transport {
    Smtp(Box<SmtpTransport>),
    File(FileTransport),
}

impl Transport {
    pub fn from_settings(settings: &TransportSettings) -> Self {
        match settings {
            TransportSettings::Smtp(smtp) => Self::Smtp(Box::new(SmtpTransport::new(smtp.clone()))),
            TransportSettings::File { dir } => Self::File(FileTransport::new(dir.clone())),
        }
    }

    /// Makes sure a message can be handed over now, connecting if needed. The SMTP connection
    /// is kept and reused for the following messages.
    pub async fn ready(&mut self) -> Result<(), Unavailable> {
        match self {
            Self::Smtp(smtp) => smtp.ready().await,
            Self::File(file) => file.ready().await,
        }
    }

    pub async fn send(&mut self, message: Outgoing<'_>) -> Outcome {
        match self {
            Self::Smtp(smtp) => smtp.send(message).await,
            Self::File(file) => file.send(message).await,
        }
    }

    /// Drops the connection without a word, after a send was abandoned midway: the session
    /// is out of step and must not be reused.
    pub fn abandon(&mut self) {
        if let Self::Smtp(smtp) = self {
            smtp.abandon();
        }
    }

    /// Ends the session politely (SMTP QUIT); used at shutdown.
    pub async fn close(&mut self) {
        if let Self::Smtp(smtp) = self {
            smtp.close().await;
        }
    }
}
