//! Recipient selection over the shipped sample directory: who gets each sample notification,
//! and why everyone else does not.

mod support;

use std::collections::BTreeSet;

use herald::dispatch::planner::decide;
use herald::outbox::Audience;
use herald::outbox::OutboxEvent;
use herald::store::{NewDelivery, OutboxDecision, Store};
use support::{Backend, Options, Sink, TestEnv, repo_path};

async fn recipients(env: &TestEnv, kind: &str) -> BTreeSet<(String, String)> {
    let payload =
        std::fs::read_to_string(repo_path(&format!("examples/payloads/{kind}.json"))).unwrap();
    let event = OutboxEvent {
        id: 1,
        kind: kind.into(),
        payload: payload.into_bytes(),
    };
    match decide(
        &env.store().await,
        &env.settings(),
        &event,
        &mut Default::default(),
    )
    .await
    .unwrap()
    {
        OutboxDecision::Dispatched { deliveries, .. } => deliveries
            .iter()
            .map(|d: &NewDelivery| (d.audience.to_string(), d.recipient_email.clone()))
            .collect(),
        OutboxDecision::Failed { reason } => panic!("{kind} failed: {reason}"),
    }
}

fn set(rows: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    rows.iter()
        .map(|(a, e)| (a.to_string(), e.to_string()))
        .collect()
}

async fn the_sample_payloads_reach_exactly_the_expected_contacts(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    assert_eq!(
        recipients(&env, "vxc.approval_required").await,
        set(&[
            ("provider", "noc@cloudco.example"),
            ("customer", "dana@acme.example"),
            ("customer", "pat@acme.example"),
        ])
    );
    assert_eq!(
        recipients(&env, "vxc.approved").await,
        set(&[
            ("customer", "dana@acme.example"),
            ("customer", "pat@acme.example")
        ])
    );
    assert_eq!(
        recipients(&env, "vxc.service_up").await,
        set(&[
            ("customer", "dana@acme.example"),
            ("customer", "lee@acme.example")
        ])
    );
    assert_eq!(
        recipients(&env, "vxc.speed_change_requested").await,
        set(&[("provider", "noc@cloudco.example")])
    );
}

async fn each_sample_contact_left_out_is_left_out_for_its_own_reason(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    let mut everyone = BTreeSet::new();
    for kind in support::SAMPLE_KINDS {
        everyone.extend(
            recipients(&env, kind)
                .await
                .into_iter()
                .map(|(_, email)| email),
        );
    }
    // finance role, inactive, read_only role, not subscribed to ordering: never chosen.
    for excluded in [
        "billing@acme.example",
        "sam@acme.example",
        "jo@cloudco.example",
        "ana@cloudco.example",
    ] {
        assert!(
            !everyone.contains(excluded),
            "{excluded} must not receive anything"
        );
    }

    // Each exclusion is down to that one attribute: fix it and the contact is chosen.
    env.execute("UPDATE herald_contacts SET role = 'technical_contact' WHERE id = 'acme-fin'")
        .await
        .unwrap();
    env.execute("UPDATE herald_contacts SET active = TRUE WHERE id = 'acme-old'")
        .await
        .unwrap();
    env.execute("UPDATE herald_contacts SET role = 'company_admin' WHERE id = 'cloudco-ro'")
        .await
        .unwrap();
    env.execute("INSERT INTO herald_contact_groups VALUES ('cloudco-ana', 'ordering')")
        .await
        .unwrap();
    let now_chosen: BTreeSet<String> = recipients(&env, "vxc.approval_required")
        .await
        .into_iter()
        .map(|(_, email)| email)
        .collect();
    for included in [
        "billing@acme.example",
        "sam@acme.example",
        "jo@cloudco.example",
        "ana@cloudco.example",
    ] {
        assert!(
            now_chosen.contains(included),
            "{included} should be chosen once eligible"
        );
    }
}

async fn the_same_address_on_two_contacts_is_notified_once(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    env.execute(
        "INSERT INTO herald_contacts (id, company_id, name, email, role) \
         VALUES ('acme-dana-2', 'acme', 'Dana S.', 'DANA@acme.example', 'technical_admin')",
    )
    .await
    .unwrap();
    env.execute("INSERT INTO herald_contact_groups VALUES ('acme-dana-2', 'ordering')")
        .await
        .unwrap();
    let chosen = recipients(&env, "vxc.approved").await;
    let danas = chosen
        .iter()
        .filter(|(_, e)| e.eq_ignore_ascii_case("dana@acme.example"))
        .count();
    assert_eq!(danas, 1);
}

async fn the_requester_is_not_notified_when_not_subscribed(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    // Dana requested the VXC but leaves the ordering group.
    env.execute("DELETE FROM herald_contact_groups WHERE contact_id = 'acme-dana' AND group_name = 'ordering'").await.unwrap();
    let chosen = recipients(&env, "vxc.approved").await;
    assert_eq!(chosen, set(&[("customer", "pat@acme.example")]));
}

/// A planning batch is recorded in one go: each outbox row gets its own state, count and
/// reason, and only a dispatched row gets deliveries. Recording the same batch again, as a
/// daemon whose planning lease ran out would, changes nothing.
async fn a_planning_batch_is_recorded_once(backend: Backend) {
    let env = TestEnv::new(Options::on(backend, Sink::Files)).await;
    for _ in 0..3 {
        env.enqueue_sample("vxc.approved").await;
    }
    let store = env.store().await;
    let events = store
        .claim_outbox(10, std::time::Duration::from_secs(60), chrono::Utc::now())
        .await
        .unwrap();
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 3);
    let delivery = |email: &str, dead: Option<&str>| NewDelivery {
        audience: Audience::Customer,
        contact_id: format!("contact-{email}"),
        recipient_name: "Dana O'Neil".into(),
        recipient_email: email.into(),
        message_id: format!("<{email}.{}@test>", ids[0]),
        dead: dead.map(String::from),
    };
    let decisions = vec![
        (
            ids[0],
            OutboxDecision::Dispatched {
                deliveries: vec![
                    delivery("dana@acme.example", None),
                    delivery("bad address", Some("not a valid mailbox: no @")),
                ],
                note: None,
            },
        ),
        (
            ids[1],
            OutboxDecision::Failed {
                reason: "payload field \"customer.company_id\": unknown".into(),
            },
        ),
        (
            ids[2],
            OutboxDecision::Dispatched {
                deliveries: vec![],
                note: Some("no customer recipient".into()),
            },
        ),
    ];
    let now = chrono::Utc::now();
    assert_eq!(
        store.record_decisions(&decisions, now).await.unwrap(),
        [true, true, true]
    );

    let outbox = env
        .rows("SELECT state, CAST(recipients AS TEXT), reason FROM herald_outbox ORDER BY id")
        .await;
    let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
    let outbox: Vec<[String; 3]> = outbox
        .iter()
        .map(|r| [text(&r[0]), text(&r[1]), text(&r[2])])
        .collect();
    assert_eq!(
        outbox,
        [
            ["dispatched", "2", "NULL"],
            [
                "failed",
                "NULL",
                "payload field \"customer.company_id\": unknown"
            ],
            ["dispatched", "0", "no customer recipient"],
        ]
        .map(|row| row.map(String::from))
    );
    let planned = || async {
        env.rows(
            "SELECT CAST(outbox_id AS TEXT), recipient_email, state, last_error \
             FROM herald_deliveries ORDER BY id",
        )
        .await
    };
    let first = planned().await;
    assert_eq!(
        first,
        [
            vec![
                Some(ids[0].to_string()),
                Some("dana@acme.example".into()),
                Some("queued".into()),
                None
            ],
            vec![
                Some(ids[0].to_string()),
                Some("bad address".into()),
                Some("dead".into()),
                Some("not a valid mailbox: no @".into())
            ],
        ]
    );

    assert_eq!(
        store.record_decisions(&decisions, now).await.unwrap(),
        [false, false, false],
        "rows already decided are not decided again"
    );
    assert_eq!(planned().await, first);
}

on_both_backends!(
    a_planning_batch_is_recorded_once,
    the_sample_payloads_reach_exactly_the_expected_contacts,
    each_sample_contact_left_out_is_left_out_for_its_own_reason,
    the_same_address_on_two_contacts_is_notified_once,
    the_requester_is_not_notified_when_not_subscribed,
);
