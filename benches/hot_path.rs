//! The per-message hot path, measured with criterion: validating a payload, rendering one
//! notification (subject, text and HTML through the shared layout), building the MIME message,
//! and choosing recipients from a company's contacts. Run with `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::path::Path;

use chrono::{DateTime, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use herald::config::Settings;
use herald::directory::{Contact, DirectoryFile, select_recipients};
use herald::outbox::{Audience, Payload};
use herald::render::message::{Envelope, build_message};
use herald::render::{PreferenceSigner, RecipientView, Renderer, TemplateSet};

const KIND: &str = "vxc.approval_required";

fn repo(relative: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn hot_path(c: &mut Criterion) {
    let settings = Settings::load(&repo("config/herald.yaml")).expect("the shipped configuration");
    let templates = TemplateSet::load(&settings.templates_dir, &settings.catalog).unwrap();
    let signer = PreferenceSigner::new(&settings.preferences.url, &settings.preferences.secret);
    let renderer = Renderer::new(templates, settings.brand.clone(), signer);
    let payload_text =
        std::fs::read_to_string(repo(&format!("examples/payloads/{KIND}.json"))).unwrap();
    let (_, payload) = settings
        .catalog
        .validate(KIND, payload_text.as_bytes())
        .unwrap();
    let recipient = RecipientView {
        contact_id: "acme-dana",
        name: "Dana Smith",
        email: "dana@acme.example",
    };
    let now: DateTime<Utc> = "2026-01-15T08:00:00Z".parse().unwrap();

    let mut group = c.benchmark_group("message");
    group.throughput(Throughput::Elements(1));
    group.bench_function("validate payload", |b| {
        b.iter(|| {
            settings
                .catalog
                .validate(KIND, black_box(payload_text.as_bytes()))
                .unwrap()
        })
    });
    let render = |payload: &Payload| {
        renderer
            .render(KIND, Audience::Customer, payload, recipient, now)
            .unwrap()
    };
    group.bench_function("render", |b| b.iter(|| render(black_box(&payload))));
    let rendered = render(&payload);
    let envelope = Envelope {
        to_name: recipient.name,
        to_email: recipient.email,
        message_id: "herald.1.0123456789abcdef@interlink.example",
        date: now,
    };
    group.bench_function("build MIME", |b| {
        b.iter(|| build_message(&settings.brand, envelope, black_box(&rendered)))
    });
    // The measure of the hot path: a validated payload rendered and built into MIME.
    group.bench_function("render + build MIME", |b| {
        b.iter(|| build_message(&settings.brand, envelope, &render(black_box(&payload))))
    });
    group.bench_function("validate + render + build MIME", |b| {
        b.iter(|| {
            let (_, payload) = settings
                .catalog
                .validate(KIND, black_box(payload_text.as_bytes()))
                .unwrap();
            build_message(&settings.brand, envelope, &render(&payload))
        })
    });
    group.finish();

    let directory = DirectoryFile::load(&repo("examples/directory.yaml")).unwrap();
    let acme: Vec<Contact> = directory
        .companies
        .iter()
        .find(|company| company.id == "acme")
        .map(|company| company.contacts.iter().map(|c| c.to_contact()).collect())
        .unwrap();
    c.bench_function("select recipients (5 contacts)", |b| {
        b.iter(|| select_recipients(black_box(&acme), "ordering", &settings.recipients))
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
