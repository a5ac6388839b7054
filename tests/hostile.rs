//! Hostile and broken input, from producers and from the directory: no value can add a header,
//! run template code or break HTML; non-ASCII text arrives exactly as written; oversized,
//! deep, mistyped and impossible values fail their own row with a reason; and a preference
//! link can only be used by the contact it was made for, on the page it was made for.
//!
//! Most of it goes through the library (the shipped configuration, no database). Where the
//! whole path matters (the directory written by the portal, a bad row next to good ones, the
//! `preferences verify` command) it goes through the binary.

mod support;

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald::config::{RecipientRules, Secret};
use herald::directory::{Contact, select_recipients};
use herald::outbox::{Audience, PayloadError};
use herald::render::message::{Envelope, build_message};
use herald::render::{PreferenceSigner, RecipientView, RenderedMessage, VerifyError};
use herald::store::Store;
use serde_json::{Value, json};
use support::mime::{SHIPPED, notifications, now, parse_checked, sample};
use support::{Backend, Options, Sink, TestEnv};

const DANA: RecipientView<'static> = RecipientView {
    contact_id: "acme-dana",
    name: "Dana Smith",
    email: "dana@acme.example",
};

/// Every text value of a payload, as a JSON pointer and as the field name a reason gives.
const TEXT_FIELDS: [(&str, &str); 10] = [
    ("/reference", "reference"),
    ("/service_name", "service_name"),
    ("/customer/company_id", "customer.company_id"),
    ("/customer/name", "customer.name"),
    ("/provider/company_id", "provider.company_id"),
    ("/provider/name", "provider.name"),
    ("/requested_by/name", "requested_by.name"),
    ("/requested_by/email", "requested_by.email"),
    ("/payer", "payer"),
    ("/denial_reason", "denial_reason"),
];

/// The sample of the kind that carries `pointer` (`payer` and `denial_reason` are not common).
fn kind_with(pointer: &str) -> &'static str {
    match pointer {
        "/payer" => "vxc.approval_required",
        "/denial_reason" => "vxc.denied",
        _ => "vxc.approved",
    }
}

fn with(kind: &str, pointer: &str, value: Value) -> String {
    let mut payload = sample(kind);
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    payload
        .pointer_mut(if parent.is_empty() { "" } else { parent })
        .unwrap()
        .as_object_mut()
        .unwrap()
        .insert(key.to_string(), value);
    payload.to_string()
}

/// The reason a payload is refused with; panics if it is accepted.
fn refusal(kind: &str, payload: impl AsRef<[u8]>) -> String {
    match SHIPPED.validate(kind, payload) {
        Ok(payload) => panic!("accepted: {:?}", payload.fields),
        Err(err) => err.to_string(),
    }
}

#[test]
fn a_control_character_in_any_payload_text_refuses_the_row_naming_field_and_character() {
    let hostile = [
        "\r\n", "\n", "\r", "\0", "\t", "\u{1b}", "\u{7f}", "\u{85}", "\u{2028}", "\u{2029}",
        "\u{202e}", "\u{2067}",
    ];
    for (pointer, field) in TEXT_FIELDS {
        for bad in hostile {
            let value = format!("Acme{bad}Bcc: evil@evil.example");
            let kind = kind_with(pointer);
            let reason = refusal(kind, with(kind, pointer, value.into()));
            let code = format!("U+{:04X}", u32::from(bad.chars().next().unwrap()));
            assert!(
                reason.starts_with(&format!(
                    "payload field {field:?}: contains the control character {code}"
                )),
                "{field} with {bad:?}: {reason}"
            );
        }
    }
}

#[test]
fn directory_names_with_line_breaks_reach_to_as_one_line_of_text() {
    let contact = |id: &str, name: &str, email: &str| Contact {
        id: id.into(),
        name: name.into(),
        email: email.into(),
        role: "company_admin".into(),
        active: true,
        groups: ["ordering".to_string()].into(),
    };
    let contacts = [
        contact(
            "a",
            "Dana\r\nBcc: evil@evil.example\r\n\r\nInjected body",
            "dana@acme.example",
        ),
        contact("b", "\r\n\t\u{202e} \u{2028}", "pat@acme.example"),
        contact(
            "c",
            "NOC\u{2028}Cc: evil@evil.example\u{1b}[31m",
            "noc@acme.example",
        ),
        contact("d", "x", "x@acme.example\r\nBcc: evil@evil.example"),
    ];
    let selection = select_recipients(&contacts, "ordering", &RecipientRules::domain_defaults());
    let unusable: Vec<&str> = selection
        .unusable
        .iter()
        .map(|(recipient, _)| recipient.contact_id.as_str())
        .collect();
    assert_eq!(unusable, ["d"], "an address with CRLF is never used");

    let payload = SHIPPED
        .validate("vxc.approved", sample("vxc.approved").to_string())
        .unwrap();
    let mut names = Vec::new();
    for recipient in &selection.recipients {
        let view = RecipientView {
            contact_id: &recipient.contact_id,
            name: &recipient.name,
            email: &recipient.email,
        };
        let (rendered, bytes) = SHIPPED.build("vxc.approved", Audience::Customer, &payload, view);
        let message = parse_checked(&bytes);
        let to = message.to().unwrap().first().unwrap();
        assert_eq!(to.address(), Some(recipient.email.as_str()));
        assert_eq!(to.name(), Some(recipient.name.as_str()));
        assert!(rendered.text.contains(&format!("Dear {},", recipient.name)));
        names.push(recipient.name.clone());
    }
    assert_eq!(
        names,
        [
            "Dana Bcc: evil@evil.example Injected body",
            "pat@acme.example",
            "NOC Cc: evil@evil.example [31m",
        ]
    );
}

#[test]
fn the_message_builder_adds_no_header_even_for_values_herald_never_passes_it() {
    // Herald cleans names and folds subjects before building; this is the layer under that.
    let rendered = RenderedMessage {
        subject: "Hi\r\nBcc: evil@evil.example\nX-Evil: 1\r\rTo: evil@evil.example".into(),
        text: "body".into(),
        html: "<p>body</p>".into(),
    };
    for (name, email) in [
        ("Dana\r\nBcc: evil@evil.example", "dana@acme.example"),
        ("Dana\nCc: evil@evil.example\n\nbody", "dana@acme.example"),
        ("\"Dana\\\" <evil@evil.example>, \"", "dana@acme.example"),
        ("Dana", "dana@acme.example\r\nBcc: evil@evil.example"),
        ("Dana\u{0}\u{7}\u{1b}", "dana@acme.example"),
    ] {
        let envelope = Envelope {
            to_name: name,
            to_email: email,
            message_id: "herald.1.0123456789abcdef@interlink.example",
            date: now(),
        };
        let bytes = build_message(&SHIPPED.settings.brand, envelope, &rendered);
        let message = parse_checked(&bytes);
        let to = message.to().unwrap().first().unwrap();
        if !email.contains('\r') {
            assert_eq!(to.address(), Some(email), "{name:?}");
        }
        assert!(!message.subject().unwrap().contains(['\r', '\n']));
    }
}

/// Values that are markup or template code, in every text field and the recipient's name.
const MARKUP: &str = "<script>alert(1)</script><img src=x onerror=alert(2)> \" onclick=\"x\" {{ 7*7 }} {% if true %}yes{% endif %} {# c #} &amp; {{ brand.name }}";
const MARKUP_HTML: &str = "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt; &quot; onclick=&quot;x&quot; {{ 7*7 }} {% if true %}yes{% endif %} {# c #} &amp;amp; {{ brand.name }}";

#[test]
fn markup_and_template_code_in_every_value_are_escaped_in_html_shown_in_text_never_run() {
    let recipient = RecipientView {
        name: MARKUP,
        ..DANA
    };
    for (kind, audience) in notifications() {
        let mut payload = sample(&kind);
        for (pointer, _) in TEXT_FIELDS {
            let field = pointer.rsplit('/').next().unwrap();
            let skip = matches!(field, "company_id" | "email" | "payer")
                || (pointer == "/denial_reason" && kind != "vxc.denied");
            if !skip {
                *payload.pointer_mut(pointer).unwrap() = MARKUP.into();
            }
        }
        let payload = SHIPPED.validate(&kind, payload.to_string()).unwrap();
        let (rendered, bytes) = SHIPPED.build(&kind, audience, &payload, recipient);

        let link = SHIPPED.signer.link(DANA.contact_id, DANA.email);
        let text = rendered.text.replace(&link, "");
        let html = rendered.html.replace(&link, "");
        for part in [&rendered.subject, &text, &html] {
            assert!(
                !part.contains("49"),
                "{kind}/{audience}: evaluated:\n{part}"
            );
        }
        assert!(rendered.subject.contains(MARKUP), "{}", rendered.subject);
        assert!(text.contains(&format!("Dear {MARKUP},")), "{kind}: {text}");
        assert!(text.matches(MARKUP).count() >= 2, "{kind}: values shown");
        assert!(html.contains(MARKUP_HTML), "{kind}/{audience}: {html}");
        assert!(!html.contains("<script") && !html.contains("<img"));
        assert!(!html.contains("\" onclick"));

        let message = parse_checked(&bytes);
        assert_eq!(message.subject(), Some(rendered.subject.as_str()));
        assert_eq!(message.to().unwrap().first().unwrap().name(), Some(MARKUP));
        assert_eq!(crlf_to_lf(&message.body_html(0).unwrap()), rendered.html);
    }
}

#[test]
fn non_ascii_text_arrives_exactly_as_written_in_headers_and_bodies() {
    let long_cjk = "東京データセンター間の冗長接続サービス".repeat(25);
    let long_lookalike = format!("=?utf-8?B?4oCu?= {long_cjk}");
    let cases: [(&str, &str, &str); 9] = [
        ("Zoë Ñúñez-Pérez", "Sydney → Zürich", "café-5f3a"),
        ("山田 太郎", &long_cjk, "東京-1"),
        ("=?utf-8?B?4oCu?= 山田 太郎", &long_lookalike, "=?x?="),
        ("👩🏽‍💻 Ops Team 🚀", "🚀 Fast lane 🛰️", "🚀"),
        ("محمد العلي", "خدمة سيدني إلى دبي", "مرجع-٤٢"),
        ("דנה כהן", "שירות תל אביב", "ref-א"),
        (
            "Dana \"DJ\" O'Brien \\ Jr. <ceo>, (acme)",
            "a;b:c <d> \"e\" =?utf-8?q?evil?= ok",
            "=?utf-8?q?x?=",
        ),
        ("Ελένη Παπαδοπούλου", "Αθήνα — Λευκωσία", "Ω-1"),
        (
            "e\u{301}milie नमस्ते ไทย",
            "x\u{200d}y \u{feff}z",
            "ref\u{a0}nbsp",
        ),
    ];
    for (name, service, reference) in cases {
        let mut payload = sample("vxc.approved");
        payload["service_name"] = service.into();
        payload["reference"] = reference.into();
        payload["customer"]["name"] = name.into();
        let payload = SHIPPED
            .validate("vxc.approved", payload.to_string())
            .unwrap();
        let recipient = RecipientView { name, ..DANA };
        let (rendered, bytes) =
            SHIPPED.build("vxc.approved", Audience::Customer, &payload, recipient);

        // The subject folds whitespace runs to one space (U+00A0 included); nothing else changes.
        let subject = format!("VXC approved: {service} ({reference})")
            .split(char::is_whitespace)
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(rendered.subject, subject);

        let message = parse_checked(&bytes);
        assert_eq!(message.subject(), Some(subject.as_str()));
        let to = message.to().unwrap().first().unwrap();
        assert_eq!(to.name(), Some(name));
        assert_eq!(to.address(), Some("dana@acme.example"));
        let text = crlf_to_lf(&message.body_text(0).unwrap());
        assert_eq!(
            text, rendered.text,
            "the text part decodes to what was rendered"
        );
        assert!(text.contains(&format!("Dear {name},")) && text.contains(service));
        assert_eq!(crlf_to_lf(&message.body_html(0).unwrap()), rendered.html);
    }
}

/// Bodies go out with CRLF line ends; templates render with LF.
fn crlf_to_lf(text: &str) -> String {
    text.replace("\r\n", "\n")
}

#[test]
fn text_that_looks_like_an_encoded_word_reads_as_written_not_as_what_it_encodes() {
    // `4oCu` is U+202E, the right-to-left override that payload checks refuse outright.
    let mut payload = sample("vxc.approved");
    payload["service_name"] = "=?utf-8?B?4oCuZXZpbA==?= and =?utf-8?Q?=0D=0A?=".into();
    let payload = SHIPPED
        .validate("vxc.approved", payload.to_string())
        .unwrap();
    let name = "=?utf-8?B?4oCu?= Dana (=?us-ascii?Q?x?=)";
    let recipient = RecipientView { name, ..DANA };
    let (rendered, bytes) = SHIPPED.build("vxc.approved", Audience::Customer, &payload, recipient);

    let message = parse_checked(&bytes);
    assert_eq!(message.subject(), Some(rendered.subject.as_str()));
    assert!(
        rendered
            .subject
            .contains("=?utf-8?B?4oCuZXZpbA==?= and =?utf-8?Q?=0D=0A?=")
    );
    let to = message.to().unwrap().first().unwrap();
    assert_eq!(to.name(), Some(name));
    assert_eq!(to.address(), Some("dana@acme.example"));
}

#[test]
fn a_payload_may_be_64_kib_and_not_a_byte_more_however_large() {
    let base = sample("vxc.approved").to_string();
    let padded = |total: usize| {
        let filler = total - base.len() - r#","padding":"""#.len();
        let payload = format!(
            "{},\"padding\":\"{}\"}}",
            &base[..base.len() - 1],
            "x".repeat(filler)
        );
        assert_eq!(payload.len(), total);
        payload
    };
    let limit = herald::outbox::schema::MAX_PAYLOAD_BYTES;
    assert!(SHIPPED.validate("vxc.approved", padded(limit)).is_ok());
    for size in [limit + 1, 10 * 1024 * 1024] {
        assert_eq!(
            SHIPPED.validate("vxc.approved", padded(size)),
            Err(PayloadError::TooLarge)
        );
    }
    assert_eq!(
        refusal("vxc.approved", padded(limit + 1)),
        "payload is larger than the limit of 65536 bytes"
    );
}

#[test]
fn a_text_value_may_have_2000_characters_not_2001() {
    for (pointer, field) in TEXT_FIELDS {
        if matches!(field, "requested_by.email" | "payer") {
            continue;
        }
        let kind = kind_with(pointer);
        // Characters, not bytes: 2,000 emoji are 8,000 bytes and allowed.
        let at_limit = "🚀".repeat(2_000);
        let payload = SHIPPED.validate(kind, with(kind, pointer, at_limit.clone().into()));
        assert!(payload.is_ok(), "{field}: {payload:?}");
        let reason = refusal(kind, with(kind, pointer, "x".repeat(2_001).into()));
        assert_eq!(
            reason,
            format!("payload field {field:?}: is longer than 2000 characters")
        );
    }
    let mut long = sample("vxc.approved");
    long["service_name"] = "東".repeat(2_000).into();
    long["customer"]["name"] = "Ж".repeat(2_000).into();
    let payload = SHIPPED.validate("vxc.approved", long.to_string()).unwrap();
    let name = "é".repeat(2_000);
    let recipient = RecipientView {
        name: &name,
        ..DANA
    };
    let (rendered, bytes) = SHIPPED.build("vxc.approved", Audience::Customer, &payload, recipient);
    let message = parse_checked(&bytes);
    assert_eq!(message.subject(), Some(rendered.subject.as_str()));
    assert_eq!(
        message.to().unwrap().first().unwrap().name(),
        Some(name.as_str())
    );
}

#[test]
fn deeply_nested_json_is_refused_with_a_reason_not_a_stack_overflow() {
    let payloads = [
        "[".repeat(10_000),
        "{\"a\":".repeat(10_000),
        format!("{}{}", "[".repeat(30_000), "]".repeat(30_000)),
        with(
            "vxc.approved",
            "/service_name",
            serde_json::from_str(&format!("{}1{}", "[".repeat(100), "]".repeat(100))).unwrap(),
        )
        .replace(
            "[1]",
            &format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000)),
        ),
    ];
    // On a quarter of a tokio worker's stack: parsing stops at 128 levels (about 150 KiB of
    // stack in a debug build), where following 10,000 would take megabytes.
    std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(move || {
            for payload in payloads {
                let reason = refusal("vxc.approved", &payload);
                assert!(
                    reason.starts_with("payload is not valid JSON: recursion limit exceeded"),
                    "{reason}"
                );
            }
        })
        .unwrap()
        .join()
        .unwrap();

    // Depth in a field herald ignores is fine while it stays within the limit.
    let shallow = with(
        "vxc.approved",
        "/extra",
        serde_json::from_str(&format!("{}{}", "[".repeat(100), "]".repeat(100))).unwrap(),
    );
    assert!(SHIPPED.validate("vxc.approved", shallow).is_ok());
}

#[test]
fn a_value_of_the_wrong_json_type_is_refused_naming_the_field_and_what_was_found() {
    let cases: [(&str, &str, Value, &str); 16] = [
        (
            "vxc.approved",
            "/reference",
            json!(5),
            "expected a string, found a number",
        ),
        (
            "vxc.approved",
            "/service_name",
            json!(true),
            "expected a string, found a boolean",
        ),
        (
            "vxc.approved",
            "/service_name",
            json!(["x"]),
            "expected a string, found an array",
        ),
        (
            "vxc.approved",
            "/service_name",
            json!({"x": 1}),
            "expected a string, found an object",
        ),
        (
            "vxc.approved",
            "/customer",
            json!("acme"),
            "expected an object, found a string",
        ),
        (
            "vxc.approved",
            "/customer",
            json!(["acme"]),
            "expected an object, found an array",
        ),
        (
            "vxc.approved",
            "/customer/company_id",
            json!(7),
            "expected a string, found a number",
        ),
        (
            "vxc.approved",
            "/customer/name",
            json!(null),
            "is required but missing",
        ),
        (
            "vxc.approved",
            "/requested_by",
            json!(1),
            "expected an object, found a number",
        ),
        (
            "vxc.approved",
            "/requested_by/email",
            json!(["dana@acme.example"]),
            "expected a string, found an array",
        ),
        (
            "vxc.approved",
            "/approved_at",
            json!(1_590_000_000),
            "expected an RFC 3339 timestamp, found a number",
        ),
        (
            "vxc.approved",
            "/approved_at",
            json!({"$date": "2020-05-21"}),
            "expected an RFC 3339 timestamp, found an object",
        ),
        (
            "vxc.speed_change_requested",
            "/speed_mbps",
            json!("2000"),
            "expected a whole number, found a string",
        ),
        (
            "vxc.speed_change_requested",
            "/speed_mbps",
            json!(true),
            "expected a whole number, found a boolean",
        ),
        (
            "vxc.speed_change_requested",
            "/speed_mbps",
            json!([2000]),
            "expected a whole number, found an array",
        ),
        (
            "vxc.approval_required",
            "/payer",
            json!(1),
            "expected a string, found a number",
        ),
    ];
    for (kind, pointer, value, problem) in cases {
        let field = pointer[1..].replace('/', ".");
        assert_eq!(
            refusal(kind, with(kind, pointer, value)),
            format!("payload field {field:?}: {problem}")
        );
    }
    for (payload, found) in [
        ("null", "null"),
        ("\"x\"", "a string"),
        ("42", "a number"),
        ("[]", "an array"),
        ("true", "a boolean"),
    ] {
        assert_eq!(
            refusal("vxc.approved", payload),
            format!("payload must be a JSON object, found {found}")
        );
    }
    for (payload, words) in [
        ("", "EOF while parsing"),
        ("{\"reference\": \"\\ud800\"}", "hex escape"),
        ("\u{feff}{}", "starts with a UTF-8 byte-order mark"),
        ("{\"a\": 1,}", "trailing comma"),
    ] {
        let reason = refusal("vxc.approved", payload);
        assert!(
            reason.starts_with("payload is not valid JSON: ") && reason.contains(words),
            "{reason}"
        );
    }
    assert!(
        refusal("vxc.approved", b"{\"reference\": \"\xff\"}")
            .starts_with("payload is not valid JSON")
    );
}

#[test]
fn numbers_beyond_the_field_or_a_64_bit_integer_are_refused_naming_the_field() {
    let speed = |literal: &str| {
        sample("vxc.speed_change_requested")
            .to_string()
            .replace("2000", literal)
    };
    for (literal, problem) in [
        (
            "9223372036854775808",
            "9223372036854775808 is not a whole number in range",
        ),
        ("18446744073709551616", "is not a whole number in range"),
        ("-9223372036854775809", "is not a whole number in range"),
        ("2.5", "2.5 is not a whole number in range"),
        ("2.0", "2.0 is not a whole number in range"),
        ("1e3", "1000.0 is not a whole number in range"),
        ("0", "0 is below the minimum 1"),
        ("-1", "-1 is below the minimum 1"),
        (
            "-9223372036854775808",
            "-9223372036854775808 is below the minimum 1",
        ),
    ] {
        let reason = refusal("vxc.speed_change_requested", speed(literal));
        assert!(
            reason.starts_with("payload field \"speed_mbps\": ") && reason.contains(problem),
            "{literal}: {reason}"
        );
    }
    for literal in ["1e400", "-1e400", "NaN", "Infinity", "0x10", "007"] {
        let reason = refusal("vxc.speed_change_requested", speed(literal));
        assert!(
            reason.starts_with("payload is not valid JSON"),
            "{literal}: {reason}"
        );
    }
    let window = |days: Value| with("vxc.approval_required", "/approval_window_days", days);
    assert!(
        refusal("vxc.approval_required", window(json!(3651))).contains("above the maximum 3650")
    );
    assert!(
        refusal("vxc.approval_required", window(json!(i64::MAX))).contains("above the maximum")
    );

    // The largest integer is a valid speed, and renders.
    let payload = SHIPPED
        .validate("vxc.speed_change_requested", speed("9223372036854775807"))
        .unwrap();
    let noc = RecipientView {
        contact_id: "cloudco-noc",
        name: "CloudCo NOC",
        email: "noc@cloudco.example",
    };
    let (rendered, _) = SHIPPED.build(
        "vxc.speed_change_requested",
        Audience::Provider,
        &payload,
        noc,
    );
    assert!(rendered.text.contains("9223372036854775807 Mbps"));
}

#[test]
fn impossible_dates_and_times_are_refused_naming_the_field() {
    for (at, words) in [
        ("2026-02-30T00:00:00Z", "out of range"),
        ("2025-02-29T00:00:00Z", "out of range"),
        ("2026-04-31T00:00:00Z", "out of range"),
        ("2026-13-01T00:00:00Z", "out of range"),
        ("2026-00-10T00:00:00Z", "out of range"),
        ("2026-01-01T25:00:00Z", "out of range"),
        ("2026-01-01T24:00:00Z", "out of range"),
        ("2026-01-01T12:60:00Z", "out of range"),
        ("2026-01-01T12:00:61Z", "out of range"),
        ("2026-01-01T00:00:00+24:00", "out of range"),
        ("2026-01-15", "not an RFC 3339 timestamp"),
        ("2026-01-15T10:00:00", "not an RFC 3339 timestamp"),
        ("15/01/2026 10:00", "not an RFC 3339 timestamp"),
        ("", "not an RFC 3339 timestamp"),
        ("0000-01-01T00:00:00Z", "outside the years 1970-2999"),
        ("1969-12-31T23:59:59Z", "outside the years 1970-2999"),
        ("9999-12-31T23:59:59Z", "outside the years 1970-2999"),
        ("2999-12-31T23:00:00-05:00", "outside the years 1970-2999"),
        // A leap second is only ever the last second of a UTC day.
        ("2026-01-15T12:34:60Z", "leap second (:60) at 12:34 UTC"),
        (
            "2016-12-31T23:59:60+10:00",
            "leap second (:60) at 13:59 UTC",
        ),
    ] {
        let reason = refusal(
            "vxc.service_up",
            with("vxc.service_up", "/event_at", at.into()),
        );
        assert!(
            reason.starts_with("payload field \"event_at\": ") && reason.contains(words),
            "{at}: {reason}"
        );
    }

    for (at, shown) in [
        ("2024-02-29T12:00:00Z", "2024-02-29 12:00:00 UTC"),
        ("2016-12-31T23:59:60Z", "2016-12-31 23:59:60 UTC"),
        ("2017-01-01T10:59:60+11:00", "2016-12-31 23:59:60 UTC"),
        ("1969-12-31T23:59:59-01:00", "1970-01-01 00:59:59 UTC"),
    ] {
        let payload = SHIPPED
            .validate(
                "vxc.service_up",
                with("vxc.service_up", "/event_at", at.into()),
            )
            .unwrap_or_else(|err| panic!("{at}: {err}"));
        let (rendered, _) = SHIPPED.build("vxc.service_up", Audience::Customer, &payload, DANA);
        assert!(rendered.text.contains(shown), "{at}: {}", rendered.text);
    }
}

/// One daemon run over the directory as a careless or hostile portal could leave it: names
/// with line breaks, a name of nothing printable, an address with CRLF, an empty address and
/// a second contact with the same address.
async fn hostile_directory_rows_reach_no_header_and_skip_no_good_contact(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    for sql in [
        "UPDATE herald_contacts SET name = 'Dana\r\nBcc: evil@evil.example\r\n\r\nInjected body' WHERE id = 'acme-dana'",
        "UPDATE herald_contacts SET name = '\r\n\t\u{202e}' WHERE id = 'acme-pat'",
        "UPDATE herald_contacts SET name = 'NOC\u{2028}Cc: evil@evil.example\u{1b}[31m' WHERE id = 'cloudco-noc'",
        "INSERT INTO herald_contacts (id, company_id, name, email, role) VALUES
            ('acme-dup', 'acme', 'Dana Again', 'DANA@ACME.EXAMPLE', 'company_admin'),
            ('acme-crlf', 'acme', 'Crlf', 'x@acme.example\r\nBcc: evil@evil.example', 'company_admin'),
            ('acme-blank', 'acme', 'Blank', '', 'company_admin')",
        "INSERT INTO herald_contact_groups VALUES
            ('acme-dup', 'ordering'), ('acme-crlf', 'ordering'), ('acme-blank', 'ordering')",
    ] {
        env.execute(sql).await.unwrap();
    }
    let id = env.enqueue_sample("vxc.approval_required").await;

    let run = env.herald(&["run", "--drain"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let mut to = BTreeMap::new();
    for entry in std::fs::read_dir(env.mail_dir()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let message = parse_checked(&bytes);
        let mailbox = message.to().unwrap().first().unwrap();
        let (address, name) = (mailbox.address().unwrap(), mailbox.name().unwrap());
        assert!(
            message
                .body_text(0)
                .unwrap()
                .contains(&format!("Dear {name},"))
        );
        to.insert(address.to_string(), name.to_string());
    }
    let expected = [
        (
            "dana@acme.example",
            "Dana Bcc: evil@evil.example Injected body",
        ),
        ("noc@cloudco.example", "NOC Cc: evil@evil.example [31m"),
        ("pat@acme.example", "pat@acme.example"),
    ];
    let expected: BTreeMap<String, String> = expected
        .iter()
        .map(|(a, n)| (a.to_string(), n.to_string()))
        .collect();
    assert_eq!(to, expected, "one message per address, names on one line");

    let dead = env
        .rows(&format!(
            "SELECT contact_id, last_error FROM herald_deliveries \
             WHERE outbox_id = {id} AND state = 'dead' ORDER BY contact_id"
        ))
        .await;
    let dead: Vec<(String, String)> = dead
        .into_iter()
        .map(|row| (row[0].clone().unwrap(), row[1].clone().unwrap()))
        .collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, "acme-blank");
    assert_eq!(dead[1].0, "acme-crlf");
    assert!(
        dead.iter()
            .all(|(_, error)| error.starts_with("not a valid mailbox: ")),
        "{dead:?}"
    );
}

/// Rows that are too large, too deep, out of range or impossible, between good rows, in one
/// run: each fails alone with its reason, and the good ones are delivered.
async fn hostile_rows_fail_alone_and_the_good_rows_around_them_go_out(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    let store = env.store().await;
    let speed = |literal: &str| {
        sample("vxc.speed_change_requested")
            .to_string()
            .replace("2000", literal)
    };
    let event_at = |at: &str| with("vxc.service_up", "/event_at", at.into());
    let bad: [(&str, String, &str); 10] = [
        (
            "vxc.approved",
            with("vxc.approved", "/padding", "x".repeat(5 << 20).into()),
            "larger than the limit of 65536 bytes",
        ),
        (
            "vxc.approved",
            "[".repeat(10_000),
            "recursion limit exceeded",
        ),
        (
            "vxc.approved",
            "{\"a\":".repeat(10_000),
            "recursion limit exceeded",
        ),
        (
            "vxc.speed_change_requested",
            speed("9223372036854775808"),
            "\"speed_mbps\": 9223372036854775808 is not a whole number in range",
        ),
        (
            "vxc.speed_change_requested",
            speed("1e400"),
            "number out of range",
        ),
        (
            "vxc.service_up",
            event_at("2026-02-30T00:00:00Z"),
            "\"event_at\": \"2026-02-30T00:00:00Z\" is not an RFC 3339 timestamp",
        ),
        (
            "vxc.service_up",
            event_at("2026-01-01T25:00:00Z"),
            "\"event_at\": \"2026-01-01T25:00:00Z\" is not an RFC 3339 timestamp",
        ),
        (
            "vxc.service_up",
            event_at("2026-01-15T12:34:60Z"),
            "\"event_at\": \"2026-01-15T12:34:60Z\" has a leap second",
        ),
        (
            "vxc.approved",
            "{\"reference\": \"\\udc00\"}".into(),
            "not valid JSON",
        ),
        (
            "vxc.approved",
            with("vxc.approved", "/service_name", "\u{202e}x".into()),
            "\"service_name\": contains the control character U+202E",
        ),
    ];

    let mut good = vec![env.enqueue_sample("vxc.approved").await];
    let mut ids = Vec::new();
    for (kind, payload, _) in &bad {
        ids.push(store.enqueue(kind, payload, None).await.unwrap().unwrap());
    }
    good.push(env.enqueue_sample("vxc.speed_change_requested").await);

    let run = env.herald(&["run", "--drain"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for ((_, _, words), id) in bad.iter().zip(&ids) {
        let row = env
            .rows(&format!(
                "SELECT status, reason, CAST(deliveries AS TEXT) FROM herald_outbox_status WHERE id = {id}"
            ))
            .await
            .remove(0);
        assert_eq!(row[0].as_deref(), Some("failed"), "row {id}");
        let reason = row[1].as_deref().unwrap();
        assert!(
            reason.contains(words),
            "row {id}: {reason:?} should say {words:?}"
        );
        assert_eq!(row[2].as_deref(), Some("0"));
    }
    for id in good {
        let status = env
            .value(&format!(
                "SELECT status FROM herald_outbox_status WHERE id = {id}"
            ))
            .await;
        assert_eq!(status.as_deref(), Some("done"), "good row {id}");
    }
    assert_eq!(std::fs::read_dir(env.mail_dir()).unwrap().count(), 3);
}

on_both_backends!(
    hostile_directory_rows_reach_no_header_and_skip_no_good_contact,
    hostile_rows_fail_alone_and_the_good_rows_around_them_go_out,
);

fn signer(page: &str) -> PreferenceSigner {
    PreferenceSigner::new(page, &Secret::new("0123456789abcdef-secret"))
}

/// Ways to turn Dana's preference link for `page` into something else, each with the error
/// it must get.
fn forgeries(signer: &PreferenceSigner, page: &str) -> Vec<(String, VerifyError)> {
    use VerifyError::*;
    let token = signer.token("acme-dana", "dana@acme.example");
    let link = signer.link("acme-dana", "dana@acme.example");
    let parts: Vec<&str> = token.split('.').collect();
    let (id, email, tag) = (parts[0], parts[1], parts[2]);
    let b64 = |text: &str| URL_SAFE_NO_PAD.encode(text);
    let host = page.split('/').nth(2).unwrap();
    let (scheme, path) = page.split_once(host).unwrap();
    let query = if page.contains('?') { '&' } else { '?' };
    vec![
        // Another contact's id or address, or the two swapped, under Dana's signature.
        (format!("{}.{email}.{tag}", b64("acme-pat")), BadSignature),
        (
            format!("{id}.{}.{tag}", b64("pat@acme.example")),
            BadSignature,
        ),
        (format!("{email}.{id}.{tag}"), BadSignature),
        // The field lengths are signed: moving a character across the boundary fails.
        (
            format!("{}.{}.{tag}", b64("acme-danad"), b64("ana@acme.example")),
            BadSignature,
        ),
        // Truncated or emptied.
        (format!("{id}.{email}.{}", &tag[..40]), BadSignature),
        (format!("{id}.{email}."), BadSignature),
        (format!("{id}.{email}"), Malformed),
        (format!("{token}.{tag}"), Malformed),
        (String::new(), Malformed),
        ("..".into(), BadSignature),
        ("%".into(), Malformed),
        ("%zz.a.b".into(), Malformed),
        ("%FF.a.b".into(), Malformed),
        (format!("{page}{query}token="), Malformed),
        (format!("{page}{query}token"), Missing),
        (format!("{page}{query}other=1"), Missing),
        (format!("{page}#token={token}"), Missing),
        // The genuine token on another host or page.
        (link.replace("https://", "http://"), WrongPage),
        (
            format!("{scheme}{host}.evil.example{path}?token={token}"),
            WrongPage,
        ),
        (
            format!("{scheme}{host}@evil.example{path}?token={token}"),
            WrongPage,
        ),
        (
            format!("{scheme}evil.example/{host}{path}?token={token}"),
            WrongPage,
        ),
        (format!("evil.example{path}?token={token}"), WrongPage),
        (format!("//evil.example{path}?token={token}"), WrongPage),
        (format!("{page}-old?token={token}"), WrongPage),
        (format!("{page}/../admin?token={token}"), WrongPage),
        (format!("{page}.evil.example/?token={token}"), WrongPage),
    ]
}

/// Dana's token with any one character changed (base64url here has one spelling per byte
/// string) or cut short anywhere.
fn altered_tokens(signer: &PreferenceSigner) -> Vec<String> {
    let token = signer.token("acme-dana", "dana@acme.example");
    let mut altered = Vec::new();
    for at in 0..token.len() {
        let mut changed = token.clone().into_bytes();
        changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
        altered.push(String::from_utf8(changed).unwrap());
        altered.push(token[..at].to_string());
    }
    altered
}

#[test]
fn a_preference_link_works_only_unaltered_for_its_contact_on_its_page() {
    for page in [
        "https://portal.interlink.example/notifications/preferences",
        "https://prefs.interlink.example",
        "https://portal.interlink.example/preferences?lang=en",
    ] {
        let signer = signer(page);
        let link = signer.link("acme-dana", "dana@acme.example");
        let token = signer.token("acme-dana", "dana@acme.example");
        for genuine in [
            link.clone(),
            format!("  {link}\n"),
            format!("{link}#top"),
            format!("{link}&utm=1"),
            link.replace(&token, &token.replace('.', "%2E")),
        ] {
            let identity = signer.verify(&genuine);
            assert_eq!(
                identity.map(|i| (i.contact_id, i.email)),
                Ok(("acme-dana".into(), "dana@acme.example".into())),
                "{genuine}"
            );
        }
        for (forged, error) in forgeries(&signer, page) {
            assert_eq!(signer.verify(&forged), Err(error), "{forged:?}");
        }
        for altered in altered_tokens(&signer) {
            assert!(signer.verify(&altered).is_err(), "accepted: {altered:?}");
        }
    }
}

#[tokio::test]
async fn preferences_verify_exits_non_zero_with_the_reason_for_a_forged_link() {
    let env = TestEnv::new(Options::new(Sink::Files)).await;
    let settings = env.settings();
    let signer = PreferenceSigner::new(&settings.preferences.url, &settings.preferences.secret);
    let verify = |input: &str| {
        let output = env.herald(&["preferences", "verify", input]);
        (
            output.status.code(),
            String::from_utf8(output.stdout).unwrap(),
        )
    };

    assert_eq!(
        verify(&signer.link("acme-dana", "dana@acme.example")),
        (
            Some(0),
            "valid: contact acme-dana <dana@acme.example>\n".into()
        )
    );
    for (input, error) in forgeries(&signer, &settings.preferences.url) {
        assert_eq!(
            verify(&input),
            (Some(1), format!("invalid: {error}\n")),
            "{input:?}"
        );
    }
}
