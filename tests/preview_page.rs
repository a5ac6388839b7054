//! The preview page in a real headless browser (Debian's Chromium, driven through
//! chromedriver's WebDriver API): it lists every notification, follows an edit on disk by
//! itself, and shows a broken save's problems in place.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{copy_tree, free_port, repo_path, wait_for_port};

/// A chromedriver process and one browser session in it.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver is installed (scripts/test.sh installs chromium and chromium-driver)",
            );
        wait_for_port(port, Duration::from_secs(20));
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Self {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let arguments = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!(
            "--user-data-dir={}",
            browser._profile.path().display()
        )])
        .collect::<Vec<_>>();
        let created = browser.call(
            "POST",
            "/session",
            json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": arguments }
            }}}),
        );
        browser.session = created["sessionId"]
            .as_str()
            .expect("a session")
            .to_string();
        browser
    }

    /// One WebDriver command over plain HTTP/1.1; returns the reply's `value`.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        use std::io::{Read, Write};
        let body = body.to_string();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // chromedriver says "Connection: close" but keeps the socket open: read by length.
        let mut reply = Vec::new();
        let mut buffer = [0u8; 8192];
        let (head_end, length) = loop {
            let read = stream.read(&mut buffer).unwrap();
            assert!(read > 0, "chromedriver closed the connection early");
            reply.extend_from_slice(&buffer[..read]);
            if let Some(end) = reply.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&reply[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .expect("a Content-Length");
                break (end + 4, length);
            }
        };
        while reply.len() < head_end + length {
            let read = stream.read(&mut buffer).unwrap();
            assert!(read > 0, "chromedriver closed the connection early");
            reply.extend_from_slice(&buffer[..read]);
        }
        let body = &reply[head_end..head_end + length];
        let parsed: Value = serde_json::from_slice(body).unwrap_or_else(|err| {
            panic!(
                "WebDriver reply to {path} is not JSON ({err}): {}",
                String::from_utf8_lossy(body)
            )
        });
        parsed["value"].clone()
    }

    fn open(&self, url: &str) {
        self.call(
            "POST",
            &format!("/session/{}/url", self.session),
            json!({ "url": url }),
        );
    }

    fn page_text(&self) -> String {
        let value = self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            json!({ "script": "return document.body ? document.body.innerText : ''", "args": [] }),
        );
        value.as_str().unwrap_or_default().to_string()
    }

    /// Waits until the page, as the browser shows it now, satisfies `test`; returns how long.
    fn wait_for(&self, what: &str, test: impl Fn(&str) -> bool) -> Duration {
        let started = Instant::now();
        loop {
            let text = self.page_text();
            if test(&text) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the page never showed {what}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            self.call("DELETE", &format!("/session/{}", self.session), json!({}));
        }
        drop(self.driver.kill());
        drop(self.driver.wait());
    }
}

#[test]
fn the_preview_page_follows_edits_and_shows_errors_in_place() {
    // The shipped configuration on a copy of the templates, so the edits stay in the test.
    let copy = tempfile::tempdir().unwrap();
    for folder in ["config", "templates", "examples"] {
        copy_tree(&repo_path(folder), &copy.path().join(folder));
    }
    let subject: PathBuf = copy
        .path()
        .join("templates/vxc.service_up/customer.subject.txt");
    let port = free_port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--config")
        .arg(copy.path().join("config/herald.yaml"))
        .args(["preview", "--serve", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, Duration::from_secs(20));

    let browser = Browser::start();
    browser.open(&format!("http://127.0.0.1:{port}/"));
    browser.wait_for("every notification", |text| {
        [
            "vxc.approval_required to the provider",
            "vxc.approval_required to the customer",
            "vxc.approved to the customer",
            "vxc.service_up to the customer",
            "vxc.speed_change_requested to the provider",
            "vxc.denied to the customer",
        ]
        .iter()
        .all(|heading| text.contains(heading))
            && text.contains("Service up: Sydney to CloudCo (5f3a9c1e)")
            && text.contains("From: \"Interlink Exchange\"")
    });

    // An edit on disk appears without anyone touching the browser.
    std::fs::write(&subject, "Live edit: {{ service_name }} is up").unwrap();
    let took = browser.wait_for("the edited subject", |text| {
        text.contains("Live edit: Sydney to CloudCo is up")
    });
    eprintln!("edit visible in the browser after {took:?}");

    // A broken save: the problem is shown in place, with file and line, over the last good set.
    std::fs::write(&subject, "Broken: {{ service_name ").unwrap();
    browser.wait_for("the problem", |text| {
        text.contains("The templates do not validate")
            && text.contains("vxc.service_up/customer.subject.txt:1:")
            && text.contains("Live edit: Sydney to CloudCo is up")
    });

    // Fixing it clears the problem.
    std::fs::write(&subject, "Fixed: {{ service_name }}").unwrap();
    browser.wait_for("the fix", |text| {
        text.contains("Fixed: Sydney to CloudCo") && !text.contains("do not validate")
    });

    drop(browser);
    drop(server.kill());
    drop(server.wait());
}
