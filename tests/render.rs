//! Rendering of the five notifications: reviewed snapshots of the exact output, and the facts
//! the domain requires checked one by one.

mod support;

use chrono::{DateTime, Utc};
use herald::config::Settings;
use herald::outbox::{Audience, Payload};
use herald::render::{PreferenceSigner, RecipientView, RenderedMessage, Renderer, TemplateSet};
use support::{Options, Sink, TestEnv, repo_path};

struct Fixture {
    _env: TestEnv,
    settings: Settings,
    renderer: Renderer,
}

async fn fixture() -> Fixture {
    let env = TestEnv::new(Options::new(Sink::Files)).await;
    let settings = env.settings();
    let templates = TemplateSet::load(&settings.templates_dir, &settings.catalog).unwrap();
    let signer = PreferenceSigner::new(&settings.preferences.url, &settings.preferences.secret);
    let renderer = Renderer::new(templates, settings.brand.clone(), signer);
    Fixture {
        _env: env,
        settings,
        renderer,
    }
}

fn now() -> DateTime<Utc> {
    "2026-01-15T08:00:00Z".parse().unwrap()
}

const DANA: RecipientView<'static> = RecipientView {
    contact_id: "acme-dana",
    name: "Dana Smith",
    email: "dana@acme.example",
};
const NOC: RecipientView<'static> = RecipientView {
    contact_id: "cloudco-noc",
    name: "CloudCo NOC",
    email: "noc@cloudco.example",
};

impl Fixture {
    fn payload(&self, kind: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Payload {
        let text =
            std::fs::read_to_string(repo_path(&format!("examples/payloads/{kind}.json"))).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut value);
        self.settings
            .catalog
            .validate(kind, value.to_string())
            .unwrap()
            .1
    }

    fn render(
        &self,
        kind: &str,
        audience: Audience,
        recipient: RecipientView<'_>,
    ) -> RenderedMessage {
        self.render_with(kind, audience, recipient, |_| {})
    }

    fn render_with(
        &self,
        kind: &str,
        audience: Audience,
        recipient: RecipientView<'_>,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> RenderedMessage {
        let payload = self.payload(kind, edit);
        self.renderer
            .render(kind, audience, &payload, recipient, now())
            .unwrap()
    }
}

fn snapshot(message: &RenderedMessage) -> String {
    format!(
        "Subject: {}\n\n----- text -----\n{}\n----- html -----\n{}",
        message.subject, message.text, message.html
    )
}

#[tokio::test]
async fn approval_required_to_the_provider() {
    let fixture = fixture().await;
    let message = fixture.render("vxc.approval_required", Audience::Provider, NOC);
    insta::assert_snapshot!(snapshot(&message));

    for part in [&message.text, &message.html] {
        assert!(part.contains("Dear CloudCo NOC,"));
        assert!(part.contains("Acme Networks") && part.contains("CloudCo"));
        assert!(part.contains("5f3a9c1e"));
        assert!(part.contains("https://portal.interlink.example/approvals"));
    }
    assert!(message.subject.contains("5f3a9c1e"));
}

#[tokio::test]
async fn approval_required_to_the_customer_shows_the_expiry_date() {
    let fixture = fixture().await;
    let message = fixture.render("vxc.approval_required", Audience::Customer, DANA);
    insta::assert_snapshot!(snapshot(&message));

    // Ordered 2020-05-20 with the default 60-day window; the payer is the provider.
    for part in [&message.text, &message.html] {
        assert!(part.contains("2020-07-19"), "expiry date missing");
        assert!(part.contains("60 days"));
        assert!(part.contains("paying end"));
        assert!(part.contains("5f3a9c1e"));
    }

    let short = fixture.render_with("vxc.approval_required", Audience::Customer, DANA, |p| {
        p["approval_window_days"] = 10.into();
        p.as_object_mut().unwrap().remove("payer");
    });
    assert!(short.text.contains("2020-05-30"));
    assert!(
        !short.text.contains("paying end"),
        "no payer, no bill to accept"
    );
}

#[tokio::test]
async fn approved_to_the_customer() {
    let fixture = fixture().await;
    let message = fixture.render("vxc.approved", Audience::Customer, DANA);
    insta::assert_snapshot!(snapshot(&message));
    assert!(message.text.contains("approved") && message.text.contains("5f3a9c1e"));
}

#[tokio::test]
async fn service_up_shows_the_event_time_in_utc() {
    let fixture = fixture().await;
    let message = fixture.render("vxc.service_up", Audience::Customer, DANA);
    insta::assert_snapshot!(snapshot(&message));

    // The payload says 14:39 at +10:00.
    for part in [&message.text, &message.html] {
        assert!(part.contains("2020-05-22 04:39:00 UTC"));
        assert!(!part.contains("14:39"));
    }
}

#[tokio::test]
async fn speed_change_requested_to_the_provider() {
    let fixture = fixture().await;
    let message = fixture.render("vxc.speed_change_requested", Audience::Provider, NOC);
    insta::assert_snapshot!(snapshot(&message));
    for part in [&message.text, &message.html] {
        assert!(part.contains("2000 Mbps") && part.contains("1000 Mbps"));
        assert!(part.contains("Acme Networks") && part.contains("5f3a9c1e"));
    }

    let unknown_current =
        fixture.render_with("vxc.speed_change_requested", Audience::Provider, NOC, |p| {
            p.as_object_mut().unwrap().remove("current_speed_mbps");
        });
    assert!(unknown_current.text.contains("2000 Mbps"));
    assert!(!unknown_current.text.contains("1000 Mbps"));
}

#[tokio::test]
async fn denied_to_the_customer_a_kind_added_without_code() {
    let fixture = fixture().await;
    let message = fixture.render("vxc.denied", Audience::Customer, DANA);
    insta::assert_snapshot!(snapshot(&message));
    for part in [&message.text, &message.html] {
        assert!(part.contains("did not approve") && part.contains("5f3a9c1e"));
        assert!(part.contains("2020-05-21 08:30:00 UTC"));
        assert!(part.contains("reserved for another customer"));
    }
    let without_reason = fixture.render_with("vxc.denied", Audience::Customer, DANA, |p| {
        p.as_object_mut().unwrap().remove("denial_reason");
    });
    assert!(!without_reason.text.contains("Their reason"));
}

#[tokio::test]
async fn every_email_has_the_shared_layout_and_a_signed_preference_link() {
    let fixture = fixture().await;
    let signer = PreferenceSigner::new(
        &fixture.settings.preferences.url,
        &fixture.settings.preferences.secret,
    );
    let message = fixture.render("vxc.approved", Audience::Customer, DANA);

    for part in [&message.text, &message.html] {
        for fact in [
            "Interlink Exchange",
            "Connectivity on demand",
            "support@interlink.example",
            "https://www.interlink.example",
            "https://docs.interlink.example",
            "© 2026 Interlink Exchange",
            "Level 5, 100 Harbour Street",
            "notification preferences",
        ] {
            assert!(part.contains(fact), "{fact:?} missing");
        }
    }

    let link = message
        .text
        .lines()
        .find(|line| {
            line.starts_with("https://portal.interlink.example/notifications/preferences?token=")
        })
        .expect("preference link in the text part");
    let identity = signer.verify(link).unwrap();
    assert_eq!(
        (identity.contact_id.as_str(), identity.email.as_str()),
        ("acme-dana", "dana@acme.example")
    );
    assert!(
        message.html.contains(link),
        "the HTML part carries the same link"
    );

    let tampered = link.replace("token=", "token=x");
    assert!(signer.verify(&tampered).is_err());
    let other = PreferenceSigner::new(
        &fixture.settings.preferences.url,
        &herald::config::Secret::new("another-secret-0123456789"),
    );
    assert!(other.verify(link).is_err());
}

#[tokio::test]
async fn payload_values_are_escaped_in_html_and_never_evaluated() {
    let fixture = fixture().await;
    let message = fixture.render_with("vxc.approved", Audience::Customer, DANA, |p| {
        p["service_name"] = "<script>alert('x')</script> & {{ brand.name }}".into();
    });
    assert!(
        message
            .html
            .contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; {{ brand.name }}")
    );
    assert!(!message.html.contains("<script>"));
    assert!(
        message
            .text
            .contains("<script>alert('x')</script> & {{ brand.name }}")
    );
}

#[tokio::test]
async fn a_reference_stays_one_segment_of_the_portal_link() {
    let fixture = fixture().await;
    let message = fixture.render_with("vxc.approved", Audience::Customer, DANA, |p| {
        p["reference"] = "../../admin?delete=1".into();
    });
    let link = "https://portal.interlink.example/services/..%2F..%2Fadmin%3Fdelete%3D1";
    assert!(message.text.contains(link), "{}", message.text);
    assert!(message.html.contains(link));
}

#[tokio::test]
async fn an_undefined_value_is_an_error_naming_the_template_and_line() {
    let fixture = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    support::copy_tree(&repo_path("templates"), dir.path());
    let broken = dir.path().join("vxc.approved/customer.txt");
    let source = std::fs::read_to_string(&broken).unwrap();
    std::fs::write(
        &broken,
        source.replacen("{{ reference }}", "{{ refrence }}", 1),
    )
    .unwrap();

    let templates = TemplateSet::load(dir.path(), &fixture.settings.catalog).unwrap();
    let signer = PreferenceSigner::new(
        &fixture.settings.preferences.url,
        &fixture.settings.preferences.secret,
    );
    let renderer = Renderer::new(templates, fixture.settings.brand.clone(), signer);
    let payload = fixture.payload("vxc.approved", |_| {});
    let err = renderer
        .render("vxc.approved", Audience::Customer, &payload, DANA, now())
        .unwrap_err();
    assert_eq!(err.template, "vxc.approved/customer.txt");
    let line = source
        .lines()
        .position(|l| l.contains("{{ reference }}"))
        .unwrap()
        + 1;
    assert_eq!(err.line, Some(line));
    assert!(err.reason.contains("undefined"), "{err}");
}
