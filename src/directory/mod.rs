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

/// A cheap check that `text` can stand in an SMTP envelope as a mailbox: one `@`, a non-empty
/// local part and domain, ASCII only (herald does not speak SMTPUTF8 yet), and nothing that
/// could break a header or a command line.
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
    use super::is_plausible_email;

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
