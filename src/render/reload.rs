//! Loading a template set that is known to work, and hot reload.
//!
//! A set is *validated* by compiling every file and rendering every notification with the
//! sample payloads (`templates.samples`), strict about undefined values. `herald check`, the
//! start of the daemon and every reload go through [`load_validated`]; only a set that passes
//! replaces the one in use, so a broken save never reaches a customer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{Renderer, TemplateSet, sample_recipient};
use crate::config::Settings;

/// How long the folder must be quiet before a reload: editors write a file in several steps.
const QUIET: Duration = Duration::from_millis(100);
/// A reload happens at the latest this long after the first change, however busy the folder.
const LONGEST_WAIT: Duration = Duration::from_millis(500);

/// The outcome of the latest reload, for whoever shows it (the preview page).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Counts reload attempts, so a page can tell that something happened.
    pub version: u64,
    /// Why the latest attempt was rejected; empty when it was taken.
    pub problems: Vec<String>,
    /// Whether a set that validated is in use (false when none has validated since start).
    pub good_set: bool,
}

impl ReloadStatus {
    fn record(&mut self, problems: Vec<String>) {
        self.version += 1;
        self.good_set |= problems.is_empty();
        self.problems = problems;
    }
}

/// A template set and how many notifications were rendered to validate it.
pub struct Validated {
    pub set: TemplateSet,
    pub rendered: usize,
}

/// Compiles the folder and renders every notification with its sample payload. Every problem
/// is listed, each once, as `path:line: reason`.
pub fn load_validated(settings: &Settings, renderer: &Renderer) -> Result<Validated, Vec<String>> {
    let (set, compile_problems) = TemplateSet::load_all(&settings.templates_dir, &settings.catalog);
    let in_folder =
        |problem: &dyn std::fmt::Display| format!("{}/{problem}", settings.templates_dir.display());
    let mut problems: Vec<String> = compile_problems.iter().map(|p| in_folder(p)).collect();
    // Templates already reported as broken or missing; a render that fails only because it
    // needs one of them adds nothing. Any other missing template (a layout that does not
    // exist) is a problem of its own.
    let reported: Vec<String> = compile_problems
        .iter()
        .map(|p| format!("\"{}\"", p.template))
        .collect();

    let mut rendered = 0;
    for spec in settings.catalog.specs() {
        let Some(samples) = &settings.samples_dir else {
            break;
        };
        let sample = samples.join(format!("{}.json", spec.kind));
        let payload = match std::fs::read(&sample) {
            Ok(bytes) => bytes,
            Err(err) => {
                problems.push(format!(
                    "{}: cannot read the sample payload: {err}",
                    sample.display()
                ));
                continue;
            }
        };
        let payload = match settings.catalog.validate(&spec.kind, &payload) {
            Ok((_, payload)) => payload,
            Err(err) => {
                problems.push(format!("{}: {err}", sample.display()));
                continue;
            }
        };
        for &audience in &spec.audiences {
            let recipient = sample_recipient(audience);
            let errors =
                renderer.check(&set, &spec.kind, audience, &payload, recipient, Utc::now());
            if errors.is_empty() {
                rendered += 1;
            }
            let consequence = |e: &&super::TemplateError| {
                e.reason.starts_with("template not found")
                    && (reported.iter().any(|name| e.reason.contains(name.as_str()))
                        || compile_problems.iter().any(|p| p.template == e.template))
            };
            for error in errors.iter().filter(|e| !consequence(e)) {
                let problem = in_folder(error);
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(Validated { set, rendered })
    } else {
        Err(problems)
    }
}

/// Watches the templates folder until shutdown and swaps in each new set that validates.
///
/// The folder is watched, not the files, so editors that save through a temporary file and a
/// rename are seen too; their temporary names are ignored. Changes are debounced, then the
/// whole set is loaded beside the one in use and validated. A failing set is rejected with
/// every problem logged at ERROR, and the last good set keeps serving until a save fixes it.
pub async fn watch_templates(
    settings: Arc<Settings>,
    renderer: Arc<Renderer>,
    status: watch::Sender<ReloadStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Absolute paths: the folder's parent is watched too, and events are matched by prefix.
    let folder = std::path::absolute(&settings.templates_dir)
        .unwrap_or_else(|_| settings.templates_dir.clone());
    let in_folder = folder.clone();
    let (tx, mut changes) = mpsc::unbounded_channel::<PathBuf>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // notify calls this on its own thread; hand the paths over to the async side.
        // A file closed after writing is a change too: it is the one event that says a slow
        // writer has finished.
        let finished_writing = |kind: &EventKind| {
            matches!(
                kind,
                EventKind::Access(AccessKind::Close(AccessMode::Write))
            )
        };
        if let Ok(event) = event
            && (!matches!(event.kind, EventKind::Access(_)) || finished_writing(&event.kind))
        {
            // The folder itself (moved, deleted, created) always counts, whatever its name.
            let relevant = |p: &PathBuf| {
                *p == in_folder || (p.starts_with(&in_folder) && !is_editor_scratch(p))
            };
            for path in event.paths.into_iter().filter(relevant) {
                drop(tx.send(path));
            }
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(err) => {
            error!(error = %err, "cannot watch the templates folder; template changes need a restart");
            return;
        }
    };
    if let Err(err) = watcher.watch(&folder, RecursiveMode::Recursive) {
        error!(
            error = %err,
            folder = %folder.display(),
            "cannot watch the templates folder (on Linux, \"No space left on device\" means the inotify watch limit); template changes need a restart"
        );
        return;
    }
    // The parent too (not recursively), so that a folder replaced as a whole (moved away and
    // copied back, restored from a backup) is noticed and watched again.
    if let Some(parent) = folder.parent()
        && let Err(err) = watcher.watch(parent, RecursiveMode::NonRecursive)
    {
        warn!(error = %err, "cannot watch the templates folder's parent; replacing the whole folder will need a restart");
    }
    let mut watched = folder_identity(&folder);
    info!(folder = %folder.display(), "watching templates for changes");

    loop {
        let first = tokio::select! {
            change = changes.recv() => match change { Some(path) => path, None => return },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let started = Instant::now();
        let mut changed = BTreeSet::from([first]);
        while started.elapsed() < LONGEST_WAIT {
            match tokio::time::timeout(QUIET, changes.recv()).await {
                Ok(Some(path)) => {
                    changed.insert(path);
                }
                Ok(None) | Err(_) => break,
            }
        }
        // A new folder in place of the old one: the old watch went with the old folder.
        let now_there = folder_identity(&folder);
        if now_there.is_some() && now_there != watched {
            drop(watcher.unwatch(&folder));
            match watcher.watch(&folder, RecursiveMode::Recursive) {
                Ok(()) => {
                    info!(folder = %folder.display(), "the templates folder was replaced; watching the new one");
                    watched = now_there;
                }
                Err(err) => {
                    error!(error = %err, "cannot watch the new templates folder; template changes need a restart")
                }
            }
        }

        let changed: Vec<String> = changed
            .iter()
            .map(|path| {
                path.strip_prefix(&folder)
                    .unwrap_or(path)
                    .display()
                    .to_string()
            })
            .collect();

        let (settings_now, renderer_now) = (settings.clone(), renderer.clone());
        let loaded =
            tokio::task::spawn_blocking(move || load_validated(&settings_now, &renderer_now)).await;
        match loaded {
            Ok(Ok(validated)) => {
                let files = validated.set.len();
                renderer.replace_templates(validated.set);
                status.send_modify(|status| status.record(Vec::new()));
                info!(
                    changed = %changed.join(", "),
                    files,
                    notifications_validated = validated.rendered,
                    took_ms = started.elapsed().as_millis() as u64,
                    "templates reloaded"
                );
            }
            Ok(Err(problems)) => {
                error!(
                    changed = %changed.join(", "),
                    problems = problems.len(),
                    "templates not reloaded: the new set does not validate; the last good set keeps serving"
                );
                for problem in &problems {
                    error!(problem = %problem, "template problem");
                }
                status.send_modify(|status| status.record(problems));
            }
            Err(err) => {
                warn!(error = %err, "template reload task failed; the last good set keeps serving")
            }
        }
    }
}

/// Which folder is at `path` now (device and inode), to tell when it was replaced.
fn folder_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Names editors use for scratch and backup files (vim's `.swp` and `4913` probe, `file~`,
/// `.tmp`), and hidden files: never templates.
fn is_editor_scratch(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return true;
    };
    name.starts_with('.')
        || name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".tmp")
        || name == "4913"
}

#[cfg(test)]
mod tests {
    use super::is_editor_scratch;
    use std::path::Path;

    #[test]
    fn editor_scratch_files_are_ignored() {
        for scratch in [
            ".customer.txt.swp",
            "customer.txt~",
            "4913",
            "x.tmp",
            ".#customer.txt",
        ] {
            assert!(is_editor_scratch(Path::new(scratch)), "{scratch}");
        }
        for template in ["customer.txt", "layout.html", "vxc.approved"] {
            assert!(!is_editor_scratch(Path::new(template)), "{template}");
        }
    }
}
