//! Who receives a notification: the domain's rules, applied to one company's contacts.

use super::Contact;
use crate::config::RecipientRules;

/// A contact chosen to receive one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub contact_id: String,
    pub name: String,
    pub email: String,
}

/// Every active contact whose role may subscribe and who subscribed to `group`, each address
/// once (compared without regard to case), in the order the contacts are given.
pub fn select_recipients(
    contacts: &[Contact],
    group: &str,
    rules: &RecipientRules,
) -> Vec<Recipient> {
    let mut chosen: Vec<Recipient> = Vec::new();
    for contact in contacts {
        let eligible = contact.active
            && rules.eligible_roles.contains(&contact.role)
            && contact.groups.contains(group);
        let duplicate = chosen
            .iter()
            .any(|r| r.email.eq_ignore_ascii_case(&contact.email));
        if eligible && !duplicate {
            chosen.push(Recipient {
                contact_id: contact.id.clone(),
                name: contact.name.clone(),
                email: contact.email.clone(),
            });
        }
    }
    chosen
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
            emails(&select_recipients(&contacts, "ordering", &rules)),
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
        let chosen = select_recipients(&contacts, "ordering", &rules);
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
        assert!(select_recipients(&contacts, "services", &rules).is_empty());
        assert!(select_recipients(&[], "services", &rules).is_empty());
    }
}
