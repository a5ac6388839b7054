//! The MIME message as it goes on the wire: one recipient, `multipart/alternative` with the
//! text and HTML parts, and headers that stay the same on every attempt but the Date.

use chrono::{DateTime, Utc};
use mail_builder::MessageBuilder;

use super::RenderedMessage;
use crate::config::Brand;

/// Everything about one message that does not come from the templates.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub to_name: &'a str,
    pub to_email: &'a str,
    /// Without angle brackets, as stored on the delivery.
    pub message_id: &'a str,
    pub date: DateTime<Utc>,
}

/// Builds the RFC 5322 bytes. Non-ASCII names and subjects are encoded by mail-builder
/// (RFC 2047); bodies are quoted-printable where needed, with CRLF line ends.
pub fn build_message(brand: &Brand, envelope: Envelope<'_>, rendered: &RenderedMessage) -> Vec<u8> {
    MessageBuilder::new()
        .from((brand.sender_name.as_str(), brand.sender_email.as_str()))
        .to((envelope.to_name, envelope.to_email))
        .subject(rendered.subject.as_str())
        .date(envelope.date.timestamp())
        .message_id(envelope.message_id)
        // RFC 3834: tells auto-responders not to answer a machine.
        .header(
            "Auto-Submitted",
            mail_builder::headers::text::Text::new("auto-generated"),
        )
        .text_body(rendered.text.as_str())
        .html_body(rendered.html.as_str())
        .write_to_vec()
        .expect("writing into a Vec cannot fail")
}

/// The domain of the sender's address, which Message-IDs are made under.
pub fn sender_domain(sender_email: &str) -> &str {
    sender_email
        .rsplit_once('@')
        .map_or("herald.invalid", |(_, d)| d)
}

/// A fresh Message-ID for a delivery being planned: unique without coordination between
/// daemons, and under the sender's own domain as RFC 5322 recommends.
pub fn new_message_id(outbox_id: i64, sender_email: &str) -> String {
    let domain = sender_domain(sender_email);
    format!(
        "herald.{outbox_id}.{:016x}{:016x}@{domain}",
        fastrand::u64(..),
        fastrand::u64(..)
    )
}
