//! The command line as an operator meets it: the shipped demo, `check`, configuration errors,
//! `enqueue`, `status` and `preferences verify`.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::{Options, Sink, TestEnv, repo_copy, repo_path};

fn herald() -> Command {
    Command::new(env!("CARGO_BIN_EXE_herald"))
}

/// `herald check` on a repository copy's shipped configuration.
fn check(copy: &std::path::Path) -> std::process::Output {
    herald()
        .arg("--config")
        .arg(copy.join("config/herald.yaml"))
        .arg("check")
        .output()
        .unwrap()
}

#[test]
fn the_demo_writes_the_five_notifications_as_eml_files() {
    let copy = repo_copy();
    let output = Command::new(copy.path().join("examples/demo.sh"))
        .arg("--drain")
        .env("HERALD_BIN", env!("CARGO_BIN_EXE_herald"))
        .env_remove("HERALD_CONFIG")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    let mail: Vec<_> = std::fs::read_dir(copy.path().join("var/mail"))
        .unwrap()
        .collect();
    // The five required notifications reach eight recipients; vxc.denied adds two more.
    assert_eq!(mail.len(), 10, "six notifications to ten recipients");
    assert_eq!(log.matches("delivered").count(), 10, "{log}");
}

#[test]
fn check_accepts_the_shipped_configuration() {
    let output = herald()
        .args([
            "--config",
            &repo_path("config/herald.yaml").display().to_string(),
            "check",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("5 kinds, 20 templates, 6 notifications rendered"),
        "{stdout}"
    );
}

#[test]
fn check_lists_every_template_error_with_file_and_line() {
    let copy = repo_copy();
    let templates = copy.path().join("templates");
    std::fs::write(
        templates.join("vxc.approved/customer.html"),
        "{% extends \"layout.html\" %}\n{% block content %}\n{{ oops( }}\n{% endblock %}\n",
    )
    .unwrap();
    std::fs::write(
        templates.join("vxc.service_up/customer.txt"),
        "{% extends \"layout.txt\" %}\n{% block content %}\n{% if %}\n{% endblock %}\n",
    )
    .unwrap();
    std::fs::remove_file(templates.join("vxc.speed_change_requested/provider.subject.txt"))
        .unwrap();

    let output = check(copy.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
    assert!(stderr.contains("vxc.approved/customer.html:3:"), "{stderr}");
    assert!(
        stderr.contains("vxc.service_up/customer.txt:3:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("vxc.speed_change_requested/provider.subject.txt: missing"),
        "{stderr}"
    );
}

#[test]
fn check_reports_a_template_that_uses_an_undefined_value() {
    let copy = repo_copy();
    let file = copy
        .path()
        .join("templates/vxc.approved/customer.subject.txt");
    std::fs::write(&file, "Approved: {{ service_nmae }}").unwrap();
    let output = check(copy.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("vxc.approved/customer.subject.txt:1: undefined value"),
        "{stderr}"
    );
}

#[test]
fn configuration_errors_are_all_reported_with_their_paths() {
    let copy = repo_copy();
    let config = copy.path().join("config/herald.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("per_second: 10 ", "per_second: 0 ")
        .replace("initial_backoff: 1m", "initial_backoff: soon")
        .replace("lease: 5m", "lease: 2s")
        .replace(
            "secret: demo-only-secret-do-not-use-in-production",
            "secret: ${HERALD_TEST_UNSET_SECRET}",
        );
    std::fs::write(&config, text).unwrap();
    let output = herald()
        .arg("--config")
        .arg(&config)
        .arg("check")
        .env_remove("HERALD_TEST_UNSET_SECRET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("rate_limit.per_second: must be at least 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("delivery.lease: must be longer than the longest send"),
        "{stderr}"
    );
    assert!(
        stderr.contains("retry.initial_backoff: \"soon\" is not a duration"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "preferences.secret: environment variable HERALD_TEST_UNSET_SECRET is not set"
        ),
        "{stderr}"
    );

    // With the variable set, the secret comes from the environment and is never printed.
    let secret = "s3cret-from-the-environment-0123";
    let fixed = std::fs::read_to_string(&config)
        .unwrap()
        .replace("per_second: 0 ", "per_second: 10 ")
        .replace("initial_backoff: soon", "initial_backoff: 1m")
        .replace("lease: 2s", "lease: 5m");
    std::fs::write(&config, fixed).unwrap();
    let output = herald()
        .arg("--config")
        .arg(&config)
        .arg("check")
        .env("HERALD_TEST_UNSET_SECRET", secret)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains(secret));
}

#[test]
fn a_password_never_crosses_the_network_unencrypted_unless_allowed_and_is_never_printed() {
    let copy = repo_copy();
    let config = copy.path().join("config/herald.yaml");
    let password = "pa55-word-from-the-environment";
    let with_relay = |host: &str, tls: &str, extra: &str| {
        let text = std::fs::read_to_string(repo_path("config/herald.yaml"))
            .unwrap()
            .replace("  kind: file ", "  kind: smtp ")
            .replace("    host: 127.0.0.1", &format!("    host: {host}"))
            .replace("    tls: none ", &format!("    tls: {tls} "))
            .replace(
                "    # username: ${HERALD_SMTP_USERNAME}\n    # password: ${HERALD_SMTP_PASSWORD}",
                &format!("    username: herald\n    password: ${{HERALD_SMTP_PASSWORD}}{extra}"),
            );
        std::fs::write(&config, text).unwrap();
        let output = herald()
            .arg("--config")
            .arg(&config)
            .arg("check")
            .env("HERALD_SMTP_PASSWORD", password)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!all.contains(password), "the password was printed: {all}");
        (output.status.success(), all)
    };

    let (ok, out) = with_relay("relay.example.net", "none", "");
    assert!(!ok);
    assert!(
        out.contains(
            "transport.smtp: the password would cross the network to \"relay.example.net\" \
             unencrypted; set tls to starttls or implicit"
        ),
        "{out}"
    );
    let (ok, out) = with_relay(
        "relay.example.net",
        "none",
        "\n    allow_plaintext_auth: true",
    );
    assert!(ok, "{out}");
    let (ok, out) = with_relay("relay.example.net", "starttls", "");
    assert!(ok, "{out}");
    for loopback in ["127.0.0.1", "localhost", "::1"] {
        let (ok, out) = with_relay(loopback, "none", "");
        assert!(ok, "{loopback}: {out}");
    }

    // A password written in the file itself, next to a syntax error: the parser's excerpt of
    // the file would show it, so only the line and column are reported.
    let text = std::fs::read_to_string(repo_path("config/herald.yaml"))
        .unwrap()
        .replace(
            "    # password: ${HERALD_SMTP_PASSWORD}",
            &format!("    password: {password}"),
        )
        .replace("    timeout: 30s", "    timeout: [30s]");
    std::fs::write(&config, text).unwrap();
    let output = herald()
        .arg("--config")
        .arg(&config)
        .arg("check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("line ") && stderr.contains(" column "),
        "{stderr}"
    );
    assert!(
        !stderr.contains(password),
        "the password was printed: {stderr}"
    );
}

#[test]
fn per_domain_rates_must_name_real_domains_each_once() {
    let copy = repo_copy();
    let config = copy.path().join("config/herald.yaml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "  # domains:              # domains with a rate of their own\n  #   gmail.com: { per_second: 2, burst: 2 }",
        "  domains:\n    Gmail.COM: { per_second: 2 }\n    gmail.com: { per_second: 3 }\n    \"not a domain!!\": { per_second: 1 }\n    \"a@b.example\": { per_second: 1 }\n    bücher.example: { per_second: 1 }",
    );
    std::fs::write(&config, text).unwrap();
    let output = herald()
        .arg("--config")
        .arg(&config)
        .arg("check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    for expected in [
        "rate_limit.domains.gmail.com: the same domain as another entry (gmail.com); list it once",
        "rate_limit.domains.not a domain!!: \"not a domain!!\" is not a domain name",
        "rate_limit.domains.a@b.example: \"a@b.example\" is not a domain name",
    ] {
        assert!(stderr.contains(expected), "{expected} in {stderr}");
    }
    assert!(!stderr.contains("bücher"), "an IDN is a domain: {stderr}");
}

#[test]
fn an_unknown_configuration_key_is_an_error() {
    let copy = repo_copy();
    let config = copy.path().join("config/herald.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("  burst: 10", "  burts: 10");
    std::fs::write(&config, text).unwrap();
    let output = herald()
        .arg("--config")
        .arg(&config)
        .arg("check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("burts"), "{stderr}");
}

#[test]
fn a_missing_configuration_file_names_the_path() {
    let output = herald()
        .args(["--config", "/nonexistent/herald.yaml", "status"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("cannot read configuration file /nonexistent/herald.yaml")
    );
}

/// `herald status | head -1`: the reader goes away before herald has written everything,
/// which is no error and certainly no panic.
#[tokio::test]
async fn status_into_a_closed_pipe_is_quiet() {
    let env = TestEnv::new(Options::new(Sink::Files)).await;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let run = env
        .herald_command(&["status"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{:?}: {stderr}", run.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn enqueue_from_stdin_status_and_preferences_verify() {
    let env = TestEnv::new(Options::new(Sink::Files)).await;
    let payload =
        std::fs::read_to_string(repo_path("examples/payloads/vxc.approved.json")).unwrap();
    let mut child = env
        .herald_command(&["enqueue", "vxc.approved", "-", "--idempotency-key", "k1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(payload.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("enqueued outbox row 1 (vxc.approved)")
    );

    let status = env.herald(&["status"]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("outbox:     pending 1"), "{shown}");
    assert!(shown.contains("oldest pending: "), "{shown}");

    assert!(env.herald(&["run", "--drain"]).status.success());
    let shown = String::from_utf8_lossy(&env.herald(&["status"]).stdout).into_owned();
    assert!(
        shown.contains("deliveries: sent 2") && shown.contains("oldest pending: none"),
        "{shown}"
    );

    let mail = std::fs::read_dir(env.mail_dir())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(mail).unwrap();
    let message = mail_parser::MessageParser::default().parse(&bytes).unwrap();
    let text = message.body_text(0).unwrap();
    let link = text.lines().find(|l| l.contains("token=")).unwrap();
    let verified = env.herald(&["preferences", "verify", link]);
    assert!(verified.status.success());
    assert!(String::from_utf8_lossy(&verified.stdout).starts_with("valid: contact acme-"));

    let forged = link.replace("token=", "token=Zm9v.");
    let rejected = env.herald(&["preferences", "verify", &forged]);
    assert!(!rejected.status.success());
    assert!(String::from_utf8_lossy(&rejected.stdout).starts_with("invalid:"));
}

#[test]
fn check_goes_on_past_a_broken_template_and_names_undefined_values() {
    let copy = repo_copy();
    let templates = copy.path().join("templates");
    let edit = |file: &str, from: &str, to: &str| {
        let path = templates.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    };
    edit(
        "vxc.approved/customer.txt",
        "{% block content",
        "{% if %}{% block content",
    );
    edit(
        "vxc.approval_required/provider.subject.txt",
        "{{ reference }}",
        "{{ refrence }}",
    );
    edit(
        "vxc.approval_required/provider.html",
        "{{ reference }}",
        "{{ service_nmae }}",
    );
    edit(
        "vxc.service_up/customer.html",
        "{{ event_at | utc }}",
        "{{ event_at | utcc }}",
    );
    edit("vxc.denied/customer.txt", "layout.txt", "nolayout.txt");

    let output = check(copy.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("5 problem(s)"), "{stderr}");
    assert!(
        stderr.contains("vxc.denied/customer.txt:1: template not found")
            && stderr.contains("nolayout.txt"),
        "a layout that does not exist is reported: {stderr}"
    );
    assert!(stderr.contains("vxc.approved/customer.txt:"), "{stderr}");
    assert!(
        stderr.contains("provider.subject.txt:1: undefined value: `refrence` is undefined"),
        "{stderr}"
    );
    assert!(
        stderr.contains("provider.html:") && stderr.contains("service_nmae"),
        "{stderr}"
    );
    assert!(
        stderr.contains("vxc.service_up/customer.html:") && stderr.contains("utcc"),
        "{stderr}"
    );
}

#[test]
fn directory_import_refuses_unusable_contacts_and_an_accidental_empty_file() {
    let env = tempfile::tempdir().unwrap();
    let copy = repo_copy();
    let config = copy.path().join("config/herald.yaml");
    let import = |yaml: &str, extra: &[&str]| {
        let file = env.path().join("directory.yaml");
        std::fs::write(&file, yaml).unwrap();
        herald()
            .arg("--config")
            .arg(&config)
            .args(["directory", "import"])
            .arg(&file)
            .args(extra)
            .output()
            .unwrap()
    };

    let bad = import(
        "companies:\n  - id: a\n    name: A\n    contacts:\n\
         \x20     - { id: c1, name: '', email: c1@a.example, role: company_admin }\n\
         \x20     - { id: c2, name: José, email: josé@a.example, role: company_admin }\n",
        &[],
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("2 problem(s); nothing was imported"),
        "{stderr}"
    );
    assert!(
        stderr.contains("contact \"c1\": name must not be empty"),
        "{stderr}"
    );
    assert!(
        stderr.contains("contact \"c2\": not an email address herald can send to: \"josé@a.example\": a non-ASCII local part needs SMTPUTF8"),
        "{stderr}"
    );

    let empty = import("companies: []\n", &[]);
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("--allow-empty"));
    let allowed = import("companies: []\n", &["--allow-empty"]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
}

#[test]
fn status_does_not_create_a_missing_database() {
    let copy = repo_copy();
    let output = herald()
        .arg("--config")
        .arg(copy.path().join("config/herald.yaml"))
        .arg("status")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot open database"));
    assert!(!copy.path().join("var").exists(), "nothing was created");
}

#[test]
fn out_of_range_durations_and_empty_variables_are_refused() {
    let copy = repo_copy();
    let config = copy.path().join("config/herald.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("poll_interval: 1s", "poll_interval: 0s")
        .replace("max_backoff: 1h", "max_backoff: 100000000d")
        .replace(
            "tagline: Connectivity on demand",
            "tagline: ${HERALD_TEST_EMPTY}",
        );
    std::fs::write(&config, text).unwrap();
    let output = herald()
        .arg("--config")
        .arg(&config)
        .arg("check")
        .env("HERALD_TEST_EMPTY", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("database.poll_interval: \"0s\" is out of range; allowed 10ms to 1h"),
        "{stderr}"
    );
    assert!(
        stderr.contains("retry.max_backoff: \"100000000d\" is out of range"),
        "{stderr}"
    );
    assert!(
        stderr.contains("environment variable HERALD_TEST_EMPTY is set but empty"),
        "{stderr}"
    );
}

#[test]
fn an_in_memory_sqlite_database_is_refused() {
    let copy = repo_copy();
    let config = copy.path().join("config/herald.yaml");
    for url in ["sqlite://", "sqlite://:memory:", "sqlite::memory:"] {
        let text = std::fs::read_to_string(repo_path("config/herald.yaml"))
            .unwrap()
            .replace("sqlite://../var/herald.db", &format!("{url:?}"));
        std::fs::write(&config, text).unwrap();
        let output = check(copy.path());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{url} accepted");
        assert!(stderr.contains("database.url:"), "{url}: {stderr}");
    }
}

#[tokio::test]
async fn json_logs_carry_the_delivery_fields() {
    let env = TestEnv::new(Options::new(Sink::Files)).await;
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("log:\n  format: json\n{config}")).unwrap();
    env.enqueue_sample("vxc.speed_change_requested").await;
    let run = env.herald(&["run", "--drain"]);
    assert!(run.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&run.stderr)
        .lines()
        .map(|line| serde_json::from_str(line).expect("every log line is JSON"))
        .collect();
    let delivered = lines
        .iter()
        .find(|l| l["message"] == "delivered")
        .expect("a delivered line");
    assert_eq!(delivered["level"], "INFO");
    assert_eq!(delivered["recipient"], "noc@cloudco.example");
    assert_eq!(delivered["reference"], "5f3a9c1e");
    assert_eq!(delivered["kind"], "vxc.speed_change_requested");
    assert_eq!(delivered["outcome"], "sent");
    assert_eq!(delivered["attempt"], 1);
    assert!(delivered["outbox_id"].is_i64() && delivered["delivery_id"].is_i64());
}

#[test]
fn preview_prints_each_notification_as_it_would_be_sent() {
    let config = repo_path("config/herald.yaml");
    let preview = |args: &[&str]| {
        herald()
            .arg("--config")
            .arg(&config)
            .arg("preview")
            .args(args)
            .output()
            .unwrap()
    };

    let eml = preview(&["vxc.approval_required", "--audience", "customer"]);
    assert!(
        eml.status.success(),
        "{}",
        String::from_utf8_lossy(&eml.stderr)
    );
    let message = mail_parser::MessageParser::default()
        .parse(&eml.stdout)
        .unwrap();
    assert!(
        message
            .subject()
            .unwrap()
            .starts_with("VXC awaiting approval")
    );
    assert_eq!(
        message.to().unwrap().first().unwrap().address(),
        Some("customer@example.com")
    );
    assert!(message.body_html(0).unwrap().contains("2020-07-19"));

    let text = String::from_utf8(preview(&["vxc.service_up", "--format", "text"]).stdout).unwrap();
    assert!(
        text.starts_with("Service up: Sydney to CloudCo (5f3a9c1e)\n\n"),
        "{text}"
    );
    assert!(text.contains("2020-05-22 04:39:00 UTC"));

    let html = String::from_utf8(preview(&["vxc.denied", "--format", "html"]).stdout).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("reserved for another customer"));

    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("payload.json");
    let sample = std::fs::read_to_string(repo_path(
        "examples/payloads/vxc.speed_change_requested.json",
    ))
    .unwrap();
    std::fs::write(&own, sample.replace("2000", "5000")).unwrap();
    let custom = preview(&[
        "vxc.speed_change_requested",
        "--payload",
        own.to_str().unwrap(),
        "--format",
        "text",
    ]);
    assert!(String::from_utf8_lossy(&custom.stdout).contains("5000 Mbps"));

    let wrong = preview(&["vxc.approved", "--audience", "provider"]);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr)
            .contains("has no provider audience; it goes to: customer")
    );
}
