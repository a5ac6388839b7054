//! Rendering: each notification is three templates (subject, text, HTML) under
//! `<templates>/<kind>/<audience>.*`, extending the shared `layout.txt` and `layout.html`.
//!
//! The whole folder is compiled once into a [`TemplateSet`]; values from payloads are escaped
//! in HTML, and any use of an undefined value is an error, never a blank.

mod filters;
pub mod message;
pub mod preferences;
pub mod reload;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Datelike, Utc};
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};

use crate::config::Brand;
use crate::outbox::{Audience, Catalog, Payload};
pub use preferences::{PreferenceIdentity, PreferenceSigner, VerifyError};

/// The three parts of one notification, ready for MIME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMessage {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// The person a copy is rendered for.
#[derive(Debug, Clone, Copy)]
pub struct RecipientView<'a> {
    pub contact_id: &'a str,
    pub name: &'a str,
    pub email: &'a str,
}

/// A template problem, located as precisely as minijinja allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// The file, relative to the templates folder.
    pub template: String,
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.template, self.reason),
            None => write!(f, "{}: {}", self.template, self.reason),
        }
    }
}

impl std::error::Error for TemplateError {}

impl TemplateError {
    /// Converts a minijinja error. `source` is the text of the template the error is in, when
    /// known: where minijinja gives no detail, the offending expression is quoted from it.
    fn from_minijinja(
        fallback_template: &str,
        err: &minijinja::Error,
        source: Option<&str>,
    ) -> Self {
        let mut reason = err.kind().to_string();
        if let Some(detail) = err.detail() {
            reason = format!("{reason}: {detail}");
        }
        let quoted = err
            .range()
            .filter(|_| err.detail().is_none())
            .and_then(|range| source?.get(range))
            .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|text| !text.is_empty() && text.len() <= 80);
        if let Some(text) = quoted {
            reason = format!("{reason} (in `{text}`)");
        }
        Self {
            template: err.name().unwrap_or(fallback_template).to_string(),
            line: err.line(),
            reason,
        }
    }
}

/// Every problem found while loading a template folder.
#[derive(Debug)]
pub struct TemplateSetError {
    pub dir: PathBuf,
    pub problems: Vec<TemplateError>,
}

impl fmt::Display for TemplateSetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "templates in {} have {} problem(s):",
            self.dir.display(),
            self.problems.len()
        )?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TemplateSetError {}

/// The template files one notification needs, relative to the templates folder.
pub fn template_names(kind: &str, audience: Audience) -> [String; 3] {
    [
        format!("{kind}/{audience}.subject.txt"),
        format!("{kind}/{audience}.txt"),
        format!("{kind}/{audience}.html"),
    ]
}

/// A compiled template folder.
pub struct TemplateSet {
    env: Environment<'static>,
    count: usize,
}

impl fmt::Debug for TemplateSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TemplateSet")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl TemplateSet {
    /// Compiles every `.txt` and `.html` file under `dir` and checks that each configured
    /// notification has its three templates. All problems are reported together.
    pub fn load(dir: &Path, catalog: &Catalog) -> Result<Self, TemplateSetError> {
        let (set, problems) = Self::load_all(dir, catalog);
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(TemplateSetError {
                dir: dir.to_path_buf(),
                problems,
            })
        }
    }

    /// Like [`load`](Self::load), but keeps what compiled alongside the problems, so that
    /// `herald check` can go on to render with the templates that are fine.
    pub fn load_all(dir: &Path, catalog: &Catalog) -> (Self, Vec<TemplateError>) {
        let mut env = new_environment();
        let mut problems = Vec::new();
        let mut count = 0;

        let mut files = Vec::new();
        if let Err(err) = collect_template_files(dir, dir, &mut files) {
            problems.push(TemplateError {
                template: ".".to_string(),
                line: None,
                reason: format!("cannot read the templates folder: {err}"),
            });
        }
        files.sort();
        for (name, path) in files {
            match std::fs::read_to_string(&path) {
                Ok(source) => match env.add_template_owned(name.clone(), source.clone()) {
                    Ok(()) => count += 1,
                    Err(err) => {
                        problems.push(TemplateError::from_minijinja(&name, &err, Some(&source)))
                    }
                },
                Err(err) => problems.push(TemplateError {
                    template: name,
                    line: None,
                    reason: format!("cannot read: {err}"),
                }),
            }
        }

        for spec in catalog.specs() {
            for audience in &spec.audiences {
                for name in template_names(&spec.kind, *audience) {
                    if env.get_template(&name).is_err()
                        && !problems.iter().any(|p| p.template == name)
                    {
                        problems.push(TemplateError {
                            template: name,
                            line: None,
                            reason: format!(
                                "missing: notification {} to the {audience} needs this template",
                                spec.kind
                            ),
                        });
                    }
                }
            }
        }

        (Self { env, count }, problems)
    }

    /// A set with no templates, until a validated one replaces it.
    pub fn empty() -> Self {
        Self {
            env: new_environment(),
            count: 0,
        }
    }

    /// How many template files were compiled.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn render(&self, name: &str, context: &Value) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(name)
            .map_err(|err| TemplateError::from_minijinja(name, &err, None))?;
        template.render(context).map_err(|err| {
            let failing = err.name().and_then(|n| self.env.get_template(n).ok());
            TemplateError::from_minijinja(name, &err, failing.as_ref().map(|t| t.source()))
        })
    }
}

fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env.set_formatter(html_formatter);
    env.add_filter("utc", filters::utc);
    env.add_filter("date", filters::date);
    env.add_filter("add_days", filters::add_days);
    env.add_filter("path_segment", filters::path_segment);
    env
}

/// minijinja's HTML escaping also escapes `/`, which turns every link into
/// `https:&#x2f;&#x2f;…`: valid, but unreadable in the source and in tests. Escaping `& < > " '`
/// is what HTML requires for text and quoted attributes, so that is what this does.
fn html_formatter(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    if state.auto_escape() != &AutoEscape::Html || value.is_safe() {
        return minijinja::escape_formatter(out, state, value);
    }
    let formatted;
    let text = match value.as_str() {
        Some(text) => text,
        None => {
            formatted = value.to_string();
            &formatted
        }
    };
    let mut start = 0;
    for (index, byte) in text.bytes().enumerate() {
        let entity = match byte {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#39;",
            _ => continue,
        };
        out.write_str(&text[start..index])?;
        out.write_str(entity)?;
        start = index + 1;
    }
    out.write_str(&text[start..])?;
    Ok(())
}

fn collect_template_files(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(String, PathBuf)>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if file_name.starts_with('.') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect_template_files(root, &path, files)?;
        } else if file_name.ends_with(".txt") || file_name.ends_with(".html") {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            let name = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            files.push((name, path));
        }
    }
    Ok(())
}

/// Renders notifications with a template set, the brand and the preference-link signer.
#[derive(Debug)]
pub struct Renderer {
    /// The set in use. A render takes its own reference first and uses that set from start
    /// to end, so a reload in the middle of a message never mixes two sets.
    templates: RwLock<Arc<TemplateSet>>,
    /// The brand as templates see it, converted once: every message shares it.
    brand: Value,
    signer: PreferenceSigner,
}

impl Renderer {
    pub fn new(templates: TemplateSet, brand: Brand, signer: PreferenceSigner) -> Self {
        Self {
            templates: RwLock::new(Arc::new(templates)),
            brand: Value::from(minijinja::value::Serde(&brand)),
            signer,
        }
    }

    /// The template set in use now.
    pub fn templates(&self) -> Arc<TemplateSet> {
        self.templates
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts a new template set in use, in one step: the next render uses it.
    pub fn replace_templates(&self, templates: TemplateSet) {
        *self
            .templates
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(templates);
    }

    /// Renders one notification for one recipient as of `now` (which sets the copyright
    /// year). The subject is folded to a single line.
    pub fn render(
        &self,
        kind: &str,
        audience: Audience,
        payload: &Payload,
        recipient: RecipientView<'_>,
        now: DateTime<Utc>,
    ) -> Result<RenderedMessage, TemplateError> {
        let templates = self.templates();
        let context = self.context(kind, audience, payload, recipient, now);
        let [subject, text, html] = template_names(kind, audience);
        Ok(RenderedMessage {
            subject: single_line(&templates.render(&subject, &context)?),
            text: templates.render(&text, &context)?,
            html: templates.render(&html, &context)?,
        })
    }

    /// Renders each of a notification's three templates from `templates` (in use or not) on
    /// its own and returns every error, not only the first: what `herald check` and a reload
    /// report.
    pub fn check(
        &self,
        templates: &TemplateSet,
        kind: &str,
        audience: Audience,
        payload: &Payload,
        recipient: RecipientView<'_>,
        now: DateTime<Utc>,
    ) -> Vec<TemplateError> {
        let context = self.context(kind, audience, payload, recipient, now);
        let [subject, text, html] = template_names(kind, audience);
        let mut errors = Vec::new();
        match templates.render(&subject, &context) {
            Ok(rendered) if single_line(&rendered).is_empty() => errors.push(TemplateError {
                template: subject,
                line: None,
                reason: "renders an empty subject".into(),
            }),
            Ok(_) => {}
            Err(err) => errors.push(err),
        }
        errors.extend(
            [text, html]
                .iter()
                .filter_map(|name| templates.render(name, &context).err()),
        );
        errors
    }

    fn context(
        &self,
        kind: &str,
        audience: Audience,
        payload: &Payload,
        recipient: RecipientView<'_>,
        now: DateTime<Utc>,
    ) -> Value {
        // One flat map: a merged context would look each name up in two. herald's own names
        // go in last, so that they win over a payload field of the same name.
        let mut context: HashMap<Value, Value> = payload
            .fields
            .iter()
            .map(|(name, value)| {
                (
                    Value::from(name.as_str()),
                    Value::from(minijinja::value::Serde(value)),
                )
            })
            .collect();
        let preferences_url = self.signer.link(recipient.contact_id, recipient.email);
        let recipient = minijinja::context! { name => recipient.name, email => recipient.email };
        for (name, value) in [
            ("brand", self.brand.clone()),
            ("recipient", recipient),
            ("audience", Value::from(audience.as_str())),
            ("kind", Value::from(kind)),
            ("preferences_url", Value::from(preferences_url)),
            ("year", Value::from(now.year())),
        ] {
            context.insert(Value::from(name), value);
        }
        Value::from_object(context)
    }
}

/// A recipient for previews and validation: no real contact's name, address or preference
/// link.
pub fn sample_recipient(audience: Audience) -> RecipientView<'static> {
    match audience {
        Audience::Provider => RecipientView {
            contact_id: "sample-provider",
            name: "Sample Provider Contact",
            email: "provider@example.com",
        },
        Audience::Customer => RecipientView {
            contact_id: "sample-customer",
            name: "Sample Customer Contact",
            email: "customer@example.com",
        },
    }
}

/// A subject is one header line: every run of whitespace or control characters (CR and LF
/// included) becomes one space, so no template or payload value can start a new header.
fn single_line(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::single_line;

    #[test]
    fn subject_is_folded_to_one_line() {
        assert_eq!(
            single_line("  Approval\r\nBcc: x@y\t needed \n"),
            "Approval Bcc: x@y needed"
        );
    }
}
