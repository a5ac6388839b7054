//! Signed per-recipient links to the notification-preferences page.
//!
//! A token carries the contact's id and address and an HMAC-SHA256 over both, keyed with the
//! configured secret. Changing either (to reach another contact's preferences) breaks the
//! signature; verification compares in constant time. The portal verifies with
//! [`PreferenceSigner::verify`], or `herald preferences verify URL`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

use crate::config::Secret;

/// Binds the token to its purpose and format version, so a MAC made for anything else with the
/// same secret can never pass as a preferences token.
const CONTEXT: &[u8] = b"herald-preferences-v1";

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceIdentity {
    pub contact_id: String,
    pub email: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no preferences token found (expected ?token=... in the link)")]
    Missing,
    #[error("the link does not point to the configured preferences page")]
    WrongPage,
    #[error("the preferences token is malformed or truncated")]
    Malformed,
    #[error(
        "the preferences token's signature does not match: it was altered or signed with another secret"
    )]
    BadSignature,
}

#[derive(Clone)]
pub struct PreferenceSigner {
    base_url: String,
    key: hmac::Key,
}

impl std::fmt::Debug for PreferenceSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreferenceSigner")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl PreferenceSigner {
    pub fn new(base_url: &str, secret: &Secret) -> Self {
        Self {
            base_url: base_url.to_string(),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes()),
        }
    }

    /// The link for one recipient: the configured page with `?token=…` (or `&token=…` when the
    /// page URL already has a query).
    pub fn link(&self, contact_id: &str, email: &str) -> String {
        let separator = if self.base_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{separator}token={}",
            self.base_url,
            self.token(contact_id, email)
        )
    }

    /// `base64url(contact_id).base64url(email).base64url(mac)`.
    pub fn token(&self, contact_id: &str, email: &str) -> String {
        let tag = hmac::sign(&self.key, &signed_bytes(contact_id, email));
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(contact_id),
            URL_SAFE_NO_PAD.encode(email),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// Checks a token, or a whole link containing `token=`, and says whose it is.
    ///
    /// Anything that is not a bare token is a link, and must be exactly the configured page
    /// followed by its query: a prefix match alone would let `https://page.example.evil.test/`
    /// (or `page.example@evil.test`, or a page-less `evil.test/?token=…`) pass for the real
    /// page. Percent-encoding in the token (which some mail clients add) is undone first;
    /// whitespace around the input (from a copy and paste) is ignored.
    pub fn verify(&self, link_or_token: &str) -> Result<PreferenceIdentity, VerifyError> {
        let input = link_or_token.trim();
        let token = if is_bare_token(input) {
            input
        } else {
            self.token_in_link(input)?
        };
        let token = percent_decode(token).ok_or(VerifyError::Malformed)?;
        let mut parts = token.split('.');
        let (Some(contact), Some(email), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::Malformed);
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| VerifyError::Malformed)
        };
        let contact_id = String::from_utf8(decode(contact)?).map_err(|_| VerifyError::Malformed)?;
        let email = String::from_utf8(decode(email)?).map_err(|_| VerifyError::Malformed)?;
        let tag = decode(tag)?;
        hmac::verify(&self.key, &signed_bytes(&contact_id, &email), &tag)
            .map_err(|_| VerifyError::BadSignature)?;
        Ok(PreferenceIdentity { contact_id, email })
    }

    /// The `token` parameter of a link to the configured page. What follows the page's URL
    /// must start its query (`?`, or `&` when the page URL has a query of its own) or its
    /// fragment; anything else is another page, or another host.
    fn token_in_link<'a>(&self, link: &'a str) -> Result<&'a str, VerifyError> {
        let rest = link
            .strip_prefix(&self.base_url)
            .ok_or(VerifyError::WrongPage)?;
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        if rest.is_empty() {
            return Err(VerifyError::Missing);
        }
        let query_start = if self.base_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let query = rest
            .strip_prefix(query_start)
            .ok_or(VerifyError::WrongPage)?;
        query
            .split('&')
            .find_map(|parameter| parameter.strip_prefix("token="))
            .ok_or(VerifyError::Missing)
    }
}

/// Whether `text` could be a token on its own: only the characters [`PreferenceSigner::token`]
/// writes (base64url and dots), and `%` for one that a mail client percent-encoded.
fn is_bare_token(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'%'))
}

/// Undoes `%XX` escapes; `None` for a broken escape or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The MAC input: purpose, then each field with its length, so no two (id, email) pairs can
/// produce the same bytes.
fn signed_bytes(contact_id: &str, email: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(CONTEXT.len() + contact_id.len() + email.len() + 16);
    bytes.extend_from_slice(CONTEXT);
    for field in [contact_id, email] {
        bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
        bytes.extend_from_slice(field.as_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secret: &str) -> PreferenceSigner {
        PreferenceSigner::new("https://portal.example/preferences", &Secret::new(secret))
    }

    #[test]
    fn a_link_verifies_as_its_recipient() {
        let signer = signer("0123456789abcdef-secret");
        let link = signer.link("acme-dana", "dana@acme.example");
        assert!(link.starts_with("https://portal.example/preferences?token="));
        let identity = signer.verify(&link).unwrap();
        assert_eq!(identity.contact_id, "acme-dana");
        assert_eq!(identity.email, "dana@acme.example");
    }

    #[test]
    fn tampered_truncated_and_retargeted_tokens_fail() {
        let signer = signer("0123456789abcdef-secret");
        let token = signer.token("acme-dana", "dana@acme.example");
        let (_, rest) = token.split_once('.').unwrap();
        let retargeted = format!("{}.{rest}", URL_SAFE_NO_PAD.encode("acme-pat"));
        assert_eq!(signer.verify(&retargeted), Err(VerifyError::BadSignature));

        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert!(
            signer
                .verify(std::str::from_utf8(&flipped).unwrap())
                .is_err()
        );

        assert!(signer.verify(&token[..token.len() - 5]).is_err());
        assert_eq!(signer.verify("only.two"), Err(VerifyError::Malformed));
        assert_eq!(
            signer.verify("https://portal.example/preferences"),
            Err(VerifyError::Missing)
        );
        let elsewhere = signer
            .link("acme-dana", "dana@acme.example")
            .replace("https://portal.example", "https://evil.example");
        assert_eq!(signer.verify(&elsewhere), Err(VerifyError::WrongPage));
    }

    #[test]
    fn a_percent_encoded_token_still_verifies() {
        let signer = signer("0123456789abcdef-secret");
        let link = signer.link("acme-dana", "dana@acme.example");
        let (page, token) = link.split_once("token=").unwrap();
        let link = format!("{page}token={}", token.replace('.', "%2E"));
        assert_eq!(signer.verify(&link).unwrap().contact_id, "acme-dana");
    }

    #[test]
    fn another_secret_rejects_the_token() {
        let token = signer("0123456789abcdef-secret").token("acme-dana", "dana@acme.example");
        assert_eq!(
            signer("another-secret-of-16+chars").verify(&token),
            Err(VerifyError::BadSignature)
        );
    }
}
