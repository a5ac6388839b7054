//! End to end against real SMTP servers (Python's aiosmtpd, and Postfix's smtp-sink, which
//! offers PIPELINING): the sample directory imported, one payload per kind enqueued, the
//! herald binary run, and what the server received parsed.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use herald::render::PreferenceSigner;
use herald::store::Store;
use mail_parser::{MessageParser, MimeHeaders};
use support::{Aiosmtpd, Backend, Options, PostfixSink, SAMPLE_KINDS, Sink, TestEnv};

/// (recipient, subject prefix) for every message the samples must produce: eight in all.
const EXPECTED: [(&str, &str); 8] = [
    ("noc@cloudco.example", "Approval needed:"),
    ("dana@acme.example", "VXC awaiting approval:"),
    ("pat@acme.example", "VXC awaiting approval:"),
    ("dana@acme.example", "VXC approved:"),
    ("pat@acme.example", "VXC approved:"),
    ("dana@acme.example", "Service up:"),
    ("lee@acme.example", "Service up:"),
    ("noc@cloudco.example", "Speed change requested:"),
];

/// `got` (recipient, subject) holds each of [`EXPECTED`] exactly once.
fn assert_each_expected_once(got: &[(String, String)]) {
    for (rcpt, prefix) in EXPECTED {
        let matching = got
            .iter()
            .filter(|(r, s)| r == rcpt && s.starts_with(prefix))
            .count();
        assert_eq!(matching, 1, "{rcpt} / {prefix}: {got:?}");
    }
}

async fn the_samples_reach_a_real_smtp_server_as_complete_messages(backend: Backend) {
    let smtp = Aiosmtpd::start();
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    for kind in SAMPLE_KINDS {
        env.enqueue_sample(kind).await;
    }

    let run = env.herald(&["run", "--drain"]);
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "drain failed: {log}");

    let received = smtp.received();
    let mut got: Vec<(String, String)> = Vec::new();
    let settings = env.settings();
    let signer = PreferenceSigner::new(&settings.preferences.url, &settings.preferences.secret);
    let mut peers = BTreeSet::new();
    let mut message_ids = BTreeSet::new();

    for (envelope, bytes) in &received {
        let rcpts = envelope["rcpt_tos"].as_array().unwrap();
        assert_eq!(rcpts.len(), 1, "one recipient per message");
        let rcpt = rcpts[0].as_str().unwrap().to_string();
        assert_eq!(envelope["mail_from"], "notifications@interlink.example");
        peers.insert(envelope["peer"][1].as_u64().unwrap());

        let message = MessageParser::default()
            .parse(bytes)
            .expect("a parsable message");
        let from = message.from().unwrap().first().unwrap();
        assert_eq!(from.address(), Some("notifications@interlink.example"));
        assert_eq!(from.name(), Some("Interlink Exchange"));
        let to = message.to().unwrap();
        assert_eq!(to.iter().count(), 1);
        assert_eq!(
            to.first().unwrap().address(),
            Some(rcpt.as_str()),
            "To matches the envelope"
        );
        assert!(message.date().is_some(), "Date header");
        let message_id = message.message_id().expect("Message-ID header").to_string();
        assert!(message_id.ends_with("@interlink.example"));
        message_ids.insert(message_id);
        assert_eq!(
            message.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-generated")
        );

        let root = &message.parts[0];
        assert_eq!(root.content_type().unwrap().subtype(), Some("alternative"));
        let text = message.body_text(0).unwrap();
        let html = message.body_html(0).unwrap();
        for part in [&text, &html] {
            assert!(part.contains("5f3a9c1e"), "reference in every part");
            assert!(
                part.contains("Level 5, 100 Harbour Street"),
                "footer address"
            );
            assert!(
                part.contains("notification preferences"),
                "footer preference link"
            );
        }
        let link = text
            .lines()
            .find(|l| l.contains("token="))
            .expect("preference link");
        assert_eq!(
            signer.verify(link).unwrap().email,
            rcpt,
            "the link is the recipient's own"
        );

        got.push((rcpt, message.subject().unwrap().to_string()));
    }

    assert_eq!(
        got.len(),
        EXPECTED.len(),
        "exactly one message per recipient and notification: {got:?}"
    );
    assert_each_expected_once(&got);
    assert_eq!(message_ids.len(), 8, "each delivery has its own Message-ID");
    assert!(
        (1..=4).contains(&peers.len()),
        "at most transport.smtp.connections (4) sessions, each reused: {peers:?}"
    );

    // One log line per delivery outcome, with the facts an operator needs.
    let delivered: Vec<&str> = log.lines().filter(|l| l.contains("delivered")).collect();
    assert_eq!(delivered.len(), 8, "{log}");
    for line in delivered {
        for field in [
            "outbox_id=",
            "delivery_id=",
            "kind=",
            "reference=",
            "recipient=",
            "attempt=1",
            "smtp_reply=250 2.0.0 Ok: queued as",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }

    // The database agrees with the server.
    let rows = env
        .rows("SELECT state, CAST(attempts AS TEXT), smtp_reply, message_id FROM herald_deliveries ORDER BY id")
        .await;
    assert_eq!(rows.len(), 8);
    for row in rows {
        let [state, attempts, reply, message_id] = [0, 1, 2, 3].map(|i| row[i].clone().unwrap());
        assert_eq!((state.as_str(), attempts.as_str()), ("sent", "1"));
        assert!(reply.starts_with("250"));
        assert!(message_ids.contains(&message_id));
    }
}

/// The same samples through a server that offers PIPELINING, so that herald sends each
/// envelope in one write: every message arrives whole, to its own recipient, once.
#[tokio::test]
async fn the_samples_reach_a_pipelining_server_whole() {
    let smtp = PostfixSink::start();
    let env = TestEnv::new(Options::new(Sink::Smtp(smtp.port))).await;
    for kind in SAMPLE_KINDS {
        env.enqueue_sample(kind).await;
    }
    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");

    let stored = env
        .rows("SELECT recipient_email, message_id, state FROM herald_deliveries")
        .await;
    let received = smtp.received();
    assert_eq!(received.len(), EXPECTED.len(), "{log}");
    let mut got = Vec::new();
    for (rcpt, bytes) in &received {
        let message = MessageParser::default()
            .parse(bytes)
            .expect("a parsable message");
        assert_eq!(
            message.to().unwrap().first().unwrap().address(),
            Some(rcpt.as_str())
        );
        let message_id = message.message_id().expect("Message-ID header");
        assert!(
            stored
                .iter()
                .any(|row| row[0].as_deref() == Some(rcpt.as_str())
                    && row[1].as_deref() == Some(message_id)
                    && row[2].as_deref() == Some("sent")),
            "{rcpt} {message_id} is a sent delivery: {stored:?}"
        );
        for part in [message.body_text(0).unwrap(), message.body_html(0).unwrap()] {
            assert!(part.contains("5f3a9c1e"), "reference in every part");
            assert!(
                part.contains("Level 5, 100 Harbour Street"),
                "the footer, at the end"
            );
        }
        got.push((rcpt.clone(), message.subject().unwrap().to_string()));
    }
    assert_each_expected_once(&got);
}

async fn the_daemon_picks_up_new_rows_and_stops_cleanly_on_sigterm(backend: Backend) {
    let smtp = Aiosmtpd::start();
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    let log_path = env.dir.path().join("daemon.log");
    let mut daemon = env
        .herald_command(&["run"])
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();

    // Inserted while the daemon runs: picked up by its poll.
    env.enqueue_sample("vxc.service_up").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while smtp.received().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the daemon did not deliver the new row"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    support::terminate(daemon.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");

    let log = std::fs::read_to_string(&log_path).unwrap();
    let started = log
        .lines()
        .find(|l| l.contains("herald started"))
        .expect("start line");
    for field in [
        "config=",
        "database=",
        "transport=smtp://127.0.0.1:",
        "templates=20",
    ] {
        assert!(started.contains(field), "{field} missing from {started}");
    }
    assert!(log.contains("shutdown requested"));
    assert!(log.contains("stopped"));
    assert_eq!(smtp.received().len(), 2);
}

on_both_backends!(
    the_samples_reach_a_real_smtp_server_as_complete_messages,
    the_daemon_picks_up_new_rows_and_stops_cleanly_on_sigterm,
);

async fn non_ascii_names_and_subjects_arrive_encoded_and_readable(backend: Backend) {
    let smtp = Aiosmtpd::start();
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    env.execute("UPDATE herald_contacts SET name = 'Dana Ñúñez 🚀' WHERE id = 'acme-dana'")
        .await
        .unwrap();
    // An internationalised domain, and a right-to-left name.
    env.execute(
        "UPDATE herald_contacts SET name = 'פט כהן', email = 'pat@bücher.example' \
         WHERE id = 'acme-pat'",
    )
    .await
    .unwrap();
    let payload =
        std::fs::read_to_string(support::repo_path("examples/payloads/vxc.approved.json"))
            .unwrap()
            .replace("Sydney to CloudCo", "Sydney → Zürich 東京");
    env.store()
        .await
        .enqueue("vxc.approved", &payload, None)
        .await
        .unwrap();

    let run = env.herald(&["run", "--drain"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let received = smtp.received();
    let (_, bytes) = received
        .iter()
        .find(|(envelope, _)| envelope["rcpt_tos"][0] == "dana@acme.example")
        .expect("Dana's copy");
    let headers_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(
        bytes[..headers_end].is_ascii(),
        "headers are 7-bit, non-ASCII is encoded"
    );

    let message = MessageParser::default().parse(bytes).unwrap();
    assert_eq!(
        message.to().unwrap().first().unwrap().name(),
        Some("Dana Ñúñez 🚀")
    );
    assert!(message.subject().unwrap().contains("Sydney → Zürich 東京"));
    assert!(
        message
            .body_text(0)
            .unwrap()
            .contains("Dear Dana Ñúñez 🚀,")
    );
    assert!(
        message
            .body_html(0)
            .unwrap()
            .contains("Sydney → Zürich 東京")
    );

    let (_, bytes) = received
        .iter()
        .find(|(envelope, _)| envelope["rcpt_tos"][0] == "pat@xn--bcher-kva.example")
        .expect("Pat's copy, addressed to the ASCII form of the domain");
    let message = MessageParser::default().parse(bytes).unwrap();
    let to = message.to().unwrap().first().unwrap();
    assert_eq!(to.name(), Some("פט כהן"));
    assert_eq!(to.address(), Some("pat@xn--bcher-kva.example"));
}

on_both_backends!(non_ascii_names_and_subjects_arrive_encoded_and_readable);
