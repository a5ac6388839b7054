//! Bad outbox rows: each is marked failed with a reason naming what is wrong, the daemon keeps
//! going, and the good rows around it are delivered.

mod support;

use herald::store::Database;
use herald::store::Store;
use support::{Backend, Options, Sink, TestEnv, repo_path};

/// The SQLite store, for tests of what only SQLite lets a producer write (text that is not
/// UTF-8; PostgreSQL refuses it on insert).
async fn sqlite(env: &TestEnv) -> herald::store::sqlite::SqliteStore {
    match env.store().await {
        Database::Sqlite(store) => store,
        Database::Postgres(_) => unreachable!("a SQLite test environment"),
    }
}

fn sample(kind: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(repo_path(&format!("examples/payloads/{kind}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn edited(kind: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut value = sample(kind);
    edit(&mut value);
    value.to_string()
}

async fn bad_rows_fail_with_their_reason_and_good_rows_still_go_out(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    let store = env.store().await;
    let good = sample("vxc.approved").to_string();

    // (kind, payload, words the reason must contain)
    let bad: Vec<(&str, String, &[&str])> = vec![
        (
            "vxc.exploded",
            good.clone(),
            &["unknown kind", "vxc.exploded"],
        ),
        (
            "vxc.approved",
            "{\"reference\": ".into(),
            &["not valid JSON"],
        ),
        ("vxc.approved", "[1, 2]".into(), &["must be a JSON object"]),
        (
            "vxc.approved",
            edited("vxc.approved", |p| {
                drop(p.as_object_mut().unwrap().remove("approved_at"))
            }),
            &["\"approved_at\"", "missing"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| p["approved_at"] = "last tuesday".into()),
            &["\"approved_at\"", "RFC 3339"],
        ),
        (
            "vxc.speed_change_requested",
            edited("vxc.speed_change_requested", |p| {
                p["speed_mbps"] = "fast".into()
            }),
            &["\"speed_mbps\"", "whole number"],
        ),
        (
            "vxc.speed_change_requested",
            edited("vxc.speed_change_requested", |p| p["speed_mbps"] = 0.into()),
            &["\"speed_mbps\"", "minimum"],
        ),
        (
            "vxc.speed_change_requested",
            edited("vxc.speed_change_requested", |p| {
                p["speed_mbps"] = 1.5.into()
            }),
            &["\"speed_mbps\""],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| p["customer"] = "acme".into()),
            &["\"customer\"", "object"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| p["customer"]["company_id"] = 7.into()),
            &["\"customer.company_id\"", "string"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| p["reference"] = "".into()),
            &["\"reference\"", "empty"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| {
                p["customer"]["company_id"] = "globex".into()
            }),
            &["\"customer.company_id\"", "globex", "not in the directory"],
        ),
        (
            "vxc.approval_required",
            edited("vxc.approval_required", |p| p["payer"] = "nobody".into()),
            &["\"payer\"", "one of"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| {
                p["provider"]["company_id"] = "nosuch".into()
            }),
            &["\"provider.company_id\"", "nosuch", "not in the directory"],
        ),
        (
            "vxc.approval_required",
            edited("vxc.approval_required", |p| {
                p["ordered_at"] = "9999-12-01T00:00:00Z".into()
            }),
            &["\"ordered_at\"", "outside the years"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| {
                p["customer"]["name"] = "Acme\r\nBcc: evil@example.com".into()
            }),
            &["\"customer.name\"", "control character U+000D"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| {
                p["service_name"] = "Sydney\u{202E}oCduolC".into()
            }),
            &["\"service_name\"", "U+202E"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| {
                p["requested_by"]["email"] = "not an email".into()
            }),
            &["\"requested_by.email\"", "not an email address"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| p["reference"] = "..".into()),
            &["\"reference\"", "cannot be a service reference"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| {
                p["customer"]["name"] = "Acme\u{2028}Networks".into()
            }),
            &["\"customer.name\"", "U+2028"],
        ),
        (
            "x\n2026-01-01T00:00:00Z  INFO herald: delivered outbox_id=999",
            good.clone(),
            &["unknown kind"],
        ),
        (
            "vxc.approved",
            edited("vxc.approved", |p| p["padding"] = "x".repeat(70_000).into()),
            &["larger than the limit of 65536 bytes"],
        ),
    ];

    let mut good_ids = vec![
        store
            .enqueue("vxc.approved", &good, None)
            .await
            .unwrap()
            .unwrap(),
    ];
    let mut bad_ids = Vec::new();
    for (kind, payload, _) in &bad {
        bad_ids.push(store.enqueue(kind, payload, None).await.unwrap().unwrap());
    }
    good_ids.push(
        store
            .enqueue(
                "vxc.service_up",
                &sample("vxc.service_up").to_string(),
                None,
            )
            .await
            .unwrap()
            .unwrap(),
    );

    let run = env.herald(&["run", "--drain"]);
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "drain failed: {log}");

    assert!(
        !log.lines()
            .any(|line| line.starts_with("2026-01-01T00:00:00Z")),
        "a producer's kind cannot forge a log line: {log}"
    );
    for ((_, _, words), id) in bad.iter().zip(&bad_ids) {
        let row = env
            .rows(&format!(
                "SELECT status, reason FROM herald_outbox_status WHERE id = {id}"
            ))
            .await;
        let (status, reason) = (row[0][0].clone().unwrap(), row[0][1].clone().unwrap());
        assert_eq!(status, "failed", "row {id}");
        for word in *words {
            assert!(
                reason.contains(word),
                "row {id}: reason {reason:?} should mention {word:?}"
            );
        }
        assert!(
            log.contains(&format!("outbox_id={id} ")),
            "row {id} failure is logged"
        );
    }
    let failed_deliveries = env
        .value("SELECT CAST(count(*) AS TEXT) FROM herald_deliveries WHERE outbox_id IN (SELECT id FROM herald_outbox WHERE state = 'failed')")
        .await;
    assert_eq!(
        failed_deliveries.as_deref(),
        Some("0"),
        "a failed row sends nothing"
    );

    for id in &good_ids {
        let status = env
            .value(&format!(
                "SELECT status FROM herald_outbox_status WHERE id = {id}"
            ))
            .await;
        assert_eq!(status.as_deref(), Some("done"), "good row {id}");
    }
    assert_eq!(
        std::fs::read_dir(env.mail_dir()).unwrap().count(),
        4,
        "2 + 2 good messages written"
    );
}

async fn a_notification_without_recipients_is_recorded_not_failed(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    let store = env.store().await;
    // Fabrikam is in the directory but has no contacts.
    let payload = edited("vxc.approval_required", |p| {
        p["provider"] = serde_json::json!({ "company_id": "fabrikam", "name": "Fabrikam Cloud" });
    });
    let id = store
        .enqueue("vxc.approval_required", &payload, None)
        .await
        .unwrap()
        .unwrap();
    let run = env.herald(&["run", "--drain"]);
    assert!(run.status.success());
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(log.contains("no provider recipient"), "logged: {log}");

    let row = env
        .rows(&format!(
            "SELECT state, CAST(recipients AS TEXT), reason FROM herald_outbox WHERE id = {id}"
        ))
        .await
        .remove(0);
    assert_eq!(row[0].as_deref(), Some("dispatched"));
    assert_eq!(
        row[1].as_deref(),
        Some("2"),
        "the customer side still gets its two messages"
    );
    assert!(row[2].as_deref().unwrap().contains("no provider recipient"));
}

async fn a_repeated_idempotency_key_is_a_silent_no_op(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    let store = env.store().await;
    let payload = sample("vxc.approved").to_string();
    let first = store
        .enqueue("vxc.approved", &payload, Some("order-42-approved"))
        .await
        .unwrap();
    assert!(first.is_some());
    // A producer's plain INSERT with the same key: no error, no row.
    env.execute(&format!(
        "INSERT INTO herald_outbox (kind, payload, idempotency_key) \
         VALUES ('vxc.approved', '{payload}', 'order-42-approved')"
    ))
    .await
    .expect("the duplicate insert is not an error");
    assert_eq!(
        store
            .enqueue("vxc.approved", &payload, Some("order-42-approved"))
            .await
            .unwrap(),
        None
    );

    let run = env.herald(&["run", "--drain"]);
    assert!(run.status.success());
    let rows = env
        .value("SELECT CAST(count(*) AS TEXT) FROM herald_outbox")
        .await;
    assert_eq!(rows.as_deref(), Some("1"));
    assert_eq!(std::fs::read_dir(env.mail_dir()).unwrap().count(), 2);
}

async fn a_delivery_is_unique_per_row_notification_and_address(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    let id = env.enqueue_sample("vxc.approved").await;
    assert!(env.herald(&["run", "--drain"]).status.success());
    let again = env
        .execute(&format!(
            "INSERT INTO herald_deliveries (outbox_id, kind, audience, contact_id, recipient_name,
                recipient_email, message_id, next_attempt_at)
             VALUES ({id}, 'vxc.approved', 'customer', 'acme-dana', 'Dana', 'DANA@ACME.EXAMPLE',
                'x@y', '2000-01-01T00:00:00.000Z')"
        ))
        .await;
    assert!(
        again.is_err(),
        "the database refuses a second delivery of the same notification"
    );
}

#[tokio::test]
async fn a_row_that_is_not_utf8_fails_alone() {
    let env = TestEnv::new(Options::new(Sink::Files)).await;
    let store = sqlite(&env).await;
    // SQLite does not check that TEXT is UTF-8; a producer can store anything.
    let bad: i64 = sqlx::query_scalar(
        "INSERT INTO herald_outbox (kind, payload) VALUES ('vxc.approved', CAST(X'FFFE7B7D' AS TEXT)) RETURNING id",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    let good = env.enqueue_sample("vxc.approved").await;

    let run = env.herald(&["run", "--drain"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let status = |id: i64| {
        sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT status, reason FROM herald_outbox_status WHERE id = $1",
        )
        .bind(id)
        .fetch_one(store.pool())
    };
    let (state, reason) = status(bad).await.unwrap();
    assert_eq!(state, "failed");
    assert!(reason.unwrap().contains("not valid JSON"));
    assert_eq!(status(good).await.unwrap().0, "done");
}

#[tokio::test]
async fn values_of_the_wrong_type_are_refused_when_written() {
    let env = TestEnv::new(Options::new(Sink::Files)).await;
    let store = sqlite(&env).await;
    let blob =
        sqlx::query("INSERT INTO herald_outbox (kind, payload) VALUES ('vxc.approved', X'7B7D')")
            .execute(store.pool())
            .await;
    assert!(blob.is_err(), "a BLOB payload is refused at insert");
    let flag = sqlx::query(
        "INSERT INTO herald_contacts (id, company_id, name, email, role, active) \
         VALUES ('p1', 'acme', 'P', 'p@acme.example', 'company_admin', 'yes')",
    )
    .execute(store.pool())
    .await;
    assert!(flag.is_err(), "active must be 0 or 1");
}

#[tokio::test]
async fn a_contact_address_that_is_not_utf8_is_a_dead_delivery() {
    let env = TestEnv::new(Options::new(Sink::Files)).await;
    let store = sqlite(&env).await;
    sqlx::query(
        "INSERT INTO herald_contacts (id, company_id, name, email, role) \
         VALUES ('acme-bad', 'acme', 'Bad Bytes', CAST(X'626164FF40616362652E6578616D706C65' AS TEXT), 'company_admin')",
    )
    .execute(store.pool())
    .await
    .unwrap();
    sqlx::query("INSERT INTO herald_contact_groups VALUES ('acme-bad', 'ordering')")
        .execute(store.pool())
        .await
        .unwrap();
    env.enqueue_sample("vxc.approved").await;

    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    let states: Vec<(String, String)> = env
        .deliveries()
        .await
        .into_iter()
        .map(|(_, state, _, error, _)| (state, error.unwrap_or_default()))
        .collect();
    assert_eq!(states.len(), 3);
    assert_eq!(
        states[0],
        ("sent".into(), String::new()),
        "dana still gets hers"
    );
    assert_eq!(
        states[1],
        ("sent".into(), String::new()),
        "pat still gets his"
    );
    assert_eq!(states[2].0, "dead");
    assert!(
        states[2].1.starts_with("not a valid mailbox: ") && states[2].1.contains("SMTPUTF8"),
        "{states:?}"
    );
}

/// Contacts as a portal might store them: no `@`, a non-ASCII local part, and an
/// internationalised domain (which is fine, and sent to in its ASCII form).
async fn contacts_without_a_usable_address_are_dead_deliveries_with_the_reason(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    env.execute(
        "INSERT INTO herald_contacts (id, company_id, name, email, role) VALUES
            ('acme-noat', 'acme', 'No At', 'no-at-sign.acme.example', 'company_admin'),
            ('acme-utf8', 'acme', 'José', 'josé@acme.example', 'company_admin'),
            ('acme-idn', 'acme', 'Anna', 'anna@bücher.example', 'company_admin');
         INSERT INTO herald_contact_groups (contact_id, group_name) VALUES
            ('acme-noat', 'ordering'), ('acme-utf8', 'ordering'), ('acme-idn', 'ordering');",
    )
    .await
    .unwrap();
    let id = env.enqueue_sample("vxc.approved").await;

    let (ok, log) = env.drain().await;
    assert!(ok, "{log}");
    assert!(log.contains("delivery recorded dead"), "{log}");
    let rows: Vec<(String, String, String)> = env
        .deliveries()
        .await
        .into_iter()
        .map(|(to, state, _, error, _)| (to, state, error.unwrap_or_default()))
        .collect();
    let find = |to: &str| {
        rows.iter()
            .find(|r| r.0 == to)
            .unwrap_or_else(|| panic!("{to} in {rows:?}"))
            .clone()
    };
    assert_eq!(find("dana@acme.example").1, "sent");
    assert_eq!(find("anna@xn--bcher-kva.example").1, "sent");
    assert_eq!(
        find("no-at-sign.acme.example"),
        (
            "no-at-sign.acme.example".into(),
            "dead".into(),
            "not a valid mailbox: \"no-at-sign.acme.example\" is not a valid mailbox (no @)".into()
        )
    );
    assert_eq!(
        find("josé@acme.example").2,
        "not a valid mailbox: \"josé@acme.example\": a non-ASCII local part needs SMTPUTF8, \
         which herald does not use"
    );
    let status = env
        .rows(&format!(
            "SELECT status, reason FROM herald_outbox_status WHERE id = {id}"
        ))
        .await
        .remove(0);
    assert_eq!(
        status[0].as_deref(),
        Some("failed"),
        "not everyone was reached"
    );
    assert!(
        status[1]
            .as_deref()
            .unwrap()
            .contains("no-at-sign.acme.example: not a valid mailbox"),
        "{status:?}"
    );
}

on_both_backends!(
    bad_rows_fail_with_their_reason_and_good_rows_still_go_out,
    a_notification_without_recipients_is_recorded_not_failed,
    a_repeated_idempotency_key_is_a_silent_no_op,
    a_delivery_is_unique_per_row_notification_and_address,
    contacts_without_a_usable_address_are_dead_deliveries_with_the_reason,
);
