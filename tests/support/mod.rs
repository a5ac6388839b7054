//! Shared test fixtures: a throwaway herald installation (config, SQLite file, mail folder) in
//! a temporary directory, a real SMTP server (aiosmtpd) and a scriptable one for faults.

#![allow(dead_code)]

pub mod scripted_smtp;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use herald::config::Settings;
use herald::directory::DirectoryFile;
use herald::store::Store;
use herald::store::sqlite::SqliteStore;

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(REPO).join(relative)
}

/// Where a test's messages go.
#[derive(Debug, Clone, Copy)]
pub enum Sink {
    /// The file transport, into `<tmp>/mail`.
    Files,
    /// SMTP without TLS to 127.0.0.1 on this port.
    Smtp(u16),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub sink: Sink,
    pub max_attempts: u32,
    pub initial_backoff: &'static str,
    pub per_second: u32,
    pub smtp_timeout: &'static str,
}

impl Options {
    pub fn new(sink: Sink) -> Self {
        Self {
            sink,
            max_attempts: 3,
            initial_backoff: "100ms",
            per_second: 1000,
            smtp_timeout: "5s",
        }
    }
}

/// A herald installation in a temporary folder, using the repository's templates and
/// catalogue, with the sample directory imported.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl TestEnv {
    pub async fn new(options: Options) -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let config = dir.path().join("herald.yaml");
        std::fs::write(&config, config_yaml(dir.path(), &options)).unwrap();
        let env = Self { dir, config };
        let directory = DirectoryFile::load(&repo_path("examples/directory.yaml")).unwrap();
        env.store()
            .await
            .replace_directory(&directory)
            .await
            .unwrap();
        env
    }

    pub fn settings(&self) -> Settings {
        Settings::load(&self.config).expect("test configuration is valid")
    }

    pub async fn store(&self) -> SqliteStore {
        let store = SqliteStore::connect(&self.settings().database.url)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    }

    pub fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    /// Runs the herald binary with this installation's configuration.
    pub fn herald(&self, args: &[&str]) -> Output {
        self.herald_command(args).output().expect("herald runs")
    }

    pub fn herald_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "info");
        command
    }

    /// Enqueues one of the shipped sample payloads.
    pub async fn enqueue_sample(&self, kind: &str) -> i64 {
        let payload =
            std::fs::read_to_string(repo_path(&format!("examples/payloads/{kind}.json"))).unwrap();
        self.store()
            .await
            .enqueue(kind, &payload, None)
            .await
            .unwrap()
            .unwrap()
    }
}

pub const SAMPLE_KINDS: [&str; 4] = [
    "vxc.approval_required",
    "vxc.approved",
    "vxc.service_up",
    "vxc.speed_change_requested",
];

fn config_yaml(dir: &Path, options: &Options) -> String {
    let transport = match options.sink {
        Sink::Files => format!(
            "kind: file\n  file:\n    dir: {}",
            dir.join("mail").display()
        ),
        Sink::Smtp(port) => format!(
            "kind: smtp\n  smtp:\n    host: 127.0.0.1\n    port: {port}\n    tls: none\n    timeout: {}",
            options.smtp_timeout
        ),
    };
    let shipped = std::fs::read_to_string(repo_path("config/herald.yaml")).unwrap();
    let catalogue = &shipped[shipped
        .find("\nrecipients:")
        .expect("shipped config has recipients")..];
    format!(
        "database:\n  url: sqlite://{db}\n  poll_interval: 200ms\n\
         transport:\n  {transport}\n\
         rate_limit:\n  per_second: {per_second}\n  burst: {per_second}\n\
         retry:\n  max_attempts: {max_attempts}\n  initial_backoff: {backoff}\n  max_backoff: 1s\n\
         delivery:\n  batch_size: 50\n  lease: 1m\n\
         templates:\n  dir: {templates}\n  samples: {samples}\n\
         brand:\n  name: Interlink Exchange\n  tagline: Connectivity on demand\n\
         \x20 website_url: https://www.interlink.example\n  portal_url: https://portal.interlink.example\n\
         \x20 knowledge_base_url: https://docs.interlink.example\n  support_email: support@interlink.example\n\
         \x20 mailing_address: Level 5, 100 Harbour Street, Sydney NSW 2000, Australia\n\
         \x20 sender:\n    name: Interlink Exchange\n    email: notifications@interlink.example\n\
         preferences:\n  url: https://portal.interlink.example/notifications/preferences\n\
         \x20 secret: test-secret-0123456789abcdef\n{catalogue}",
        db = dir.join("herald.db").display(),
        per_second = options.per_second,
        max_attempts = options.max_attempts,
        backoff = options.initial_backoff,
        templates = repo_path("templates").display(),
        samples = repo_path("examples/payloads").display(),
    )
}

/// Copies a folder recursively.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A copy of the repository's `config/`, `templates/` and `examples/`, for tests that edit
/// them or run the shipped configuration without touching the working tree's `var/`.
pub fn repo_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for folder in ["config", "templates", "examples"] {
        copy_tree(&repo_path(folder), &dir.path().join(folder));
    }
    dir
}

/// Sends SIGTERM to a process, as a service manager would.
pub fn terminate(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid}");
}

/// A port on loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Python's aiosmtpd, a complete SMTP server, recording each message it accepts into a folder
/// (see `smtp_recorder.py`). The README's test command installs it.
pub struct Aiosmtpd {
    pub port: u16,
    pub folder: tempfile::TempDir,
    child: Child,
}

impl Aiosmtpd {
    pub fn start() -> Self {
        let port = free_port();
        let folder = tempfile::tempdir().unwrap();
        // scripts/test.sh installs aiosmtpd into target/test-python and names it here; a plain
        // `cargo test` finds that environment once the script has run.
        let venv = repo_path("target/test-python/bin/python");
        let python = std::env::var("HERALD_TEST_PYTHON").unwrap_or_else(|_| {
            if venv.exists() {
                venv.display().to_string()
            } else {
                "python3".into()
            }
        });
        let child = Command::new(&python)
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "smtp_recorder.Recorder"])
            .arg(folder.path())
            .env("PYTHONPATH", repo_path("tests/support"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 is installed");
        let mut server = Self {
            port,
            folder,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "aiosmtpd ({python}) exited with {status}: run the tests with scripts/test.sh, \
                     which installs it"
                );
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The messages received so far: (envelope JSON, raw bytes), in arrival order.
    pub fn received(&self) -> Vec<(serde_json::Value, Vec<u8>)> {
        let mut names: Vec<_> = std::fs::read_dir(self.folder.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".eml"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|name| {
                let stem = name.trim_end_matches(".eml");
                let meta = std::fs::read_to_string(self.folder.path().join(format!("{stem}.json")))
                    .unwrap();
                let bytes = std::fs::read(self.folder.path().join(name)).unwrap();
                (serde_json::from_str(&meta).unwrap(), bytes)
            })
            .collect()
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}
