//! The directory file format (`herald directory import FILE.yaml`): companies, each with its
//! contacts. Importing makes the directory tables match the file exactly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Contact, ascii_mailbox};
use crate::config::GROUPS;
use crate::outbox::schema::is_disallowed_char;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryFile {
    pub companies: Vec<CompanyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompanyEntry {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub contacts: Vec<ContactEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactEntry {
    pub id: String,
    pub name: String,
    pub email: String,
    pub role: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "active_by_default")]
    pub active: bool,
}

fn active_by_default() -> bool {
    true
}

impl ContactEntry {
    pub fn to_contact(&self) -> Contact {
        Contact {
            id: self.id.clone(),
            name: self.name.clone(),
            email: self.email.clone(),
            role: self.role.clone(),
            active: self.active,
            groups: self.groups.iter().cloned().collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read directory file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("directory file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("directory file {path} has {} problem(s); nothing was imported:\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl DirectoryFile {
    /// Reads and checks a directory file; any problem rejects the whole file, so an import
    /// never leaves the directory half-updated.
    pub fn load(path: &Path) -> Result<Self, ImportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: Self = serde_saphyr::from_str(&text).map_err(|err| ImportError::Parse {
            path: path.to_path_buf(),
            message: err.to_string(),
        })?;
        let problems = file.problems();
        if problems.is_empty() {
            Ok(file)
        } else {
            Err(ImportError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut company_ids = BTreeSet::new();
        let mut contact_ids = BTreeSet::new();
        for company in &self.companies {
            if company.id.trim().is_empty() {
                problems.push(format!("company {:?}: id must not be empty", company.name));
            }
            if !company_ids.insert(&company.id) {
                problems.push(format!("company {:?}: id listed twice", company.id));
            }
            if let Some(problem) = text_problem(&company.name) {
                problems.push(format!("company {:?}: name {problem}", company.id));
            }
            for contact in &company.contacts {
                let at = format!("company {:?}, contact {:?}", company.id, contact.id);
                if contact.id.trim().is_empty() {
                    problems.push(format!("{at}: id must not be empty"));
                }
                if let Some(problem) = text_problem(&contact.name) {
                    problems.push(format!("{at}: name {problem}"));
                }
                if !contact_ids.insert(&contact.id) {
                    problems.push(format!("{at}: contact id listed twice"));
                }
                if let Err(reason) = ascii_mailbox(&contact.email) {
                    problems.push(format!(
                        "{at}: not an email address herald can send to: {reason}"
                    ));
                }
                for group in &contact.groups {
                    if !GROUPS.contains(&group.as_str()) {
                        problems.push(format!(
                            "{at}: unknown group {group:?}; expected one of {}",
                            GROUPS.join(", ")
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// Why a name cannot be shown in an email, if it cannot.
fn text_problem(name: &str) -> Option<&'static str> {
    if name.trim().is_empty() {
        Some("must not be empty")
    } else if name.chars().any(is_disallowed_char) {
        Some("must be one line of printable text (it contains a control character)")
    } else {
        None
    }
}
