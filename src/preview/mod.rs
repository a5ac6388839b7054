//! Previews for template authors: one notification rendered exactly as it would be sent, with
//! the sample payload that ships with the templates (or one of the author's), to a sample
//! recipient. `herald preview` prints it; `herald preview --serve` shows them all on a local
//! page ([`server`]).

pub mod server;

use std::path::Path;

use chrono::{DateTime, Utc};

use crate::config::Settings;
use crate::outbox::{Audience, PayloadError};
use crate::render::message::{Envelope, build_message, sender_domain};
pub use crate::render::sample_recipient;
use crate::render::{RenderedMessage, Renderer, TemplateError};

/// What a preview prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PreviewFormat {
    /// The whole MIME message, headers included, as the SMTP server would receive it.
    Eml,
    /// The HTML part.
    Html,
    /// The subject, a blank line, then the text part.
    Text,
}

/// One rendered notification and its message.
#[derive(Debug, Clone)]
pub struct Preview {
    pub kind: String,
    pub audience: Audience,
    pub rendered: RenderedMessage,
    pub eml: Vec<u8>,
}

impl Preview {
    pub fn format(&self, format: PreviewFormat) -> Vec<u8> {
        match format {
            PreviewFormat::Eml => self.eml.clone(),
            PreviewFormat::Html => self.rendered.html.clone().into_bytes(),
            PreviewFormat::Text => {
                format!("{}\n\n{}", self.rendered.subject, self.rendered.text).into_bytes()
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("unknown notification kind {0:?}; configured kinds: {1}")]
    UnknownKind(String, String),
    #[error("notification {kind} has no {audience} audience; it goes to: {available}")]
    NoSuchAudience {
        kind: String,
        audience: Audience,
        available: String,
    },
    #[error("no sample payload: set templates.samples, or pass --payload FILE")]
    NoSamples,
    // The causes are part of the message, not `source`s, so that they print once.
    #[error("cannot read payload {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("payload {path}: {problem}")]
    Payload { path: String, problem: PayloadError },
    #[error(transparent)]
    Template(#[from] TemplateError),
}

/// Renders `kind` for `audience` (the kind's first audience when `None`) with the payload at
/// `payload`, or with the kind's sample from `templates.samples`.
pub fn preview(
    settings: &Settings,
    renderer: &Renderer,
    kind: &str,
    audience: Option<Audience>,
    payload: Option<&Path>,
    now: DateTime<Utc>,
) -> Result<Preview, PreviewError> {
    let spec = settings.catalog.get(kind).ok_or_else(|| {
        PreviewError::UnknownKind(
            kind.to_string(),
            settings.catalog.kinds().collect::<Vec<_>>().join(", "),
        )
    })?;
    let audience = match audience {
        Some(audience) if spec.audiences.contains(&audience) => audience,
        Some(audience) => {
            return Err(PreviewError::NoSuchAudience {
                kind: kind.to_string(),
                audience,
                available: spec
                    .audiences
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        None => spec.audiences[0],
    };

    let path = match payload {
        Some(path) => path.to_path_buf(),
        None => settings
            .samples_dir
            .as_ref()
            .ok_or(PreviewError::NoSamples)?
            .join(format!("{kind}.json")),
    };
    let shown = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(|error| PreviewError::Read {
        path: shown.clone(),
        error,
    })?;
    let (_, payload) =
        settings
            .catalog
            .validate(kind, &bytes)
            .map_err(|problem| PreviewError::Payload {
                path: shown,
                problem,
            })?;

    let recipient = sample_recipient(audience);
    let rendered = renderer.render(kind, audience, &payload, recipient, now)?;
    let domain = sender_domain(&settings.brand.sender_email);
    let message_id = format!("preview.{kind}.{audience}@{domain}");
    let envelope = Envelope {
        to_name: recipient.name,
        to_email: recipient.email,
        message_id: &message_id,
        date: now,
    };
    let eml = build_message(&settings.brand, envelope, &rendered);
    Ok(Preview {
        kind: kind.to_string(),
        audience,
        rendered,
        eml,
    })
}
