//! The notification catalogue: for each outbox kind, its audiences and the payload fields it
//! carries beyond the common ones. Payloads are checked against it before anyone is emailed,
//! so a bad row fails alone with a reason that names the field.
//!
//! A new kind is configuration (this catalogue and a group) plus templates; no code.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde_json::{Map, Value};

use super::Audience;
use crate::config::raw::{RawField, RawNotification};

/// Names the daemon puts into every template context; a payload field may not shadow them.
const RESERVED: [&str; 6] = [
    "brand",
    "recipient",
    "audience",
    "kind",
    "preferences_url",
    "year",
];

/// The longest text value accepted in a payload field; longer is almost surely a producer bug.
const MAX_TEXT_CHARS: usize = 2_000;

/// The largest payload accepted, in bytes. The stores read at most one byte more, so an
/// oversized row costs no more memory than this to refuse.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// The years a timestamp may fall in: wide for any real order, narrow enough that date
/// arithmetic in templates (`add_days`) cannot leave the calendar.
const YEARS: std::ops::RangeInclusive<i32> = 1970..=2999;

/// What a payload field must hold.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldType {
    /// A non-empty string, optionally limited to a set of values.
    Text { one_of: Option<Vec<String>> },
    /// A service reference: text that templates put into portal links as a path segment, so
    /// it may not be `.` or `..` (which URL parsers resolve even when percent-encoded).
    Reference,
    /// An RFC 3339 timestamp; stored for templates as UTC (`2020-05-22T04:39:00Z`).
    Datetime,
    /// A whole number within bounds.
    Integer { min: Option<i64>, max: Option<i64> },
    /// `{ company_id, name }`: a company of the directory.
    Company,
    /// `{ name, email }`: a person named in the wording.
    Person,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FieldSpec {
    pub name: String,
    pub ty: FieldType,
    pub required: bool,
    /// The value used when an optional field is absent (`null` when none is configured).
    pub default: Value,
}

/// One outbox kind.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationSpec {
    pub kind: String,
    pub audiences: Vec<Audience>,
    pub fields: Vec<FieldSpec>,
}

/// All configured kinds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    kinds: BTreeMap<String, NotificationSpec>,
}

/// Problems in the `notifications` section of the configuration, each with its path.
#[derive(Debug)]
pub struct CatalogError(pub Vec<String>);

/// Why a payload was refused. The message names the field, as operators fix rows by field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("unknown kind {0:?}: no notification is configured for it")]
    UnknownKind(String),
    #[error("payload is not valid JSON: {0}")]
    Malformed(String),
    #[error("payload is larger than the limit of {MAX_PAYLOAD_BYTES} bytes")]
    TooLarge,
    #[error("payload must be a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("payload field {field:?}: {problem}")]
    Field { field: String, problem: String },
}

/// A payload that passed its kind's checks: every declared field is present (absent optional
/// ones hold their default or `null`), normalised, and nothing undeclared is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub fields: Map<String, Value>,
}

impl Payload {
    /// The service reference, which every kind carries and every log line shows.
    pub fn reference(&self) -> &str {
        self.fields["reference"].as_str().unwrap_or_default()
    }

    /// The directory id of the company addressed as `audience`.
    pub fn company_id(&self, audience: Audience) -> &str {
        self.fields[audience.as_str()]["company_id"]
            .as_str()
            .unwrap_or_default()
    }
}

fn common_fields() -> Vec<FieldSpec> {
    let required = |name: &str, ty| FieldSpec {
        name: name.to_string(),
        ty,
        required: true,
        default: Value::Null,
    };
    vec![
        required("reference", FieldType::Reference),
        required("service_name", FieldType::Text { one_of: None }),
        required("customer", FieldType::Company),
        required("provider", FieldType::Company),
        required("requested_by", FieldType::Person),
    ]
}

impl Catalog {
    /// Builds the catalogue from the `notifications` section, listing every problem found.
    pub fn from_config(raw: &BTreeMap<String, RawNotification>) -> Result<Self, CatalogError> {
        let mut problems = Vec::new();
        let mut kinds = BTreeMap::new();
        if raw.is_empty() {
            problems.push("notifications: no kind is configured".to_string());
        }
        for (kind, notification) in raw {
            let path = format!("notifications.{kind}");
            let mut audiences = Vec::new();
            for audience in &notification.audiences {
                match Audience::parse(audience) {
                    Some(a) if !audiences.contains(&a) => audiences.push(a),
                    Some(_) => problems.push(format!("{path}.audiences: {audience} listed twice")),
                    None => problems.push(format!(
                        "{path}.audiences: unknown audience {audience:?}; expected provider or customer"
                    )),
                }
            }
            if audiences.is_empty() {
                problems.push(format!(
                    "{path}.audiences: at least one audience is required"
                ));
            }
            let mut fields = common_fields();
            for (name, field) in &notification.fields {
                let field_path = format!("{path}.fields.{name}");
                if RESERVED.contains(&name.as_str()) || fields.iter().any(|f| &f.name == name) {
                    problems.push(format!("{field_path}: the name {name:?} is reserved"));
                    continue;
                }
                match field_spec(name, field) {
                    Ok(spec) => fields.push(spec),
                    Err(problem) => problems.push(format!("{field_path}: {problem}")),
                }
            }
            kinds.insert(
                kind.clone(),
                NotificationSpec {
                    kind: kind.clone(),
                    audiences,
                    fields,
                },
            );
        }
        if problems.is_empty() {
            Ok(Self { kinds })
        } else {
            Err(CatalogError(problems))
        }
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    pub fn get(&self, kind: &str) -> Option<&NotificationSpec> {
        self.kinds.get(kind)
    }

    pub fn specs(&self) -> impl Iterator<Item = &NotificationSpec> {
        self.kinds.values()
    }

    /// Checks a raw outbox payload (UTF-8 JSON) against its kind.
    pub fn validate(
        &self,
        kind: &str,
        payload: impl AsRef<[u8]>,
    ) -> Result<(&NotificationSpec, Payload), PayloadError> {
        let spec = self
            .get(kind)
            .ok_or_else(|| PayloadError::UnknownKind(kind.to_string()))?;
        let payload = payload.as_ref();
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(PayloadError::TooLarge);
        }
        // JSON must not start with a byte-order mark (RFC 8259 section 8.1); say so, rather
        // than "expected value at line 1 column 1" about a character no editor shows.
        if payload.starts_with(b"\xEF\xBB\xBF") {
            return Err(PayloadError::Malformed(
                "it starts with a UTF-8 byte-order mark (bytes EF BB BF); write it without one"
                    .into(),
            ));
        }
        let value: Value = serde_json::from_slice(payload)
            .map_err(|err| PayloadError::Malformed(err.to_string()))?;
        let Value::Object(object) = value else {
            return Err(PayloadError::NotAnObject(json_type(&value)));
        };
        let mut fields = Map::new();
        for field in &spec.fields {
            let value = match object.get(&field.name) {
                None | Some(Value::Null) if field.required => {
                    return Err(field_error(&field.name, "is required but missing"));
                }
                None | Some(Value::Null) => field.default.clone(),
                Some(value) => check_value(&field.name, &field.ty, value)?,
            };
            fields.insert(field.name.clone(), value);
        }
        Ok((spec, Payload { fields }))
    }
}

fn field_spec(name: &str, raw: &RawField) -> Result<FieldSpec, String> {
    let (type_name, optional, default, min, max, one_of) = match raw {
        RawField::Type(type_name) => (type_name.as_str(), false, None, None, None, None),
        RawField::Full(spec) => (
            spec.kind.as_str(),
            spec.optional,
            spec.default.clone(),
            spec.min,
            spec.max,
            spec.one_of.clone(),
        ),
    };
    if type_name != "integer" && (min.is_some() || max.is_some()) {
        return Err("min and max apply to integer fields only".into());
    }
    if type_name != "text" && one_of.is_some() {
        return Err("one_of applies to text fields only".into());
    }
    let ty = match type_name {
        "text" => FieldType::Text { one_of },
        "datetime" => FieldType::Datetime,
        "integer" => match (min, max) {
            (Some(min), Some(max)) if min > max => {
                return Err(format!("min ({min}) is greater than max ({max})"));
            }
            _ => FieldType::Integer { min, max },
        },
        other => {
            return Err(format!(
                "unknown type {other:?}; expected text, datetime or integer"
            ));
        }
    };
    let default = match default {
        Some(value) => check_value(name, &ty, &value).map_err(|err| format!("default: {err}"))?,
        None => Value::Null,
    };
    Ok(FieldSpec {
        name: name.to_string(),
        ty,
        required: !optional && default.is_null(),
        default,
    })
}

fn field_error(field: &str, problem: impl Into<String>) -> PayloadError {
    PayloadError::Field {
        field: field.to_string(),
        problem: problem.into(),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_value(field: &str, ty: &FieldType, value: &Value) -> Result<Value, PayloadError> {
    match ty {
        FieldType::Reference => {
            let text = check_text(field, value)?;
            if text.trim_matches('.').is_empty() {
                return Err(field_error(
                    field,
                    format!("{text:?} cannot be a service reference"),
                ));
            }
            Ok(Value::String(text.to_string()))
        }
        FieldType::Text { one_of } => {
            let text = check_text(field, value)?;
            if let Some(allowed) = one_of
                && !allowed.iter().any(|a| a == text)
            {
                return Err(field_error(
                    field,
                    format!("{text:?} is not one of {}", allowed.join(", ")),
                ));
            }
            Ok(Value::String(text.to_string()))
        }
        FieldType::Datetime => {
            let text = value.as_str().ok_or_else(|| {
                field_error(
                    field,
                    format!("expected an RFC 3339 timestamp, found {}", json_type(value)),
                )
            })?;
            let parsed = DateTime::parse_from_rfc3339(text).map_err(|err| {
                field_error(
                    field,
                    format!("{text:?} is not an RFC 3339 timestamp ({err})"),
                )
            })?;
            let utc = parsed.with_timezone(&Utc);
            if !YEARS.contains(&utc.year()) {
                return Err(field_error(
                    field,
                    format!(
                        "{text:?} is outside the years {}-{} that herald accepts",
                        YEARS.start(),
                        YEARS.end()
                    ),
                ));
            }
            // chrono reads a leap second (`:60`) in any minute, but one is only ever inserted
            // as the last second of a UTC day; anywhere else it is a time that never existed,
            // and the email would show it as such.
            if utc.nanosecond() >= 1_000_000_000 && (utc.hour(), utc.minute()) != (23, 59) {
                return Err(field_error(
                    field,
                    format!(
                        "{text:?} has a leap second (:60) at {}, which is not a time that exists; \
                         a leap second can only be 23:59:60 UTC",
                        utc.format("%H:%M UTC")
                    ),
                ));
            }
            Ok(Value::String(
                utc.to_rfc3339_opts(SecondsFormat::Secs, true),
            ))
        }
        FieldType::Integer { min, max } => {
            let number = value.as_i64().ok_or_else(|| match value {
                Value::Number(_) => {
                    field_error(field, format!("{value} is not a whole number in range"))
                }
                _ => field_error(
                    field,
                    format!("expected a whole number, found {}", json_type(value)),
                ),
            })?;
            if let Some(min) = min
                && number < *min
            {
                return Err(field_error(
                    field,
                    format!("{number} is below the minimum {min}"),
                ));
            }
            if let Some(max) = max
                && number > *max
            {
                return Err(field_error(
                    field,
                    format!("{number} is above the maximum {max}"),
                ));
            }
            Ok(Value::from(number))
        }
        FieldType::Company => {
            let object = check_object(field, value)?;
            let company_id =
                check_text(&format!("{field}.company_id"), member(object, "company_id"))?;
            let name = check_text(&format!("{field}.name"), member(object, "name"))?;
            Ok(serde_json::json!({ "company_id": company_id, "name": name }))
        }
        FieldType::Person => {
            let object = check_object(field, value)?;
            let name = check_text(&format!("{field}.name"), member(object, "name"))?;
            let email = check_text(&format!("{field}.email"), member(object, "email"))?;
            if !crate::directory::is_plausible_email(email) {
                return Err(field_error(
                    &format!("{field}.email"),
                    format!("{email:?} is not an email address"),
                ));
            }
            Ok(serde_json::json!({ "name": name, "email": email }))
        }
    }
}

fn member<'a>(object: &'a Map<String, Value>, key: &str) -> &'a Value {
    object.get(key).unwrap_or(&Value::Null)
}

fn check_object<'a>(field: &str, value: &'a Value) -> Result<&'a Map<String, Value>, PayloadError> {
    value.as_object().ok_or_else(|| {
        field_error(
            field,
            format!("expected an object, found {}", json_type(value)),
        )
    })
}

/// Control characters and line breaks (U+2028 and U+2029 included), and the Unicode
/// bidirectional overrides, which can make a name read differently from what it is.
pub fn is_disallowed_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn check_text<'a>(field: &str, value: &'a Value) -> Result<&'a str, PayloadError> {
    let text = match value {
        Value::Null => return Err(field_error(field, "is required but missing")),
        Value::String(text) => text,
        other => {
            return Err(field_error(
                field,
                format!("expected a string, found {}", json_type(other)),
            ));
        }
    };
    if text.trim().is_empty() {
        return Err(field_error(field, "must not be empty"));
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(field_error(
            field,
            format!("is longer than {MAX_TEXT_CHARS} characters"),
        ));
    }
    if let Some(bad) = text.chars().find(|&c| is_disallowed_char(c)) {
        return Err(field_error(
            field,
            format!(
                "contains the control character U+{:04X}; text values must be one line of printable text",
                u32::from(bad)
            ),
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(yaml: &str) -> Result<Catalog, CatalogError> {
        let raw: BTreeMap<String, RawNotification> = serde_saphyr::from_str(yaml).unwrap();
        Catalog::from_config(&raw)
    }

    const SAMPLE: &str = r#"{"reference": "r1", "service_name": "s",
        "customer": {"company_id": "acme", "name": "Acme"},
        "provider": {"company_id": "cloudco", "name": "CloudCo"},
        "requested_by": {"name": "Dana", "email": "dana@acme.example"}"#;

    #[test]
    fn configuration_mistakes_are_listed_with_their_paths() {
        let Err(CatalogError(problems)) = catalog(
            "k:\n  audiences: [provider, partner, provider]\n  fields:\n    brand: text\n    n: float\n",
        ) else {
            panic!("should be refused");
        };
        let all = problems.join("\n");
        assert!(
            all.contains("notifications.k.audiences: unknown audience \"partner\""),
            "{all}"
        );
        assert!(
            all.contains("notifications.k.audiences: provider listed twice"),
            "{all}"
        );
        assert!(
            all.contains("notifications.k.fields.brand: the name \"brand\" is reserved"),
            "{all}"
        );
        assert!(
            all.contains("notifications.k.fields.n: unknown type \"float\""),
            "{all}"
        );
    }

    #[test]
    fn values_are_normalised_and_defaults_filled_in() {
        let catalog = catalog(
            "k:\n  audiences: [customer]\n  fields:\n    at: datetime\n    days: { type: integer, min: 1, default: 60 }\n    note: { type: text, optional: true }\n",
        )
        .unwrap();
        let payload = format!("{SAMPLE}, \"at\": \"2020-05-22T14:39:00+10:00\", \"extra\": 1}}");
        let (_, valid) = catalog.validate("k", &payload).unwrap();
        assert_eq!(valid.fields["at"], "2020-05-22T04:39:00Z");
        assert_eq!(valid.fields["days"], 60);
        assert_eq!(valid.fields["note"], Value::Null);
        assert!(
            !valid.fields.contains_key("extra"),
            "unknown fields are ignored"
        );
        assert_eq!(valid.reference(), "r1");
        assert_eq!(valid.company_id(Audience::Customer), "acme");
    }

    #[test]
    fn a_byte_order_mark_is_named_as_the_problem() {
        let catalog = catalog("k:\n  audiences: [customer]\n").unwrap();
        let err = catalog
            .validate("k", format!("\u{feff}{SAMPLE}}}"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload is not valid JSON: it starts with a UTF-8 byte-order mark (bytes EF BB BF); \
             write it without one"
        );
        assert!(catalog.validate("k", format!("{SAMPLE}}}")).is_ok());
    }

    #[test]
    fn integers_must_be_whole_and_in_range() {
        let catalog = catalog(
            "k:\n  audiences: [provider]\n  fields:\n    n: { type: integer, min: 1, max: 10 }\n",
        )
        .unwrap();
        for (value, words) in [
            ("0", "below the minimum 1"),
            ("11", "above the maximum 10"),
            ("2.5", "not a whole number"),
            ("1e400", "not valid JSON"),
            ("\"3\"", "expected a whole number, found a string"),
            ("null", "required but missing"),
        ] {
            let err = catalog
                .validate("k", format!("{SAMPLE}, \"n\": {value}}}"))
                .unwrap_err();
            assert!(err.to_string().contains(words), "{value}: {err}");
        }
    }
}
