//! What only PostgreSQL offers: several daemons on one outbox, takeover of a dead daemon's
//! work, and wake-up on insert. (Everything else runs on both backends in the other suites.)

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use herald::store::Store;
use support::scripted_smtp::ScriptedSmtp;
use support::{Aiosmtpd, Backend, Options, Sink, TestEnv, repo_path, terminate};

/// A test environment on PostgreSQL, or `None` when no server is configured.
async fn postgres_env(sink: Sink, edit: impl FnOnce(&mut Options)) -> Option<TestEnv> {
    let mut options = Options::on(Backend::postgres()?, sink);
    edit(&mut options);
    Some(TestEnv::new(options).await)
}

/// Inserts `rows` outbox rows of the approval sample (three deliveries each) in one statement.
async fn fill_outbox(env: &TestEnv, rows: u32) {
    let payload =
        std::fs::read_to_string(repo_path("examples/payloads/vxc.approval_required.json")).unwrap();
    env.execute(&format!(
        "INSERT INTO herald_outbox (kind, payload) \
         SELECT 'vxc.approval_required', '{payload}' FROM generate_series(1, {rows})"
    ))
    .await
    .unwrap();
}

async fn count(env: &TestEnv, sql: &str) -> usize {
    env.value(sql).await.unwrap().parse().unwrap()
}

async fn wait_for(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_share_3000_deliveries_each_sent_exactly_once() {
    let smtp = Aiosmtpd::start();
    let Some(env) = postgres_env(Sink::Smtp(smtp.port), |o| o.per_second = 5000).await else {
        return;
    };
    fill_outbox(&env, 1000).await;
    let mut daemons: Vec<_> = (0..3)
        .map(|i| env.spawn_daemon(&format!("daemon-{i}.log")))
        .collect();

    wait_for("3,000 messages", Duration::from_secs(240), async || {
        smtp.received().len() >= 3000
    })
    .await;
    // A moment for any duplicate to show up before stopping.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for daemon in &mut daemons {
        terminate(daemon.id().unwrap());
        assert!(daemon.wait().await.unwrap().success());
    }

    let received = smtp.received();
    let ids: BTreeSet<String> = received
        .iter()
        .map(|(_, bytes)| {
            let message = mail_parser::MessageParser::default().parse(bytes).unwrap();
            message.message_id().unwrap().to_string()
        })
        .collect();
    assert_eq!(received.len(), 3000, "no message twice");
    assert_eq!(ids.len(), 3000, "every delivery once");
    let sent = count(
        &env,
        "SELECT CAST(count(*) AS TEXT) FROM herald_deliveries WHERE state = 'sent'",
    )
    .await;
    assert_eq!(sent, 3000);

    // The work was shared: every daemon delivered some of it.
    for i in 0..3 {
        let log = std::fs::read_to_string(env.dir.path().join(format!("daemon-{i}.log"))).unwrap();
        let delivered = log.matches(" delivered ").count();
        assert!(delivered > 0, "daemon {i} delivered nothing");
        eprintln!("daemon {i} delivered {delivered}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_daemons_work_is_taken_over_after_its_lease() {
    let smtp = ScriptedSmtp::start().await;
    smtp.delay_data(Duration::from_millis(200));
    let Some(env) = postgres_env(Sink::Smtp(smtp.port), |o| o.smtp_timeout = "1s").await else {
        return;
    };
    // A short lease so that the takeover comes within the test: 5 s, above the 4 s that a send
    // may take with a 1 s timeout.
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("lease: 1m", "lease: 5s");
    std::fs::write(&env.config, config).unwrap();
    fill_outbox(&env, 10).await;

    let mut first = env.spawn_daemon("first.log");
    wait_for("a few messages", Duration::from_secs(30), async || {
        smtp.transactions().len() >= 3
    })
    .await;
    first.start_kill().unwrap(); // SIGKILL, mid-batch
    first.wait().await.unwrap();
    let sent_by_first = smtp.accepted().len();
    assert!(sent_by_first < 30, "killed before the end");

    let killed_at = Instant::now();
    let mut second = env.spawn_daemon("second.log");
    wait_for("all 30 deliveries", Duration::from_secs(60), async || {
        count(
            &env,
            "SELECT CAST(count(*) AS TEXT) FROM herald_deliveries WHERE state = 'sent'",
        )
        .await
            == 30
    })
    .await;
    terminate(second.id().unwrap());
    assert!(second.wait().await.unwrap().success());
    assert!(
        killed_at.elapsed() >= Duration::from_secs(4),
        "the takeover waited for the lease"
    );

    // Every delivery arrived; a resend is possible only for the messages in flight at the kill
    // (at most one per SMTP session), and it carries the same Message-ID.
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for transaction in smtp.accepted() {
        *per_id.entry(transaction.message_id).or_default() += 1;
    }
    assert_eq!(per_id.len(), 30, "every delivery arrived");
    let resent: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    let sessions = Options::on(Backend::Sqlite, Sink::Files).smtp_connections as usize;
    assert!(
        resent.len() <= sessions,
        "only the messages in flight may be sent twice: {resent:?}"
    );
    eprintln!(
        "first daemon sent {sent_by_first} before SIGKILL; resent after takeover: {}",
        resent.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_insert_wakes_an_idle_daemon_at_once() {
    let smtp = ScriptedSmtp::start().await;
    let Some(env) = postgres_env(Sink::Smtp(smtp.port), |_| {}).await else {
        return;
    };
    // A poll interval far longer than the bound asserted below: only the wake-up can explain
    // a quick delivery.
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("poll_interval: 200ms", "poll_interval: 30s");
    std::fs::write(&env.config, config).unwrap();
    let mut daemon = env.spawn_daemon("daemon.log");
    // Let it start and go idle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let store = env.store().await;
    let payload = std::fs::read_to_string(repo_path(
        "examples/payloads/vxc.speed_change_requested.json",
    ))
    .unwrap();
    let mut latencies = Vec::new();
    for round in 1..=5 {
        let inserted = Instant::now();
        store
            .enqueue("vxc.speed_change_requested", &payload, None)
            .await
            .unwrap();
        wait_for("the woken daemon", Duration::from_secs(10), async || {
            smtp.accepted().len() >= round
        })
        .await;
        latencies.push(inserted.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    terminate(daemon.id().unwrap());
    assert!(daemon.wait().await.unwrap().success());

    latencies.sort();
    eprintln!(
        "insert to SMTP accept: median {:?}, max {:?}",
        latencies[2], latencies[4]
    );
    assert!(
        latencies[4] < Duration::from_secs(3),
        "woken well within the 30 s poll: {latencies:?}"
    );
}

/// A PostgreSQL server of the test's own, in a temporary folder on a free port, so that
/// restarting it never disturbs the shared server. Run as the `postgres` user, since the server
/// refuses to run as root.
struct ThrowawayServer {
    bin: std::path::PathBuf,
    data: tempfile::TempDir,
    port: u16,
}

impl ThrowawayServer {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's binaries in /usr/lib/postgresql")
            .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
            .find(|bin| bin.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let data = tempfile::tempdir().unwrap();
        let port = support::free_port();
        let server = Self { bin, data, port };
        server.as_postgres("chown", &["-R", "postgres", &server.data_dir()], false);
        server.as_postgres(
            &server.tool("initdb"),
            &["-D", &server.data_dir(), "-A", "trust", "-U", "postgres"],
            true,
        );
        server.pg_ctl("start");
        server
    }

    fn data_dir(&self) -> String {
        self.data.path().display().to_string()
    }

    fn tool(&self, name: &str) -> String {
        self.bin.join(name).display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.data_dir()
        );
        let log = format!("{}/server.log", self.data_dir());
        let mut args = vec![
            "-D",
            self.data.path().to_str().unwrap(),
            "-w",
            "-l",
            &log,
            "-o",
            &options,
        ];
        if action == "stop" {
            args.extend(["-m", "fast"]);
        }
        args.push(action);
        self.as_postgres(&self.tool("pg_ctl"), &args, true);
    }

    /// Runs a command, as the `postgres` user when `drop_root`.
    fn as_postgres(&self, program: &str, args: &[&str], drop_root: bool) {
        let mut command = if drop_root {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--", program]);
            command
        } else {
            std::process::Command::new(program)
        };
        let output = command.args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for ThrowawayServer {
    fn drop(&mut self) {
        let _stopped = std::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &self.tool("pg_ctl"),
                "-D",
                &self.data_dir(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_survives_a_database_restart() {
    if Backend::postgres().is_none() {
        return;
    }
    let server = ThrowawayServer::start();
    let smtp = ScriptedSmtp::start().await;
    let env = TestEnv::new(Options::on(
        Backend::Postgres(server.url()),
        Sink::Smtp(smtp.port),
    ))
    .await;
    let mut daemon = env.spawn_daemon("daemon.log");

    env.enqueue_sample("vxc.approved").await;
    wait_for("the first row", Duration::from_secs(20), async || {
        smtp.accepted().len() >= 2
    })
    .await;

    server.pg_ctl("stop");
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.pg_ctl("start");

    // Inserted after the restart: found by the re-established LISTEN or by the poll.
    env.enqueue_sample("vxc.service_up").await;
    env.enqueue_sample("vxc.speed_change_requested").await;
    wait_for(
        "the rows inserted after the restart",
        Duration::from_secs(60),
        async || smtp.accepted().len() >= 5,
    )
    .await;
    terminate(daemon.id().unwrap());
    assert!(
        daemon.wait().await.unwrap().success(),
        "the daemon kept running through the outage"
    );

    let sent = count(
        &env,
        "SELECT CAST(count(*) AS TEXT) FROM herald_deliveries WHERE state = 'sent'",
    )
    .await;
    assert_eq!(sent, 5, "nothing lost");
    assert_eq!(smtp.accepted().len(), 5, "nothing sent twice");
    let log = std::fs::read_to_string(env.dir.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("retrying") || log.contains("reconnecting"),
        "the outage was logged: {log}"
    );
}

/// The database stops in the middle of a drain. The drain fails, saying why, without waiting
/// out a connection timeout (10 s) for each outcome it could not record: the few statements
/// still needed (releasing claims, planning's last batch, leaving the daemon list) each wait
/// one out, 40-50 s in all. Once the database is back, every delivery is sent, and only the
/// messages whose outcome was lost can have gone out twice (at most two per SMTP session).
#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_mid_drain_fails_it_soon_and_loses_nothing() {
    if Backend::postgres().is_none() {
        return;
    }
    let server = ThrowawayServer::start();
    let smtp = ScriptedSmtp::start().await;
    smtp.delay_data(Duration::from_millis(20));
    let mut options = Options::on(Backend::Postgres(server.url()), Sink::Smtp(smtp.port));
    options.smtp_timeout = "1s";
    let sessions = options.smtp_connections as usize;
    let env = TestEnv::new(options).await;
    // A short lease, so that what the failed drain held is due again soon after.
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, config.replace("lease: 1m", "lease: 6s")).unwrap();
    fill_outbox(&env, 100).await;

    let mut drain = tokio::process::Command::from(env.herald_command(&["run", "--drain"]));
    drain
        .kill_on_drop(true)
        .stderr(std::process::Stdio::piped());
    let drain = drain.spawn().unwrap();
    wait_for("the first messages", Duration::from_secs(30), async || {
        smtp.accepted().len() >= 30
    })
    .await;
    let stopped = Instant::now();
    server.pg_ctl("stop");
    let output = tokio::time::timeout(Duration::from_secs(120), drain.wait_with_output())
        .await
        .expect("the drain ends")
        .unwrap();
    let failed_after = stopped.elapsed();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("database"), "{log}");
    assert!(
        failed_after < Duration::from_secs(75),
        "the drain failed {failed_after:?} after the database stopped"
    );

    server.pg_ctl("start");
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(
        &env,
        "SELECT CAST(count(*) AS TEXT) FROM herald_deliveries WHERE state = 'sent'",
    )
    .await
        < 300
    {
        assert!(Instant::now() < deadline, "not all sent after the outage");
        let (_, log) = env.drain().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(log);
    }
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    for transaction in smtp.accepted() {
        *accepted.entry(transaction.message_id).or_default() += 1;
    }
    assert_eq!(accepted.len(), 300, "every delivery reached the relay");
    let extra: usize = accepted.values().map(|n| n - 1).sum();
    assert!(
        extra <= 2 * sessions,
        "{extra} extra copies for {sessions} sessions: {failed_after:?} to fail"
    );
    eprintln!("the drain failed {failed_after:?} after the database stopped; {extra} extra copies");
}
