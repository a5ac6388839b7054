//! The shipped configuration loaded as a library (no database, no process), and the checks on
//! the bytes of a built message that the hostile-input and fuzz suites share: whatever a value
//! holds, the header block is exactly the one herald means to write.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use herald::config::Settings;
use herald::outbox::{Audience, Payload, PayloadError};
use herald::render::message::{Envelope, build_message};
use herald::render::{PreferenceSigner, RecipientView, RenderedMessage, Renderer, TemplateSet};
use mail_parser::{Message, MessageParser};

use super::repo_path;

/// The headers of every message herald builds, in the order it writes them. Anything else in
/// the header block was put there by a value.
pub const HEADERS: [&str; 8] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
];

/// The shipped configuration, templates and catalogue, loaded once per test binary.
pub struct Shipped {
    pub settings: Settings,
    pub renderer: Renderer,
    pub signer: PreferenceSigner,
}

pub static SHIPPED: LazyLock<Shipped> = LazyLock::new(|| {
    let settings = Settings::load(&repo_path("config/herald.yaml")).expect("shipped config");
    let templates =
        TemplateSet::load(&settings.templates_dir, &settings.catalog).expect("shipped templates");
    let signer = PreferenceSigner::new(&settings.preferences.url, &settings.preferences.secret);
    let renderer = Renderer::new(templates, settings.brand.clone(), signer.clone());
    Shipped {
        settings,
        renderer,
        signer,
    }
});

/// A fixed clock, so that every run renders the same bytes.
pub fn now() -> DateTime<Utc> {
    "2026-01-15T08:00:00Z".parse().unwrap()
}

/// The shipped sample payload of a kind.
pub fn sample(kind: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(repo_path(&format!("examples/payloads/{kind}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every (kind, audience) the shipped catalogue renders.
pub fn notifications() -> Vec<(String, Audience)> {
    SHIPPED
        .settings
        .catalog
        .specs()
        .flat_map(|spec| spec.audiences.iter().map(|a| (spec.kind.clone(), *a)))
        .collect()
}

impl Shipped {
    pub fn validate(&self, kind: &str, payload: impl AsRef<[u8]>) -> Result<Payload, PayloadError> {
        self.settings
            .catalog
            .validate(kind, payload)
            .map(|(_, payload)| payload)
    }

    /// Renders one notification and builds its MIME bytes, as the sender does.
    pub fn build(
        &self,
        kind: &str,
        audience: Audience,
        payload: &Payload,
        recipient: RecipientView<'_>,
    ) -> (RenderedMessage, Vec<u8>) {
        let rendered = self
            .renderer
            .render(kind, audience, payload, recipient, now())
            .unwrap_or_else(|err| panic!("{kind} to the {audience} renders: {err}"));
        let envelope = Envelope {
            to_name: recipient.name,
            to_email: recipient.email,
            message_id: "herald.1.0123456789abcdef@interlink.example",
            date: now(),
        };
        let bytes = build_message(&self.settings.brand, envelope, &rendered);
        (rendered, bytes)
    }
}

/// Parses a built message after checking its header block byte by byte: 7-bit ASCII, CRLF
/// line ends and no lone CR or LF, no line over RFC 5322's 998 characters, and exactly the
/// headers of [`HEADERS`], each once, in order (every other line continues the one above).
pub fn parse_checked(bytes: &[u8]) -> Message<'_> {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a blank line ends the headers");
    let block = &bytes[..end];
    assert!(block.is_ascii(), "headers are 7-bit: {}", show(block));
    let text = std::str::from_utf8(block).unwrap();
    let lines: Vec<&str> = text.split("\r\n").collect();
    let mut names = Vec::new();
    for line in &lines {
        assert!(
            !line.contains(['\r', '\n']),
            "a lone CR or LF in a header line: {line:?}"
        );
        assert!(line.len() <= 998, "a header line over 998 characters");
        if !line.starts_with([' ', '\t']) {
            let (name, _) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("not a header: {line:?}"));
            names.push(name);
        }
    }
    assert_eq!(names, HEADERS, "header block:\n{text}");

    let message = MessageParser::default()
        .parse(bytes)
        .expect("a parsable message");
    let parsed: Vec<&str> = message.headers().iter().map(|h| h.name()).collect();
    assert_eq!(parsed, HEADERS, "mail-parser reads the same headers");
    assert_eq!(message.to().unwrap().iter().count(), 1, "one recipient");
    assert!(message.cc().is_none() && message.bcc().is_none());
    message
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
