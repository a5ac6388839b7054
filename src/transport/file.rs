//! Writes each message as `<message-id>.eml` into a folder: what the embedded default uses,
//! so that herald runs with nothing else installed and a person can open what would be sent.

use std::path::PathBuf;

use super::{Outcome, Outgoing, Unavailable};

#[derive(Debug)]
pub struct FileTransport {
    dir: PathBuf,
}

impl FileTransport {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub async fn ready(&mut self) -> Result<(), Unavailable> {
        tokio::fs::create_dir_all(&self.dir).await.map_err(|err| {
            Unavailable(format!(
                "cannot create mail folder {}: {err}",
                self.dir.display()
            ))
        })
    }

    /// Writes to a temporary name and renames, so a reader never sees half a message.
    pub async fn send(&mut self, message: Outgoing<'_>) -> Outcome {
        let name: String = message
            .message_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-@".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.dir.join(format!("{name}.eml"));
        let temporary = self.dir.join(format!(".{name}.eml.tmp"));
        let written = async {
            tokio::fs::write(&temporary, message.bytes).await?;
            tokio::fs::rename(&temporary, &path).await
        };
        match written.await {
            Ok(()) => Outcome::Sent {
                reply: format!("written to {}", path.display()),
            },
            Err(err) => Outcome::Transient {
                error: format!("cannot write {}: {err}", path.display()),
                reply: None,
            },
        }
    }
}
