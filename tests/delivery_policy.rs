//! The delivery policy an operator relies on: the maximum age of a delivery, per-domain rate
//! limits that never hold up other domains, backing off after a 421, the shutdown grace
//! period, and requeueing with `herald retry`.

mod support;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use herald::store::{AttemptRecord, Store};
use support::scripted_smtp::{ScriptedSmtp, Step};
use support::{Backend, Options, Sink, TestEnv, free_port};

/// A time as either backend prints it (`2026-12-04T18:00:00.123Z` or
/// `2026-12-04 18:00:00.123+00`).
fn parse_db_time(text: &str) -> DateTime<Utc> {
    let text = text.replacen(' ', "T", 1);
    let text = if text.ends_with("+00") {
        format!("{text}:00")
    } else {
        text
    };
    DateTime::parse_from_rfc3339(&text)
        .unwrap_or_else(|err| panic!("{text}: {err}"))
        .to_utc()
}

/// (recipient, sent at) of every sent delivery.
async fn sent_times(env: &TestEnv) -> Vec<(String, DateTime<Utc>)> {
    env.rows(
        "SELECT recipient_email, CAST(sent_at AS TEXT) FROM herald_deliveries \
         WHERE state = 'sent' ORDER BY sent_at",
    )
    .await
    .into_iter()
    .map(|r| {
        (
            r[0].clone().unwrap(),
            parse_db_time(r[1].as_deref().unwrap()),
        )
    })
    .collect()
}

fn payload_with_customer(company_id: &str) -> String {
    let mut payload: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(support::repo_path("examples/payloads/vxc.approved.json"))
            .unwrap(),
    )
    .unwrap();
    payload["customer"]["company_id"] = company_id.into();
    payload.to_string()
}

async fn a_delivery_still_failing_at_max_age_is_dead_with_that_reason(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "noc@cloudco.example",
        &vec![Step::Reply("451 4.3.0 Try again later"); 200],
    );
    let mut options = Options::on(backend, Sink::Smtp(smtp.port));
    options.max_attempts = 1000;
    options.max_age = "2s";
    // Expiry unsent comes max_backoff after the deadline: long enough that a drain started
    // late on a loaded machine still makes the last retry.
    options.max_backoff = "10s";
    let env = TestEnv::new(options).await;
    env.enqueue_sample("vxc.speed_change_requested").await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, log) = env.drain().await;
        assert!(ok, "{log}");
        if env.deliveries().await[0].1 == "dead" {
            break;
        }
        assert!(Instant::now() < deadline, "never given up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, state, attempts, error, reply) = env.deliveries().await.remove(0);
    assert_eq!(state, "dead");
    assert!(attempts >= 3, "retried until the deadline: {attempts}");
    let error = error.unwrap();
    assert!(
        error.starts_with("gave up after ")
            && error.contains("not delivered within 2s of being queued (retry.max_age)")
            && error.contains("451 4.3.0 Try again later"),
        "the last retry was made, and failed: {error}"
    );
    assert_eq!(reply.as_deref(), Some("451 4.3.0 Try again later"));
}

async fn deliveries_older_than_max_age_when_the_relay_returns_expire_unsent(backend: Backend) {
    let port = free_port();
    let mut options = Options::on(backend, Sink::Smtp(port));
    options.max_age = "1s";
    let env = TestEnv::new(options).await;
    env.enqueue_sample("vxc.approved").await;
    assert!(!env.drain().await.0, "the relay is down");
    // max_age (1 s) plus max_backoff (1 s): not even the last retry was possible.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let smtp = ScriptedSmtp::start_on(port).await;
    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    assert!(log.contains("delivery expired"), "{log}");
    let rows = env.deliveries().await;
    assert_eq!(rows.len(), 2);
    for (_, state, attempts, error, _) in rows {
        assert_eq!((state.as_str(), attempts), ("dead", 0));
        assert_eq!(
            error.as_deref(),
            Some("not delivered within 1s of being queued (retry.max_age)")
        );
    }
    assert!(smtp.transactions().is_empty(), "nothing sent late");
}

async fn a_domain_over_its_rate_waits_while_other_domains_go_out(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    let mut options = Options::on(backend, Sink::Smtp(smtp.port));
    options.rate_limit_extra = "  domains:\n    acme.example: { per_second: 2, burst: 1 }\n";
    let env = TestEnv::new(options).await;
    // Six deliveries to acme.example come first in the queue, three to cloudco.example after.
    for _ in 0..3 {
        env.enqueue_sample("vxc.approved").await;
    }
    for _ in 0..3 {
        env.enqueue_sample("vxc.speed_change_requested").await;
    }

    let started = Instant::now();
    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    let rows = env.deliveries().await;
    assert!(
        rows.iter().all(|r| r.1 == "sent" && r.2 == 1),
        "all sent, a postponement is not an attempt: {rows:?}"
    );
    let times = sent_times(&env).await;
    let acme: Vec<_> = times
        .iter()
        .filter(|(to, _)| to.ends_with("@acme.example"))
        .map(|(_, at)| *at)
        .collect();
    let cloudco: Vec<_> = times
        .iter()
        .filter(|(to, _)| to.ends_with("@cloudco.example"))
        .map(|(_, at)| *at)
        .collect();
    assert_eq!((acme.len(), cloudco.len()), (6, 3));
    // 2 per second with a burst of one: six sends start 2.5 s apart from first to last.
    // sent_at is when the outcome was committed, which a loaded machine delays by a few
    // hundred milliseconds for one message more than another; unpaced, the span is well
    // under a second.
    let span = (acme[5] - acme[0]).to_std().unwrap();
    assert!(span >= Duration::from_millis(2000), "acme paced: {span:?}");
    // The other domain did not queue behind it.
    assert!(
        cloudco[2] < acme[2],
        "cloudco went out while acme waited: {times:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// A relay that answers the first message to noc@cloudco.example with a 421, and options for
/// one session that will not retry it during the test.
async fn relay_shedding_load_once(backend: Backend) -> (ScriptedSmtp, Options) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "noc@cloudco.example",
        &[Step::Reply("421 4.7.0 Too busy, closing")],
    );
    let mut options = Options::on(backend, Sink::Smtp(smtp.port));
    options.smtp_connections = 1;
    options.initial_backoff = "10m";
    options.max_backoff = "10m";
    (smtp, options)
}

/// After [`relay_shedding_load_once`]: the drain paused, every delivery but the throttled one
/// was sent at the first attempt, and the summary counts every attempt.
async fn assert_sent_but_the_throttled_one(env: &TestEnv, ok: bool, log: &str) {
    assert!(ok, "{log}");
    assert!(log.contains("shedding load"), "{log}");
    let rows = env.deliveries().await;
    for (email, state, attempts, _, _) in &rows {
        let expected = if email == "noc@cloudco.example" {
            "retrying"
        } else {
            "sent"
        };
        assert_eq!(
            (state.as_str(), *attempts),
            (expected, 1),
            "{email}: {rows:?}"
        );
    }
    assert!(
        log.contains(&format!("attempted={}", rows.len())),
        "the summary counts every attempt: {log}"
    );
}

/// A 421 in the pass that put deliveries back for their domain's rate: the drain still
/// waits for them, and counts the attempts of the interrupted pass.
async fn a_drain_interrupted_by_a_421_still_sends_what_it_postponed(backend: Backend) {
    let (_smtp, mut options) = relay_shedding_load_once(backend).await;
    options.rate_limit_extra = "  domains:\n    acme.example: { per_second: 4, burst: 1 }\n";
    let env = TestEnv::new(options).await;
    env.enqueue_sample("vxc.speed_change_requested").await;
    for _ in 0..3 {
        env.enqueue_sample("vxc.approved").await;
    }

    let (ok, log) = env.drain().await;
    assert_sent_but_the_throttled_one(&env, ok, &log).await;
}

/// A 421 in a pass that has already claimed its next batch: the deliveries claimed ahead are
/// given back at once, not left under their lease, and go out after the pause.
async fn a_421_gives_back_the_deliveries_claimed_ahead(backend: Backend) {
    // One session and batches of two: the 421 comes for the first delivery of the third
    // batch, claimed together with the next one while the second batch was being sent.
    let (_smtp, mut options) = relay_shedding_load_once(backend).await;
    options.batch_size = 2;
    let env = TestEnv::new(options).await;
    for _ in 0..2 {
        env.enqueue_sample("vxc.approved").await;
    }
    env.enqueue_sample("vxc.speed_change_requested").await;
    for _ in 0..3 {
        env.enqueue_sample("vxc.approved").await;
    }

    let started = Instant::now();
    let (ok, log) = env.drain().await;
    assert_sent_but_the_throttled_one(&env, ok, &log).await;
    assert_eq!(env.deliveries().await.len(), 11);
    // Left under its one-minute lease, a delivery claimed ahead would have held it back.
    assert!(started.elapsed() < Duration::from_secs(30));
}

async fn a_421_ends_the_batch_and_pauses_before_the_next_message(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "dana@acme.example",
        &[Step::Reply("421 4.7.0 Too busy, closing")],
    );
    // One session, so that the next message can only start after the 421 (with several,
    // messages already under way on other sessions finish).
    let mut options = Options::on(backend, Sink::Smtp(smtp.port));
    options.smtp_connections = 1;
    let env = TestEnv::new(options).await;
    env.enqueue_sample("vxc.approved").await;

    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    assert!(log.contains("the relay is shedding load; pausing"), "{log}");
    // The log's own timestamps: when the 421 was recorded, and when the next message went.
    let logged_at = |needle: &str| {
        let line = log
            .lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("{needle} in {log}"));
        parse_db_time(line.split_whitespace().next().unwrap())
    };
    let throttled_at = logged_at("recipient=dana@acme.example attempt=1 outcome=\"retrying\"");
    let next_sent_at = logged_at("recipient=pat@acme.example attempt=1 outcome=\"sent\"");
    assert!(
        (next_sent_at - throttled_at).to_std().unwrap() >= Duration::from_millis(450),
        "paused after the 421: {throttled_at} then {next_sent_at}"
    );
    assert!(smtp.connections() >= 2, "the 421 closed the session");
}

/// Sessions held back by the global rate limiter when another session gets a 421 give their
/// deliveries back instead of sending them once the limiter lets them through.
async fn a_421_stops_the_sessions_waiting_for_the_rate_limiter(backend: Backend) {
    let (smtp, mut options) = relay_shedding_load_once(backend).await;
    options.smtp_connections = 4;
    // Five at once, then one every 200 ms: the 421 comes for the ninth message, while the
    // other three sessions each wait for a slot.
    options.per_second = 5;
    let env = TestEnv::new(options).await;
    for _ in 0..4 {
        env.enqueue_sample("vxc.approved").await;
    }
    env.enqueue_sample("vxc.speed_change_requested").await;
    for _ in 0..2 {
        env.enqueue_sample("vxc.approved").await;
    }

    let (ok, log) = env.drain().await;
    assert_sent_but_the_throttled_one(&env, ok, &log).await;
    // The server's clock, not the log's: a session logs an outcome once it is committed,
    // which can be after the session waited for its next slot.
    let throttled_at = log
        .lines()
        .find(|line| line.contains("outcome=\"retrying\""))
        .map(|line| parse_db_time(line.split_whitespace().next().unwrap()))
        .unwrap_or_else(|| panic!("the 421 is logged: {log}"));
    let sent_after: Vec<_> = smtp
        .accepted()
        .iter()
        .map(|transaction| transaction.at)
        .filter(|at| *at > throttled_at)
        .collect();
    assert!(!sent_after.is_empty(), "{log}");
    assert!(
        sent_after
            .iter()
            .all(|at| (*at - throttled_at).to_std().unwrap() >= Duration::from_millis(450)),
        "nothing went out before the pause after the 421 at {throttled_at}: {sent_after:?}"
    );
}

async fn sigterm_abandons_a_send_that_outlasts_the_grace_period(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.delay_data(Duration::from_secs(30));
    let mut options = Options::on(backend, Sink::Smtp(smtp.port));
    options.shutdown_grace = "1s";
    options.smtp_timeout = "10s";
    let env = TestEnv::new(options).await;
    env.enqueue_sample("vxc.approved").await;
    let daemon = tokio::process::Command::from(env.herald_command(&["run"]))
        .kill_on_drop(true)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while env
        .value("SELECT CAST(count(*) AS TEXT) FROM herald_deliveries WHERE lease_owner IS NOT NULL")
        .await
        .as_deref()
        != Some("2")
    {
        assert!(Instant::now() < deadline, "claimed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // the message is in flight
    let asked = Instant::now();
    support::terminate(daemon.id().unwrap());
    let output = tokio::time::timeout(Duration::from_secs(10), daemon.wait_with_output())
        .await
        .expect("stops")
        .unwrap();
    let stopped_after = asked.elapsed();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(4)).contains(&stopped_after),
        "waited out the 1 s grace, no more: {stopped_after:?}"
    );
    assert!(log.contains("send abandoned at shutdown"), "{log}");
    let rows = env
        .rows("SELECT state, CAST(attempts AS TEXT), lease_owner FROM herald_deliveries")
        .await;
    for row in rows {
        assert_eq!(
            row,
            [Some("queued".into()), Some("0".into()), None],
            "given back whole, no attempt charged"
        );
    }

    smtp.delay_data(Duration::ZERO);
    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    assert!(env.deliveries().await.iter().all(|r| r.1 == "sent"));
}

async fn herald_retry_requeues_what_the_operator_chooses(backend: Backend) {
    let smtp = ScriptedSmtp::start().await;
    smtp.script(
        "dana@acme.example",
        &[Step::Reply("550 5.1.1 Mailbox unavailable")],
    );
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(smtp.port))).await;
    env.enqueue_sample("vxc.approved").await;
    let failed_event = env
        .store()
        .await
        .enqueue("vxc.approved", &payload_with_customer("globex"), None)
        .await
        .unwrap()
        .unwrap();
    assert!(env.drain().await.0);
    let (dead_id, message_id) = {
        let row = env
            .rows("SELECT CAST(id AS TEXT), message_id FROM herald_deliveries WHERE state = 'dead'")
            .await
            .remove(0);
        (row[0].clone().unwrap(), row[1].clone().unwrap())
    };

    // status names the dead delivery and the failed row, with their reasons.
    let status = env.herald(&["status"]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        out.contains(&format!(
            "delivery {dead_id} to dana@acme.example (outbox 1): server replied 550 5.1.1 Mailbox unavailable"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("outbox {failed_event} (vxc.approved): payload field \"customer.company_id\": company \"globex\" is not in the directory")),
        "{out}"
    );
    assert!(out.contains("herald retry --dead"), "{out}");

    // Without --dead nothing dead moves.
    let plain = env.herald(&["retry"]);
    let out = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.status.success());
    assert!(out.contains("0 retrying deliveries are due now"), "{out}");
    assert!(out.contains("dead deliveries need --dead"), "{out}");

    // A delivery that cannot be requeued says why.
    let sent_id = env
        .value("SELECT CAST(id AS TEXT) FROM herald_deliveries WHERE state = 'sent'")
        .await
        .unwrap();
    for (args, expected) in [
        (
            vec!["--delivery", dead_id.as_str()],
            format!("delivery {dead_id} is dead; add --dead to requeue it"),
        ),
        (
            vec!["--dead", "--delivery", sent_id.as_str()],
            format!("delivery {sent_id} was sent; herald never sends a delivery twice"),
        ),
        (
            vec!["--dead", "--delivery", "999"],
            "there is no delivery 999".to_string(),
        ),
    ] {
        let output = env.herald(&[&["retry"], args.as_slice()].concat());
        let out = String::from_utf8_lossy(&output.stdout);
        assert!(out.contains(&expected), "{args:?}: {out}");
    }

    // One dead delivery, requeued: sent with the same Message-ID, attempts counted afresh.
    let one = env.herald(&["retry", "--dead", "--delivery", &dead_id]);
    let out = String::from_utf8_lossy(&one.stdout);
    assert!(
        out.contains(&format!("requeued 1 dead deliveries (delivery {dead_id})")),
        "{out}"
    );
    assert!(env.drain().await.0);
    let dana = env
        .rows(&format!(
            "SELECT state, CAST(attempts AS TEXT), message_id FROM herald_deliveries WHERE id = {dead_id}"
        ))
        .await
        .remove(0);
    assert_eq!(
        dana,
        [Some("sent".into()), Some("1".into()), Some(message_id)]
    );

    // The failed row, once its company exists, is checked and expanded again.
    env.execute(
        "INSERT INTO herald_companies (id, name) VALUES ('globex', 'Globex');
         INSERT INTO herald_contacts (id, company_id, name, email, role)
             VALUES ('globex-kim', 'globex', 'Kim Lee', 'kim@globex.example', 'company_admin');
         INSERT INTO herald_contact_groups (contact_id, group_name) VALUES ('globex-kim', 'ordering');",
    )
    .await
    .unwrap();
    let event = env.herald(&["retry", "--dead", "--event", &failed_event.to_string()]);
    let out = String::from_utf8_lossy(&event.stdout);
    assert!(
        out.contains(&format!(
            "requeued 0 dead deliveries and 1 failed outbox rows of outbox row {failed_event}"
        )),
        "{out}"
    );
    assert!(env.drain().await.0);
    assert!(
        smtp.accepted()
            .iter()
            .any(|t| t.rcpt == "kim@globex.example"),
        "the corrected row was sent"
    );
    assert_eq!(
        env.value(&format!(
            "SELECT status FROM herald_outbox_status WHERE id = {failed_event}"
        ))
        .await
        .as_deref(),
        Some("done")
    );
}

/// Outcomes are recorded a batch at a time, in one statement: each kind of outcome sets its
/// own columns, and a delivery whose lease another daemon took over is left alone.
async fn one_batch_records_each_outcome_and_skips_a_lost_lease(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Smtp(free_port()))).await;
    env.enqueue_sample("vxc.approval_required").await;
    env.enqueue_sample("vxc.approved").await;
    assert!(!env.drain().await.0, "nothing listens: planned, not sent");
    let store = env.store().await;
    let now = Utc::now();
    let claimed = store
        .claim_deliveries("test-owner", 10, Duration::from_secs(60), now)
        .await
        .unwrap();
    let ids: Vec<i64> = claimed.iter().map(|d| d.id).collect();
    assert_eq!(ids.len(), 5);
    let in_list = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    env.execute(&format!(
        "UPDATE herald_deliveries SET smtp_reply = '451 4.3.0 earlier' WHERE id = {}",
        ids[3]
    ))
    .await
    .unwrap();
    env.execute(&format!(
        "UPDATE herald_deliveries SET lease_owner = 'another-daemon' WHERE id = {}",
        ids[4]
    ))
    .await
    .unwrap();

    let retry_at = now + chrono::TimeDelta::minutes(5);
    let records = [
        AttemptRecord::Sent {
            smtp_reply: "250 2.0.0 Ok".into(),
            at: now,
        },
        AttemptRecord::Retry {
            error: "server replied 451".into(),
            smtp_reply: Some("451 4.3.0 Try again".into()),
            next_attempt_at: retry_at,
        },
        AttemptRecord::Dead {
            error: "server replied 550".into(),
            smtp_reply: Some("550 5.1.1 No such user".into()),
        },
        AttemptRecord::Expired {
            error: "not delivered within 5d".into(),
        },
        AttemptRecord::Sent {
            smtp_reply: "250 2.0.0 Ok".into(),
            at: now,
        },
    ];
    let attempts: Vec<_> = ids.iter().copied().zip(records).collect();
    let recorded = store
        .record_attempts("test-owner", &attempts, now)
        .await
        .unwrap();
    assert_eq!(recorded, [true, true, true, true, false]);

    let rows = env
        .rows(&format!(
            "SELECT CAST(id AS TEXT), state, CAST(attempts AS TEXT), last_error, smtp_reply, \
             CASE WHEN sent_at IS NULL THEN 'no' ELSE 'yes' END, lease_owner FROM herald_deliveries \
             WHERE id IN ({}) ORDER BY id",
            in_list(&ids)
        ))
        .await;
    let row = |id: i64| {
        rows.iter()
            .find(|r| r[0].as_deref() == Some(id.to_string().as_str()))
            .unwrap()[1..]
            .to_vec()
    };
    let text = |v: &str| Some(v.to_string());
    let truth = |sent: bool| text(if sent { "yes" } else { "no" });
    assert_eq!(
        row(ids[0]),
        [
            text("sent"),
            text("1"),
            None,
            text("250 2.0.0 Ok"),
            truth(true),
            None
        ]
    );
    assert_eq!(
        row(ids[1]),
        [
            text("retrying"),
            text("1"),
            text("server replied 451"),
            text("451 4.3.0 Try again"),
            truth(false),
            None
        ]
    );
    assert_eq!(
        row(ids[2]),
        [
            text("dead"),
            text("1"),
            text("server replied 550"),
            text("550 5.1.1 No such user"),
            truth(false),
            None
        ]
    );
    assert_eq!(
        row(ids[3]),
        [
            text("dead"),
            text("0"),
            text("not delivered within 5d"),
            text("451 4.3.0 earlier"),
            truth(false),
            None
        ],
        "an expiry makes no attempt and keeps the last reply"
    );
    assert_eq!(
        row(ids[4]),
        [
            text("queued"),
            text("0"),
            None,
            None,
            truth(false),
            text("another-daemon")
        ],
        "a lost lease is not recorded"
    );
    let next = env
        .value(&format!(
            "SELECT CAST(next_attempt_at AS TEXT) FROM herald_deliveries WHERE id = {}",
            ids[1]
        ))
        .await
        .unwrap();
    let next = parse_db_time(&next);
    assert!(
        (next - retry_at).num_milliseconds().abs() < 2,
        "{next} vs {retry_at}"
    );
}

on_both_backends!(
    one_batch_records_each_outcome_and_skips_a_lost_lease,
    a_drain_interrupted_by_a_421_still_sends_what_it_postponed,
    a_delivery_still_failing_at_max_age_is_dead_with_that_reason,
    deliveries_older_than_max_age_when_the_relay_returns_expire_unsent,
    a_domain_over_its_rate_waits_while_other_domains_go_out,
    a_421_ends_the_batch_and_pauses_before_the_next_message,
    a_421_gives_back_the_deliveries_claimed_ahead,
    a_421_stops_the_sessions_waiting_for_the_rate_limiter,
    sigterm_abandons_a_send_that_outlasts_the_grace_period,
    herald_retry_requeues_what_the_operator_chooses,
);
