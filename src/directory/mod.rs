//! The directory of companies and their contacts, and the rules that pick who is told.
//!
//! The portal writes the directory tables directly; `herald directory import` loads the same
//! data from a YAML file (see [`import`]).

pub mod import;
mod recipients;

use std::collections::BTreeSet;

pub use import::{DirectoryFile, ImportError};
pub use recipients::{Recipient, Selection, display_name, select_recipients};

/// A portal user of one company.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub id: String,
    pub name: String,
    pub email: String,
    pub role: String,
    pub active: bool,
    /// The notification groups this contact subscribed to.
    pub groups: BTreeSet<String>,
}

/// The form of a contact's address that herald sends to: an internationalised domain
/// (`anna@bücher.example`) becomes its ASCII form (`anna@xn--bcher-kva.example`), which every
/// relay and mail reader understands. A non-ASCII local part would need SMTPUTF8, which herald
/// does not use, so it is refused with that reason, as is anything that is not a mailbox.
pub fn ascii_mailbox(text: &str) -> Result<String, String> {
    let Some((local, domain)) = text.rsplit_once('@') else {
        return Err(format!("{text:?} is not a valid mailbox (no @)"));
    };
    if !local.is_ascii() {
        return Err(format!(
            "{text:?}: a non-ASCII local part needs SMTPUTF8, which herald does not use"
        ));
    }
    let domain = ascii_domain(domain).map_err(|reason| format!("{text:?}: {reason}"))?;
    let mailbox = format!("{local}@{domain}");
    if is_plausible_email(&mailbox) {
        Ok(mailbox)
    } else {
        Err(format!("{text:?} is not a valid mailbox"))
    }
}

/// A mail domain in lower-case ASCII, internationalised names as A-labels (IDNA/UTS 46).
pub fn ascii_domain(domain: &str) -> Result<String, String> {
    if domain.is_ascii() {
        return Ok(domain.to_ascii_lowercase());
    }
    idna::domain_to_ascii_strict(domain)
        .map_err(|_| format!("{domain:?} is not a valid internationalised domain name"))
}

/// A cheap check that `text` can stand in an SMTP envelope as a mailbox: one `@`, a non-empty
/// local part and domain, ASCII only (see [`ascii_mailbox`] for internationalised domains),
/// and nothing that could break a header or a command line.
pub fn is_plausible_email(text: &str) -> bool {
    if !text.is_ascii() {
        return false;
    }
    let Some((local, domain)) = text.rsplit_once('@') else {
        return false;
    };
    let forbidden = |c: char| c.is_whitespace() || c.is_control() || "<>(),;:\\\"[]@".contains(c);
    !local.is_empty()
        && !domain.is_empty()
        && !local.chars().any(forbidden)
        && !domain.chars().any(forbidden)
        && !domain.starts_with('.')
        && !domain.ends_with('.')
}

#[cfg(test)]
mod tests {
    use super::{ascii_mailbox, is_plausible_email};

    #[test]
    fn internationalised_domains_become_ascii_and_local_parts_must_be_ascii() {
        assert_eq!(
            ascii_mailbox("anna@Bücher.example").unwrap(),
            "anna@xn--bcher-kva.example"
        );
        assert_eq!(
            ascii_mailbox("kenji@例え.テスト").unwrap(),
            "kenji@xn--r8jz45g.xn--zckzah"
        );
        assert_eq!(
            ascii_mailbox("Dana@Acme.Example").unwrap(),
            "Dana@acme.example"
        );
        let refused = ascii_mailbox("anaïs@acme.example").unwrap_err();
        assert!(refused.contains("SMTPUTF8"), "{refused}");
        for bad in [
            "",
            "dana",
            "a@b@",
            "a@bü cher.example",
            "a@x.y\r\nBcc: e@v.il",
        ] {
            assert!(ascii_mailbox(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plausible_addresses() {
        for good in ["dana@acme.example", "a.b+c@x.y", "noc@localhost"] {
            assert!(is_plausible_email(good), "{good}");
        }
        for bad in [
            "",
            "dana",
            "@acme.example",
            "dana@",
            "a b@x.y",
            "a@x.y\r\nBcc: e@v.il",
            "a<b@x.y",
            "a@@x.y",
        ] {
            assert!(!is_plausible_email(bad), "{bad:?}");
        }
    }
}
