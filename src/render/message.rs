//! The MIME message as it goes on the wire: one recipient, `multipart/alternative` with the
//! text and HTML parts, and headers that stay the same on every attempt but the Date.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use mail_builder::MessageBuilder;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;

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
///
/// mail-builder writes ASCII text as it is, and text such as `=?utf-8?B?4oCu?=` would then
/// be decoded by mail readers (inside other words and quoted names too) into something no
/// check saw: here a bidi override. A subject or name containing `=?` is therefore written
/// encoded, so that it reads exactly as given.
pub fn build_message(brand: &Brand, envelope: Envelope<'_>, rendered: &RenderedMessage) -> Vec<u8> {
    let builder =
        MessageBuilder::new().from((brand.sender_name.as_str(), brand.sender_email.as_str()));
    let builder = if looks_encoded(envelope.to_name) {
        let email: String = envelope
            .to_email
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        builder.header(
            "To",
            Raw::new(format!("{} <{email}>", encoded_words(envelope.to_name))),
        )
    } else {
        builder.to((envelope.to_name, envelope.to_email))
    };
    let builder = if looks_encoded(&rendered.subject) {
        builder.header("Subject", Raw::new(encoded_words(&rendered.subject)))
    } else {
        builder.subject(rendered.subject.as_str())
    };
    builder
        .date(envelope.date.timestamp())
        .message_id(envelope.message_id)
        // RFC 3834: tells auto-responders not to answer a machine.
        .header("Auto-Submitted", Text::new("auto-generated"))
        .text_body(rendered.text.as_str())
        .html_body(rendered.html.as_str())
        .write_to_vec()
        .expect("writing into a Vec cannot fail")
}

/// Whether a reader could take part of `text` for an RFC 2047 encoded word.
fn looks_encoded(text: &str) -> bool {
    text.contains("=?")
}

/// `text` as RFC 2047 B-encoded words of at most 36 bytes of text each (60 characters
/// encoded, within the 75 allowed), split between characters and separated by spaces, which
/// readers drop between encoded words and where the header folds. Control characters are
/// left out, as mail-builder does for the headers it encodes.
fn encoded_words(text: &str) -> String {
    const CHUNK_BYTES: usize = 36;
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in text.chars().filter(|c| !c.is_control()) {
        if chunk.len() + c.len_utf8() > CHUNK_BYTES {
            words.push(format!("=?utf-8?B?{}?=", STANDARD.encode(&chunk)));
            chunk.clear();
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(format!("=?utf-8?B?{}?=", STANDARD.encode(&chunk)));
    }
    words.join(" ")
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
