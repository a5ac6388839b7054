//! Who receives a notification: the domain's rules, applied to one company's contacts.

use super::{Contact, ascii_mailbox};
use crate::config::RecipientRules;
use crate::outbox::schema::is_disallowed_char;

/// A contact chosen to receive one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub contact_id: String,
    pub name: String,
    pub email: String,
}

/// Who was chosen, and which eligible contacts cannot be sent to, because their stored
/// address is not one herald can send to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub recipients: Vec<Recipient>,
    /// Eligible contacts whose address is unusable, each with the reason.
    pub unusable: Vec<(Recipient, String)>,
}

/// Every active contact whose role may subscribe and who subscribed to `group`, each address
/// once (compared without regard to case), in the order the contacts are given. Addresses are
/// given in their ASCII form (see [`ascii_mailbox`]).
pub fn select_recipients(contacts: &[Contact], group: &str, rules: &RecipientRules) -> Selection {
    let mut selection = Selection::default();
    for contact in contacts {
        let eligible = contact.active
            && rules.eligible_roles.contains(&contact.role)
            && contact.groups.contains(group);
        if !eligible {
            continue;
        }
        let (email, problem) = match ascii_mailbox(&contact.email) {
            Ok(email) => (email, None),
            Err(reason) => (contact.email.clone(), Some(reason)),
        };
        let duplicate = selection
            .recipients
            .iter()
            .chain(selection.unusable.iter().map(|(r, _)| r))
            .any(|r| r.email.eq_ignore_ascii_case(&email));
        if duplicate {
            continue;
        }
        let recipient = Recipient {
            contact_id: contact.id.clone(),
            name: display_name(&contact.name, &email),
            email,
        };
        match problem {
            None => selection.recipients.push(recipient),
            Some(reason) => selection.unusable.push((recipient, reason)),
        }
    }
    selection
}

/// The name to greet and to put in `To:`: the contact's name on one line, with control and
/// bidi-override characters removed, or the address when nothing printable is left.
pub fn display_name(name: &str, email: &str) -> String {
    let cleaned = name
        .split(|c: char| c.is_whitespace() || is_disallowed_char(c))
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if cleaned.is_empty() {
        email.to_string()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(id: &str, email: &str, role: &str, groups: &[&str], active: bool) -> Contact {
        Contact {
            id: id.into(),
            name: id.into(),
            email: email.into(),
            role: role.into(),
            active,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn emails(recipients: &[Recipient]) -> Vec<&str> {
        recipients.iter().map(|r| r.email.as_str()).collect()
    }

    #[test]
    fn each_rule_excludes_on_its_own() {
        let rules = RecipientRules::domain_defaults();
        let contacts = [
            contact(
                "ok",
                "ok@x.example",
                "technical_contact",
                &["ordering"],
                true,
            ),
            contact(
                "inactive",
                "old@x.example",
                "company_admin",
                &["ordering"],
                false,
            ),
            contact("finance", "fin@x.example", "finance", &["ordering"], true),
            contact(
                "read-only",
                "ro@x.example",
                "read_only",
                &["ordering"],
                true,
            ),
            contact(
                "unsubscribed",
                "un@x.example",
                "company_admin",
                &["security"],
                true,
            ),
            contact(
                "same-address",
                "OK@x.example",
                "company_admin",
                &["ordering"],
                true,
            ),
        ];
        assert_eq!(
            emails(&select_recipients(&contacts, "ordering", &rules).recipients),
            ["ok@x.example"]
        );
    }

    #[test]
    fn duplicate_address_keeps_the_first_eligible_contact() {
        let rules = RecipientRules::domain_defaults();
        let contacts = [
            contact(
                "ineligible",
                "shared@x.example",
                "finance",
                &["ordering"],
                true,
            ),
            contact(
                "eligible",
                "shared@x.example",
                "company_admin",
                &["ordering"],
                true,
            ),
        ];
        let chosen = select_recipients(&contacts, "ordering", &rules).recipients;
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].contact_id, "eligible");
    }

    #[test]
    fn no_eligible_contact_is_an_empty_list_not_an_error() {
        let rules = RecipientRules::domain_defaults();
        let contacts = [contact(
            "ro",
            "ro@x.example",
            "read_only",
            &["services"],
            true,
        )];
        assert_eq!(
            select_recipients(&contacts, "services", &rules),
            Selection::default()
        );
        assert_eq!(
            select_recipients(&[], "services", &rules),
            Selection::default()
        );
    }

    #[test]
    fn an_unusable_address_is_reported_not_sent_to() {
        let rules = RecipientRules::domain_defaults();
        let contacts = [
            contact(
                "bad",
                "not an address",
                "company_admin",
                &["ordering"],
                true,
            ),
            contact(
                "idn",
                "josé@x.example",
                "company_admin",
                &["ordering"],
                true,
            ),
            contact("ok", "ok@x.example", "company_admin", &["ordering"], true),
            contact(
                "idn-domain",
                "anna@bücher.example",
                "company_admin",
                &["ordering"],
                true,
            ),
        ];
        let selection = select_recipients(&contacts, "ordering", &rules);
        assert_eq!(
            emails(&selection.recipients),
            ["ok@x.example", "anna@xn--bcher-kva.example"]
        );
        let unusable: Vec<(&str, &str)> = selection
            .unusable
            .iter()
            .map(|(r, why)| (r.contact_id.as_str(), why.as_str()))
            .collect();
        assert_eq!(
            unusable,
            [
                ("bad", "\"not an address\" is not a valid mailbox (no @)"),
                (
                    "idn",
                    "\"josé@x.example\": a non-ASCII local part needs SMTPUTF8, which herald does not use"
                ),
            ]
        );
    }

    #[test]
    fn display_names_are_one_clean_line() {
        assert_eq!(
            display_name("Dana\r\nBcc: x@y\u{202E}", "d@x.example"),
            "Dana Bcc: x@y"
        );
        assert_eq!(display_name(" \t ", "d@x.example"), "d@x.example");
    }
}
