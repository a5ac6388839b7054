//! Hot reload as a template author meets it: a save is used by the next message within a
//! second, a broken save never reaches anyone, and a burst of saves ends with the last one.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use support::{Options, Sink, TestEnv, copy_tree, repo_path};

struct Author {
    env: TestEnv,
    _templates_dir: tempfile::TempDir,
    templates: PathBuf,
    daemon: tokio::process::Child,
    log: PathBuf,
}

impl Author {
    async fn start() -> Self {
        let templates_dir = tempfile::tempdir().unwrap();
        let templates_copy = templates_dir.path().to_path_buf();
        copy_tree(&repo_path("templates"), &templates_copy);
        let mut options = Options::new(Sink::Files);
        options.templates = Some(templates_copy.clone());
        let env = TestEnv::new(options).await;
        let log = env.dir.path().join("daemon.log");
        let daemon = tokio::process::Command::from(env.herald_command(&["run"]))
            .kill_on_drop(true)
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let author = Self {
            env,
            _templates_dir: templates_dir,
            templates: templates_copy,
            daemon,
            log,
        };
        author.wait_for_log("watching templates", 1).await;
        author
    }

    fn subject_file(&self) -> PathBuf {
        self.templates.join("vxc.approved/customer.subject.txt")
    }

    fn log_count(&self, text: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(text)
            .count()
    }

    async fn wait_for_log(&self, text: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log_count(text) < count {
            assert!(
                Instant::now() < deadline,
                "no {count}× {text:?} in the log:\n{}",
                std::fs::read_to_string(&self.log).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The subjects of every message written so far, with the time each file was written.
    fn subjects(&self) -> Vec<(SystemTime, String)> {
        let Ok(entries) = std::fs::read_dir(self.env.mail_dir()) else {
            return Vec::new();
        };
        let mut subjects: Vec<_> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
            .map(|e| {
                let bytes = std::fs::read(e.path()).unwrap();
                let message = mail_parser::MessageParser::default().parse(&bytes).unwrap();
                (
                    e.metadata().unwrap().modified().unwrap(),
                    message.subject().unwrap_or_default().to_string(),
                )
            })
            .collect();
        subjects.sort();
        subjects
    }

    /// Enqueues one vxc.approved row and waits for its two messages.
    async fn send_one_and_wait(&self) {
        let before = self.subjects().len();
        self.env.enqueue_sample("vxc.approved").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.subjects().len() < before + 2 {
            assert!(Instant::now() < deadline, "the two messages never came");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> String {
        support::terminate(self.daemon.id().unwrap());
        assert!(self.daemon.wait().await.unwrap().success());
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// Saves as editors do: write a temporary file beside it, then rename it over the original.
fn save_by_rename(path: &Path, content: &str) {
    let temporary = path.with_file_name(".save.tmp");
    std::fs::write(&temporary, content).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// Keeps enqueueing vxc.approved rows, one every 20 ms, until dropped.
fn keep_sending(env: &TestEnv) -> tokio::task::JoinHandle<()> {
    let config = env.config.clone();
    tokio::spawn(async move {
        let payload = repo_path("examples/payloads/vxc.approved.json");
        loop {
            let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
                .arg("--config")
                .arg(&config)
                .args(["enqueue", "vxc.approved"])
                .arg(&payload)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
            if status.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_save_is_used_by_the_next_message_within_a_second() {
    let author = Author::start().await;
    let sending = keep_sending(&author.env);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let saved = SystemTime::now();
    save_by_rename(&author.subject_file(), "RELOADED {{ reference }}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let first_new = loop {
        if let Some((at, _)) = author
            .subjects()
            .into_iter()
            .find(|(_, s)| s.starts_with("RELOADED"))
        {
            break at;
        }
        assert!(Instant::now() < deadline, "the new subject never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    sending.abort();
    let latency = first_new.duration_since(saved).unwrap_or_default();
    eprintln!("save to first message with the new template: {latency:?}");
    // The bound leaves room for a slow machine; the figure is reported above.
    assert!(latency < Duration::from_secs(3), "{latency:?}");

    let log = author.stop().await;
    let reloaded = log
        .lines()
        .find(|l| l.contains("templates reloaded"))
        .unwrap();
    assert!(
        reloaded.contains("customer.subject.txt") && reloaded.contains("took_ms="),
        "{reloaded}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_save_is_rejected_and_the_last_good_set_keeps_serving() {
    let author = Author::start().await;
    let sending = keep_sending(&author.env);

    save_by_rename(&author.subject_file(), "BROKEN {{ reference ");
    author.wait_for_log("templates not reloaded", 1).await;
    let rejected_at = SystemTime::now();
    // Messages keep going out during the broken spell, with the last good templates.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let during: Vec<_> = author
        .subjects()
        .into_iter()
        .filter(|(at, _)| *at > rejected_at)
        .collect();
    assert!(
        !during.is_empty(),
        "messages went on while the set was broken"
    );
    assert!(
        during.iter().all(|(_, s)| s.starts_with("VXC approved:")),
        "{during:?}"
    );

    save_by_rename(&author.subject_file(), "FIXED {{ reference }}");
    author.wait_for_log("templates reloaded", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sending.abort();
    assert!(
        author
            .subjects()
            .iter()
            .any(|(_, s)| s.starts_with("FIXED"))
    );

    // Let the last enqueued rows go out, then check that none was lost or held back.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let rows = author
        .env
        .rows(
            "SELECT CAST(count(*) AS TEXT), CAST(sum(state = 'sent') AS TEXT), \
             CAST(max((julianday(sent_at) - julianday(created_at)) * 86400000) AS TEXT) \
             FROM herald_deliveries",
        )
        .await;
    let [total, sent, slowest_ms] = [0, 1, 2].map(|i| rows[0][i].clone().unwrap());
    assert_eq!(total, sent, "every delivery was sent");
    let slowest_ms: f64 = slowest_ms.parse().unwrap();
    eprintln!(
        "{total} deliveries around a broken save; slowest from planning to sent: {slowest_ms:.0} ms"
    );
    assert!(
        slowest_ms < 2000.0,
        "no delivery was held up: {slowest_ms} ms"
    );

    let log = author.stop().await;
    let problem = log
        .lines()
        .find(|l| l.contains("template problem"))
        .unwrap();
    assert!(
        problem.contains("vxc.approved/customer.subject.txt:1:"),
        "{problem}"
    );
    let dead = log.matches("delivery is dead").count();
    assert_eq!(dead, 0, "no message was rendered with the broken set");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_rapid_saves_make_few_reloads_and_the_last_wins() {
    let author = Author::start().await;
    for n in 1..=100 {
        std::fs::write(
            author.subject_file(),
            format!("SAVE-{n} {{{{ reference }}}}"),
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reloads = author.log_count("templates reloaded");
    let rejected = author.log_count("templates not reloaded");
    eprintln!("100 saves: {reloads} reloads, {rejected} rejected");
    assert!((1..=10).contains(&reloads), "{reloads} reloads");

    author.send_one_and_wait().await;
    assert!(
        author
            .subjects()
            .iter()
            .all(|(_, s)| s.starts_with("SAVE-100 ")),
        "{:?}",
        author.subjects()
    );
    author.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_writer_ends_with_its_finished_file_in_use() {
    use std::io::Write;
    let author = Author::start().await;
    // One open handle, written in pieces for well over the debounce limit: reloads may pick
    // up a piece on the way, but the close that ends the write must bring the whole file.
    let mut file = std::fs::File::create(author.subject_file()).unwrap();
    for piece in [
        "SLOW ",
        "{{ reference }} ",
        "one ",
        "two ",
        "three ",
        "four ",
        "five ",
        "END",
    ] {
        file.write_all(piece.as_bytes()).unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    drop(file);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    author.send_one_and_wait().await;
    assert!(
        author
            .subjects()
            .iter()
            .all(|(_, s)| s.ends_with("one two three four five END")),
        "{:?}",
        author.subjects()
    );
    author.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_templates_folder_is_watched_again() {
    let author = Author::start().await;
    // Replace the folder as a whole, as restoring a backup or a deploy does.
    let aside = author.env.dir.path().join("templates-old");
    std::fs::rename(&author.templates, &aside).unwrap();
    copy_tree(&aside, &author.templates);
    author.wait_for_log("watching the new one", 1).await;

    // Edits in the new folder are followed.
    save_by_rename(&author.subject_file(), "AFTER-REPLACE {{ reference }}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        author.env.enqueue_sample("vxc.approved").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if author
            .subjects()
            .iter()
            .any(|(_, s)| s.starts_with("AFTER-REPLACE"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "an edit in the replaced folder was never used"
        );
    }
    std::fs::remove_dir_all(&aside).unwrap();
    author.stop().await;
}
