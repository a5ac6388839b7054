//! `herald preview --serve ADDR`: a small local page listing every notification, each shown
//! as the HTML part (in a sandboxed frame), the text part, its subject and headers. The page
//! asks `/version` a few times a second and reloads itself when the templates were reloaded;
//! when the last save does not validate, the problems are shown at the top, above the last
//! good set.
//!
//! It speaks just enough HTTP/1.1 for a browser on the same machine (GET, one request per
//! connection). It is a development tool: it binds to loopback unless told otherwise.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info};

use super::preview;
use crate::config::Settings;
use crate::render::Renderer;
use crate::render::reload::ReloadStatus;

/// The longest request head accepted, and how long a client may take to send it.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the page needs to render itself.
#[derive(Clone)]
pub struct PreviewSite {
    pub settings: Arc<Settings>,
    pub renderer: Arc<Renderer>,
    pub status: watch::Receiver<ReloadStatus>,
}

/// Serves the page on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, site: PreviewSite, mut shutdown: watch::Receiver<bool>) {
    if let Ok(addr) = listener.local_addr() {
        info!(url = %format!("http://{addr}/"), "preview page ready");
    }
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    debug!(error = %err, "accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let site = site.clone();
        tokio::spawn(async move {
            if let Err(err) = answer(stream, &site).await {
                debug!(error = %err, "preview request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, site: &PreviewSite) -> std::io::Result<()> {
    let mut head = Vec::new();
    let read_head = async {
        let mut buffer = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..read]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .is_err()
    {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&head);
    let mut request_line = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        request_line.next().unwrap_or_default(),
        request_line.next().unwrap_or("/"),
    );

    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("/")) {
        ("GET", "/") => ("200 OK", "text/html; charset=utf-8", page(site)),
        ("GET", "/version") => (
            "200 OK",
            "text/plain; charset=utf-8",
            site.status.borrow().version.to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET only\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Escapes text for HTML content and quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(site: &PreviewSite) -> String {
    let status = site.status.borrow().clone();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>herald preview</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:2em;color:#1f2937}}\
         .problems{{background:#fee2e2;border:2px solid #b91c1c;padding:1em;margin-bottom:2em}}\
         section.notification{{border-top:1px solid #d1d5db;padding:1em 0}}\
         iframe{{width:100%;height:600px;border:1px solid #d1d5db}}\
         pre{{background:#f3f4f6;padding:1em;white-space:pre-wrap}}\
         dt{{font-weight:bold}}</style>\
         <script>const version = {version};\
         setInterval(async () => {{ try {{\
           const answer = await fetch('/version', {{cache: 'no-store'}});\
           if (Number(await answer.text()) !== version) location.reload();\
         }} catch (e) {{}} }}, 250);</script></head><body>\
         <h1>herald preview</h1><p>Templates: <code>{dir}</code>. This page reloads itself when \
         they change.</p>",
        version = status.version,
        dir = escape(&site.settings.templates_dir.display().to_string()),
    );
    if !status.problems.is_empty() {
        let explanation = if status.good_set {
            "The last save was rejected; the daemon keeps sending with the last good set, \
             shown below."
        } else {
            "No set has validated since this page started, and the daemon would refuse to start \
             with this one. Below, each notification as far as it renders."
        };
        let _ = write!(
            html,
            "<section class=\"problems\" id=\"problems\"><h2>The templates do not validate</h2>\
             <p>{explanation}</p><ul>"
        );
        for problem in &status.problems {
            let _ = write!(html, "<li><code>{}</code></li>", escape(problem));
        }
        html.push_str("</ul></section>");
    }

    let now = Utc::now();
    for spec in site.settings.catalog.specs() {
        for &audience in &spec.audiences {
            let id = format!("{}-{audience}", spec.kind);
            let _ = write!(
                html,
                "<section class=\"notification\" id=\"{id}\"><h2>{kind} to the {audience}</h2>",
                id = escape(&id),
                kind = escape(&spec.kind),
            );
            match preview(
                &site.settings,
                &site.renderer,
                &spec.kind,
                Some(audience),
                None,
                now,
            ) {
                Ok(preview) => {
                    let headers_end = preview
                        .eml
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .unwrap_or(0);
                    let headers = String::from_utf8_lossy(&preview.eml[..headers_end]);
                    let _ = write!(
                        html,
                        "<dl><dt>Subject</dt><dd class=\"subject\">{subject}</dd></dl>\
                         <h3>Headers</h3><pre class=\"headers\">{headers}</pre>\
                         <h3>HTML</h3><iframe sandbox title=\"{id}\" srcdoc=\"{body}\"></iframe>\
                         <h3>Text</h3><pre class=\"text\">{text}</pre>",
                        subject = escape(&preview.rendered.subject),
                        headers = escape(&headers),
                        id = escape(&id),
                        body = escape(&preview.rendered.html),
                        text = escape(&preview.rendered.text),
                    );
                }
                Err(err) => {
                    let _ = write!(
                        html,
                        "<p class=\"problems\">{}</p>",
                        escape(&err.to_string())
                    );
                }
            }
            html.push_str("</section>");
        }
    }
    html.push_str("</body></html>\n");
    html
}
