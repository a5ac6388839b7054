//! Property tests over what producers and the directory control: payload validation never
//! panics and either refuses with a reason naming the field or returns a payload that keeps
//! its promises; and every payload that validates renders and builds into a message with
//! exactly herald's headers, whose subject, name and bodies read back as rendered.
//!
//! The default run is short (`PROPTEST_CASES`, 256 unless set); a longer one is
//! `PROPTEST_CASES=5000 cargo test --test fuzz`.

mod support;

use herald::directory::display_name;
use herald::outbox::PayloadError;
use herald::outbox::schema::{FieldType, is_disallowed_char};
use herald::render::RecipientView;
use proptest::prelude::*;
use serde_json::{Map, Value};
use support::mime::{SHIPPED, notifications, parse_checked, sample};

/// Characters and fragments that have broken mail, HTML or templates somewhere.
const TRICKY: [&str; 36] = [
    "\r\n",
    "\n",
    "\r",
    "\t",
    "\0",
    "\u{1b}",
    "\u{7f}",
    "\u{85}",
    "\u{a0}",
    "\u{2028}",
    "\u{202e}",
    "\u{2066}",
    "\u{200d}",
    "\u{feff}",
    "\u{301}",
    "<script>",
    "&amp;",
    "\"",
    "'",
    "{{ 7*7 }}",
    "{%",
    "%}",
    "=?utf-8?B?4oCu?=",
    "=?",
    "?=",
    "Bcc: ",
    ":",
    ";",
    ",",
    "@",
    "\\",
    "..",
    "/",
    "東京",
    "🚀",
    "עברית",
];

fn tricky_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => any::<char>().prop_map(String::from),
        2 => "[a-zA-Z0-9 ]{1,8}",
        2 => prop::sample::select(&TRICKY[..]).prop_map(str::to_string),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
}

/// Text a payload may carry: nothing `is_disallowed_char` refuses, not blank, and now and
/// then near the 2,000-character limit.
fn printable_text() -> impl Strategy<Value = String> {
    let short = tricky_text().prop_map(|text| {
        text.chars()
            .filter(|&c| !is_disallowed_char(c))
            .collect::<String>()
    });
    let long = ("[^\\p{Cc}]{1,8}", 200..260usize).prop_map(|(unit, times)| {
        let text = unit.repeat(times);
        text.chars().take(2_000).collect()
    });
    prop_oneof![9 => short, 1 => long].prop_filter("not blank", |text: &String| {
        !text.trim().is_empty() && !text.chars().any(is_disallowed_char)
    })
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        tricky_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(tricky_text(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn kind() -> impl Strategy<Value = String> {
    let kinds: Vec<String> = SHIPPED
        .settings
        .catalog
        .kinds()
        .map(str::to_string)
        .collect();
    prop::sample::select(kinds)
}

/// Every place a value can go in a kind's payload: each field, and inside companies and
/// people each member.
fn paths(kind: &str) -> Vec<Vec<String>> {
    let spec = SHIPPED.settings.catalog.get(kind).unwrap();
    let mut paths = vec![vec!["undeclared".to_string()]];
    for field in &spec.fields {
        paths.push(vec![field.name.clone()]);
        let members: &[&str] = match field.ty {
            FieldType::Company => &["company_id", "name"],
            FieldType::Person => &["name", "email"],
            _ => &[],
        };
        for member in members {
            paths.push(vec![field.name.clone(), member.to_string()]);
        }
    }
    paths
}

fn set(payload: &mut Value, path: &[String], value: Value) {
    let (last, parents) = path.split_last().unwrap();
    let mut at = payload;
    for key in parents {
        at = &mut at[key.as_str()];
    }
    at[last.as_str()] = value;
}

/// What every validated payload promises the templates and the message builder: exactly
/// the declared fields, and text that is one line of printable characters.
fn assert_keeps_its_promises(kind: &str, fields: &Map<String, Value>) {
    let spec = SHIPPED.settings.catalog.get(kind).unwrap();
    let declared: Vec<&str> = spec.fields.iter().map(|f| f.name.as_str()).collect();
    let mut kept: Vec<&str> = fields.keys().map(String::as_str).collect();
    let mut expected = declared.clone();
    kept.sort_unstable();
    expected.sort_unstable();
    assert_eq!(kept, expected);
    for field in &spec.fields {
        assert_texts_printable(&fields[&field.name]);
        if field.ty == FieldType::Datetime && fields[&field.name].is_string() {
            let text = fields[&field.name].as_str().unwrap();
            let at = chrono::DateTime::parse_from_rfc3339(text).unwrap();
            assert!(text.ends_with('Z') && (1970..=2999).contains(&chrono::Datelike::year(&at)));
        }
    }
}

fn assert_texts_printable(value: &Value) {
    match value {
        Value::String(text) => {
            assert!(!text.trim().is_empty() && text.chars().count() <= 2_000);
            assert!(!text.chars().any(is_disallowed_char), "{text:?}");
        }
        Value::Object(map) => map.values().for_each(assert_texts_printable),
        Value::Array(_) => panic!("no field holds an array"),
        _ => {}
    }
}

fn fold(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn html_escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

proptest! {
    #[test]
    fn any_bytes_are_refused_with_a_reason_or_accepted_never_a_panic(
        kind in prop_oneof![kind(), Just("vxc.unknown".to_string())],
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Err(err) = SHIPPED.validate(&kind, &bytes) {
            let reason = err.to_string();
            prop_assert!(reason.starts_with("payload ") || reason.starts_with("unknown kind"));
        }
    }

    #[test]
    fn a_sample_with_bytes_changed_is_refused_with_a_reason_or_keeps_its_promises(
        kind in kind(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
    ) {
        let mut bytes = sample(&kind).to_string().into_bytes();
        for (at, byte, how) in edits {
            let at = at.index(bytes.len() + 1);
            match how {
                0 => bytes.insert(at, byte),
                1 if at < bytes.len() => drop(bytes.remove(at)),
                _ if at < bytes.len() => bytes[at] = byte,
                _ => bytes.push(byte),
            }
        }
        match SHIPPED.validate(&kind, &bytes) {
            Ok(payload) => assert_keeps_its_promises(&kind, &payload.fields),
            Err(err) => prop_assert!(err.to_string().starts_with("payload ")),
        }
    }

    #[test]
    fn any_json_document_is_refused_with_a_reason_or_keeps_its_promises(
        kind in kind(),
        document in json(),
    ) {
        match SHIPPED.validate(&kind, document.to_string()) {
            Ok(payload) => assert_keeps_its_promises(&kind, &payload.fields),
            Err(PayloadError::NotAnObject(_) | PayloadError::Field { .. }) => {}
            Err(other) => prop_assert!(false, "{other}"),
        }
    }

    #[test]
    fn any_value_in_any_field_is_refused_naming_that_field_or_keeps_its_promises(
        (kind, path) in kind().prop_flat_map(|kind| {
            let paths = paths(&kind);
            (Just(kind), prop::sample::select(paths))
        }),
        value in json(),
    ) {
        let mut payload = sample(&kind);
        set(&mut payload, &path, value);
        match SHIPPED.validate(&kind, payload.to_string()) {
            Ok(valid) => assert_keeps_its_promises(&kind, &valid.fields),
            Err(PayloadError::Field { field, problem }) => {
                prop_assert!(field.starts_with(&path[0]), "{field} for {path:?}: {problem}");
                prop_assert!(!problem.is_empty() && !problem.contains('\n'));
            }
            Err(other) => prop_assert!(false, "{other}"),
        }
    }

    #[test]
    fn a_number_is_accepted_only_as_the_whole_number_it_says(
        literal in "-?[0-9]{1,22}(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?",
    ) {
        let text = sample("vxc.speed_change_requested").to_string().replace("2000", &literal);
        match SHIPPED.validate("vxc.speed_change_requested", &text) {
            Ok(payload) => {
                let number: i64 = literal.parse().expect("only integer literals are accepted");
                prop_assert!(number >= 1);
                prop_assert_eq!(payload.fields["speed_mbps"].as_i64(), Some(number));
            }
            Err(err) => prop_assert!(err.to_string().starts_with("payload ")),
        }
    }

    #[test]
    fn a_timestamp_that_validates_renders_in_every_notification(
        at in "[0-9]{4}-[0-1][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-6][0-9]:[0-6][0-9](\\.[0-9]{1,12})?([Zz]|[+-][0-2][0-9]:[0-6][0-9])",
        days in 1..=3650i64,
    ) {
        for (kind, audience) in notifications() {
            let spec = SHIPPED.settings.catalog.get(&kind).unwrap();
            let mut payload = sample(&kind);
            for field in spec.fields.iter().filter(|f| f.ty == FieldType::Datetime) {
                payload[&field.name] = at.clone().into();
            }
            if kind == "vxc.approval_required" {
                payload["approval_window_days"] = days.into();
            }
            let Ok(payload) = SHIPPED.validate(&kind, payload.to_string()) else {
                continue;
            };
            // What the email shows is a time that exists: second 60 only as 23:59:60 UTC.
            for field in spec.fields.iter().filter(|f| f.ty == FieldType::Datetime) {
                let stored = payload.fields[&field.name].as_str().unwrap();
                let (clock, seconds) = (&stored[11..16], &stored[17..19]);
                prop_assert!(seconds < "60" || (seconds == "60" && clock == "23:59"), "{at}: {stored}");
            }
            let dana = RecipientView {
                contact_id: "acme-dana",
                name: "Dana Smith",
                email: "dana@acme.example",
            };
            let (_, bytes) = SHIPPED.build(&kind, audience, &payload, dana);
            parse_checked(&bytes);
        }
    }

    #[test]
    fn a_payload_that_validates_builds_a_message_that_reads_back_as_rendered(
        (kind, audience) in prop::sample::select(notifications()),
        service_name in printable_text(),
        reference in printable_text(),
        company in printable_text(),
        requester in printable_text(),
        reason in printable_text(),
        contact_name in prop_oneof![tricky_text(), printable_text()],
    ) {
        let mut payload = sample(&kind);
        payload["service_name"] = service_name.clone().into();
        payload["reference"] = reference.clone().into();
        payload["customer"]["name"] = company.clone().into();
        payload["provider"]["name"] = company.into();
        payload["requested_by"]["name"] = requester.into();
        if kind == "vxc.denied" {
            payload["denial_reason"] = reason.into();
        }
        let payload = match SHIPPED.validate(&kind, payload.to_string()) {
            Ok(payload) => payload,
            Err(err) => {
                prop_assert!(reference.trim_matches('.').is_empty(), "{err}");
                return Ok(());
            }
        };
        let name = display_name(&contact_name, "dana@acme.example");
        let recipient = RecipientView {
            contact_id: "acme-dana",
            name: &name,
            email: "dana@acme.example",
        };
        let (rendered, bytes) = SHIPPED.build(&kind, audience, &payload, recipient);

        let message = parse_checked(&bytes);
        prop_assert_eq!(message.subject(), Some(rendered.subject.as_str()));
        prop_assert!(rendered.subject.contains(&fold(&service_name)));
        prop_assert!(rendered.subject.contains(&fold(&reference)));
        let to = message.to().unwrap().first().unwrap();
        prop_assert_eq!(to.name(), Some(name.as_str()));
        prop_assert_eq!(to.address(), Some("dana@acme.example"));

        let text = message.body_text(0).unwrap().replace("\r\n", "\n");
        prop_assert_eq!(&text, &rendered.text);
        prop_assert!(text.contains(&service_name));
        let greeting = format!("Dear {name},");
        prop_assert!(text.contains(&greeting));
        let html = message.body_html(0).unwrap().replace("\r\n", "\n");
        prop_assert_eq!(&html, &rendered.html);
        prop_assert!(html.contains(&html_escaped(&service_name)));
    }
}
