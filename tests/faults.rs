//! SMTP faults through a scriptable server: temporary and permanent rejections, dropped
//! connections, a server that is down, and a shutdown in the middle of a send.

mod support;

use std::time::{Duration, Instant};

use support::scripted_smtp::{ScriptedSmtp, Step};
use support::{Backend, Options, SAMPLE_KINDS, Sink, TestEnv, free_port};

async fn a_451_is_retried_and_delivered_once_with_the_same_message_id(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "noc@cloudco.example",
        &[Step::Reply("451 4.3.0 Try again later")],
    );
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    env.enqueue_sample("vxc.speed_change_requested").await;

    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    let rows = env.deliveries().await;
    assert_eq!(rows[0].1, "retrying");
    assert_eq!(rows[0].2, 1);
    assert!(
        rows[0]
            .3
            .as_deref()
            .unwrap()
            .contains("451 4.3.0 Try again later")
    );
    assert!(
        log.contains("will retry"),
        "a WARN line says it will be retried: {log}"
    );

    tokio::time::sleep(Duration::from_millis(300)).await; // initial_backoff is 100ms
    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    let rows = env.deliveries().await;
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("sent", 2));

    let seen = smtp.transactions();
    assert_eq!(seen.len(), 2);
    assert_eq!(smtp.accepted().len(), 1, "delivered once");
    assert_eq!(
        seen[0].message_id, seen[1].message_id,
        "the retry carries the same Message-ID"
    );
}

async fn a_550_is_dead_at_once_with_the_reply_and_the_others_still_go_out(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "noc@cloudco.example",
        &[Step::Reply("550 5.1.1 Mailbox unavailable")],
    );
    let mut options = Options::on(backend, Sink::Smtp(smtp.port));
    options.smtp_connections = 1;
    let env = TestEnv::new(options).await;
    env.enqueue_sample("vxc.approval_required").await;

    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    for (email, state, attempts, error, reply) in env.deliveries().await {
        if email == "noc@cloudco.example" {
            assert_eq!((state.as_str(), attempts), ("dead", 1));
            assert_eq!(reply.as_deref(), Some("550 5.1.1 Mailbox unavailable"));
            assert!(error.unwrap().contains("550"));
        } else {
            assert_eq!(state, "sent", "{email}");
        }
    }
    assert!(log.contains("delivery is dead"));
    assert_eq!(
        smtp.connections(),
        1,
        "after a rejection the session is reset and reused"
    );

    let (ok, _) = env.drain().await;
    assert!(ok);
    assert_eq!(
        smtp.transactions().len(),
        3,
        "a dead delivery is never tried again"
    );

    let status = env.herald(&["status"]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains("dead 1") && shown.contains("550 5.1.1 Mailbox unavailable"),
        "{shown}"
    );
}

/// A relay whose replies carry control characters (a NUL, an escape): they are stored and
/// logged as U+FFFD, so that PostgreSQL, which refuses a NUL in text, records the outcome
/// instead of leaving the message to be sent again.
async fn control_characters_in_a_reply_are_replaced(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "noc@cloudco.example",
        &[Step::Reply("250 2.0.0 Ok: queued as AB\0CD\x1b[2J")],
    );
    smtp.script(
        "dana@acme.example",
        &[Step::Reply("550 5.1.1 No\0such user")],
    );
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    env.enqueue_sample("vxc.approval_required").await;

    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    let replies: Vec<_> = env
        .deliveries()
        .await
        .into_iter()
        .map(|(email, state, _, _, reply)| (email, state, reply.unwrap_or_default()))
        .collect();
    assert!(
        replies.contains(&(
            "noc@cloudco.example".into(),
            "sent".into(),
            "250 2.0.0 Ok: queued as AB\u{FFFD}CD\u{FFFD}[2J".into()
        )),
        "{replies:?}"
    );
    assert!(
        replies.contains(&(
            "dana@acme.example".into(),
            "dead".into(),
            "550 5.1.1 No\u{FFFD}such user".into()
        )),
        "{replies:?}"
    );
    assert_eq!(smtp.accepted_count(), 2, "each accepted once");
    assert!(!log.contains('\0'), "{log}");
}

/// Drains one `vxc.approval_required` (three recipients) through `smtp` over a single
/// session, with retries scheduled too late to come due during the drain. Returns the log
/// and the deliveries.
async fn drain_approval_required_over_one_session(
    smtp: &ScriptedSmtp,
) -> (
    String,
    Vec<(String, String, i64, Option<String>, Option<String>)>,
) {
    let mut options = Options::new(Sink::Smtp(smtp.port));
    options.smtp_connections = 1;
    options.initial_backoff = "10m";
    options.max_backoff = "10m";
    let env = TestEnv::new(options).await;
    env.enqueue_sample("vxc.approval_required").await;
    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    let rows = env.deliveries().await;
    (log, rows)
}

/// A refusal at RCPT TO, whether the envelope was pipelined or sent command by command.
async fn a_recipient_refused_at_rcpt_is_dead_and_the_session_goes_on(pipelining: bool) {
    let smtp = ScriptedSmtp::start().await;
    if !pipelining {
        smtp.without_pipelining();
    }
    smtp.script(
        "noc@cloudco.example",
        &[Step::RefuseRecipient(
            "550 5.1.1 <noc@cloudco.example>: Recipient address rejected",
        )],
    );
    smtp.script(
        "dana@acme.example",
        &[Step::RefuseRecipient("452 4.5.3 Too many recipients")],
    );
    let (_, rows) = drain_approval_required_over_one_session(&smtp).await;
    let emails: Vec<_> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(emails.len(), 3, "{emails:?}");
    assert!(emails.contains(&"dana@acme.example"), "{emails:?}");
    for (email, state, attempts, error, reply) in &rows {
        let expected = match email.as_str() {
            "noc@cloudco.example" => Some((
                "dead",
                "550 5.1.1 <noc@cloudco.example>: Recipient address rejected",
            )),
            "dana@acme.example" => Some(("retrying", "452 4.5.3 Too many recipients")),
            _ => None,
        };
        match expected {
            Some((expected_state, expected_reply)) => {
                assert_eq!((state.as_str(), *attempts), (expected_state, 1), "{email}");
                assert_eq!(reply.as_deref(), Some(expected_reply), "{email}");
                assert!(
                    error.as_deref().unwrap().contains(expected_reply),
                    "the reason names the RCPT refusal, not the DATA refusal after it: {error:?}"
                );
            }
            None => assert_eq!(state, "sent", "{email}"),
        }
    }
    assert_eq!(
        smtp.transactions().len(),
        rows.len() - 2,
        "refused recipients never reach DATA"
    );
    assert_eq!(
        smtp.connections(),
        1,
        "each refusal is reset and the session reused"
    );
    let envelopes = rows.len();
    assert_eq!(
        smtp.pipelined_envelopes(),
        if pipelining { envelopes } else { 0 },
        "MAIL, RCPT and DATA are pipelined exactly when the server offers it"
    );
}

#[tokio::test]
async fn a_recipient_refused_at_rcpt_is_dead_and_the_session_goes_on_pipelined() {
    a_recipient_refused_at_rcpt_is_dead_and_the_session_goes_on(true).await;
}

#[tokio::test]
async fn a_recipient_refused_at_rcpt_is_dead_and_the_session_goes_on_in_lock_step() {
    a_recipient_refused_at_rcpt_is_dead_and_the_session_goes_on(false).await;
}

/// Servers that break off mid-envelope, with PIPELINING: the reply they gave before hanging up
/// is the outcome, and a "go ahead" after a refused recipient does not turn a permanent
/// refusal into a retry.
#[tokio::test]
async fn a_refusal_then_a_hang_up_keeps_the_refusal() {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "noc@cloudco.example",
        &[Step::RefuseRecipientAndHangUp(
            "554 5.7.1 Rejected, goodbye",
        )],
    );
    smtp.script(
        "dana@acme.example",
        &[Step::RefuseRecipientAndHangUp(
            "421 4.7.0 Too busy, closing",
        )],
    );
    smtp.script(
        "pat@acme.example",
        &[Step::RefuseRecipientThenGoAhead("550 5.1.1 No such user")],
    );
    let (log, rows) = drain_approval_required_over_one_session(&smtp).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (email, state, attempts, _, reply) in rows {
        let expected = match email.as_str() {
            "noc@cloudco.example" => ("dead", "554 5.7.1 Rejected, goodbye"),
            "dana@acme.example" => ("retrying", "421 4.7.0 Too busy, closing"),
            "pat@acme.example" => ("dead", "550 5.1.1 No such user"),
            other => panic!("unexpected recipient {other}"),
        };
        assert_eq!((state.as_str(), attempts), (expected.0, 1), "{email}");
        assert_eq!(reply.as_deref(), Some(expected.1), "{email}");
    }
    assert!(
        log.contains("shedding load"),
        "a 421 pauses sending, pipelined or not: {log}"
    );
    assert!(smtp.accepted().is_empty(), "nothing was accepted");
}

async fn retries_stop_at_max_attempts_with_a_clear_reason(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "noc@cloudco.example",
        &[
            Step::Reply("452 4.2.2 Mailbox full"),
            Step::Reply("452 4.2.2 Mailbox full"),
            Step::Reply("452 4.2.2 Mailbox full"),
        ],
    );
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await; // max_attempts: 3
    env.enqueue_sample("vxc.speed_change_requested").await;
    for _ in 0..3 {
        assert!(env.drain().await.0);
        tokio::time::sleep(Duration::from_millis(1100)).await; // max_backoff is 1s
    }
    let rows = env.deliveries().await;
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("dead", 3));
    assert!(
        rows[0]
            .3
            .as_deref()
            .unwrap()
            .starts_with("gave up after 3 attempts")
    );
    assert_eq!(smtp.accepted().len(), 0);
}

async fn a_connection_dropped_mid_message_is_retried_on_a_new_connection(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script("dana@acme.example", &[Step::Drop]);
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    env.enqueue_sample("vxc.approved").await;

    assert!(env.drain().await.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(env.drain().await.0);

    let rows = env.deliveries().await;
    assert!(rows.iter().all(|r| r.1 == "sent"), "{rows:?}");
    let accepted = smtp.accepted();
    assert_eq!(accepted.len(), 2);
    assert_eq!(
        accepted
            .iter()
            .filter(|t| t.rcpt == "dana@acme.example")
            .count(),
        1
    );
    assert!(
        smtp.connections() >= 2,
        "the broken connection was replaced"
    );
}

async fn a_421_closes_the_session_and_the_message_is_retried(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "dana@acme.example",
        &[Step::Reply("421 4.7.0 Too many messages, closing")],
    );
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    env.enqueue_sample("vxc.approved").await;

    assert!(env.drain().await.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(env.drain().await.0);
    assert!(env.deliveries().await.iter().all(|r| r.1 == "sent"));
    assert_eq!(smtp.accepted().len(), 2);
    assert!(smtp.connections() >= 2);
}

async fn while_the_server_is_down_nothing_is_lost_or_charged_an_attempt(backend: Backend) {
    let port = free_port();
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(port))).await;
    for kind in SAMPLE_KINDS {
        env.enqueue_sample(kind).await;
    }

    let (ok, log) = env.drain().await;
    assert!(!ok, "a drain that cannot reach the server fails");
    assert!(
        log.contains("cannot open an SMTP session with 127.0.0.1"),
        "{log}"
    );
    let rows = env.deliveries().await;
    assert_eq!(rows.len(), 8);
    assert!(rows.iter().all(|r| r.1 == "queued" && r.2 == 0), "{rows:?}");

    let smtp = ScriptedSmtp::start_on(port).await;
    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    assert!(env.deliveries().await.iter().all(|r| r.1 == "sent"));
    assert_eq!(smtp.accepted().len(), 8);
}

async fn the_daemon_rides_out_a_server_outage(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    smtp.stop();
    let mut daemon = tokio::process::Command::from(env.herald_command(&["run"]))
        .kill_on_drop(true)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for kind in SAMPLE_KINDS {
        env.enqueue_sample(kind).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(smtp.transactions().len(), 0);

    let smtp = smtp.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while smtp.accepted().len() < 8 {
        assert!(
            Instant::now() < deadline,
            "the daemon did not resume after the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    support::terminate(daemon.id().unwrap());
    assert!(daemon.wait().await.unwrap().success());
    assert!(
        env.deliveries()
            .await
            .iter()
            .all(|r| r.1 == "sent" && r.2 == 1)
    );
}

async fn sigterm_mid_send_finishes_the_send_and_releases_the_rest(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.delay_data(Duration::from_millis(700));
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    for kind in SAMPLE_KINDS {
        env.enqueue_sample(kind).await;
    }
    let mut daemon = tokio::process::Command::from(env.herald_command(&["run"]))
        .kill_on_drop(true)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // Wait until a message is in flight (DATA sent, reply held back), then ask it to stop.
    let deadline = Instant::now() + Duration::from_secs(20);
    while smtp.transactions().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    support::terminate(daemon.id().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(10), daemon.wait())
        .await
        .expect("stops")
        .unwrap();
    assert!(status.success());

    // Nothing half-recorded: sent in the database exactly when accepted by the server, no
    // lease left behind, no attempt charged to what was not sent.
    let accepted = smtp.accepted();
    let rows: Vec<(String, String, i64, Option<String>)> = env
        .rows("SELECT message_id, state, CAST(attempts AS TEXT), lease_owner FROM herald_deliveries ORDER BY id")
        .await
        .into_iter()
        .map(|r| {
            let text = |i: usize| r[i].clone().unwrap_or_default();
            (text(0), text(1), text(2).parse().unwrap(), r[3].clone())
        })
        .collect();
    assert!(
        !accepted.is_empty() && accepted.len() < 8,
        "stopped mid-run: {} sent",
        accepted.len()
    );
    for (message_id, state, attempts, lease) in &rows {
        let was_accepted = accepted.iter().any(|t| &t.message_id == message_id);
        assert_eq!(state == "sent", was_accepted, "{message_id}");
        assert_eq!(*attempts, i64::from(was_accepted));
        assert!(lease.is_none(), "lease released");
    }

    // A restart sends the rest, each exactly once.
    smtp.delay_data(Duration::ZERO);
    assert!(env.drain().await.0);
    let accepted = smtp.accepted();
    assert_eq!(accepted.len(), 8);
    let unique: std::collections::BTreeSet<_> = accepted.iter().map(|t| &t.message_id).collect();
    assert_eq!(unique.len(), 8);
}

#[tokio::test]
async fn a_failed_tls_handshake_charges_nothing_and_says_why() {
    // A server that answers a TLS ClientHello with plain text and hangs up.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut stream, _)) = listener.accept().await {
            drop(stream.write_all(b"220 not really TLS\r\n").await);
        }
    });
    let env = TestEnv::new(Options::new(Sink::Smtp(port))).await;
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("    tls: none\n", "    tls: implicit\n");
    std::fs::write(&env.config, config).unwrap();
    env.enqueue_sample("vxc.approved").await;

    let (ok, log) = env.drain().await;
    assert!(!ok, "the relay cannot be used");
    assert!(
        log.contains(&format!(
            "cannot open an SMTP session with 127.0.0.1:{port}"
        )),
        "{log}"
    );
    assert!(
        env.deliveries()
            .await
            .iter()
            .all(|r| r.1 == "queued" && r.2 == 0),
        "nothing claimed or charged"
    );
}

#[tokio::test]
async fn a_refused_login_is_reported_without_the_password() {
    let smtp = ScriptedSmtp::start().await;
    smtp.refuse_logins();
    let env = TestEnv::new(Options::new(Sink::Smtp(smtp.port))).await;
    let password = "hunter2-but-longer-0123";
    let config = std::fs::read_to_string(&env.config).unwrap().replace(
        "    tls: none\n",
        &format!("    tls: none\n    username: herald\n    password: {password}\n"),
    );
    std::fs::write(&env.config, config).unwrap();
    env.enqueue_sample("vxc.approved").await;

    let (ok, log) = env.drain().await;
    assert!(!ok);
    assert!(
        log.contains("authentication failed: 535 5.7.8 Authentication credentials invalid"),
        "{log}"
    );
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("\0herald\0{password}"));
    assert!(!log.contains(password) && !log.contains(&encoded), "{log}");
    assert!(
        env.deliveries()
            .await
            .iter()
            .all(|r| r.1 == "queued" && r.2 == 0),
        "nothing charged while the relay refuses us"
    );
}

on_both_backends!(
    a_451_is_retried_and_delivered_once_with_the_same_message_id,
    a_550_is_dead_at_once_with_the_reply_and_the_others_still_go_out,
    control_characters_in_a_reply_are_replaced,
    retries_stop_at_max_attempts_with_a_clear_reason,
    a_connection_dropped_mid_message_is_retried_on_a_new_connection,
    a_421_closes_the_session_and_the_message_is_retried,
    while_the_server_is_down_nothing_is_lost_or_charged_an_attempt,
    the_daemon_rides_out_a_server_outage,
    sigterm_mid_send_finishes_the_send_and_releases_the_rest,
);
