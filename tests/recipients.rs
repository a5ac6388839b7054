//! Recipient selection over the shipped sample directory: who gets each sample notification,
//! and why everyone else does not.

mod support;

use std::collections::BTreeSet;

use herald::dispatch::planner::decide;
use herald::outbox::OutboxEvent;
use herald::store::{NewDelivery, OutboxDecision};
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

on_both_backends!(
    the_sample_payloads_reach_exactly_the_expected_contacts,
    each_sample_contact_left_out_is_left_out_for_its_own_reason,
    the_same_address_on_two_contacts_is_notified_once,
    the_requester_is_not_notified_when_not_subscribed,
);
