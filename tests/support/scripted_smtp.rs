//! A scriptable SMTP server for faults a real server will not produce on demand: a chosen
//! reply (451, 550, 421) to a chosen recipient's message, a dropped connection, a slow reply.
//! It speaks just enough SMTP for herald's client and records every transaction.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the server does at the end of one message's DATA.
#[derive(Debug, Clone)]
pub enum Step {
    /// Reply with this line, e.g. `451 4.3.0 Try again later`.
    Reply(&'static str),
    /// Close the connection without replying.
    Drop,
}

/// One message that reached the end of DATA.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub rcpt: String,
    pub message_id: String,
    pub reply: Option<String>,
    pub connection: usize,
}

impl Transaction {
    pub fn accepted(&self) -> bool {
        self.reply.as_deref().is_some_and(|r| r.starts_with('2'))
    }
}

#[derive(Default)]
struct State {
    script: HashMap<String, VecDeque<Step>>,
    transactions: Vec<Transaction>,
    connections: usize,
    data_delay: Duration,
    /// Offer AUTH and refuse every login (for tests that a password never leaks).
    refuse_logins: bool,
}

#[derive(Clone)]
pub struct ScriptedSmtp {
    pub port: u16,
    state: Arc<Mutex<State>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ScriptedSmtp {
    pub async fn start() -> Self {
        Self::start_on(0).await
    }

    /// Listens on 127.0.0.1:`port` (0 for any free port).
    pub async fn start_on(port: u16) -> Self {
        let server = Self {
            port,
            state: Arc::new(Mutex::new(State::default())),
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        server.listen(port).await
    }

    /// Starts listening again after [`stop`](Self::stop), on the same port, keeping the record.
    pub async fn restart(&self) -> Self {
        self.clone().listen(self.port).await
    }

    async fn listen(mut self, port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind scripted SMTP");
        self.port = listener.local_addr().unwrap().port();
        let (state, tasks) = (self.state.clone(), self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                let connection = {
                    let mut state = state.lock().unwrap();
                    state.connections += 1;
                    state.connections
                };
                let session = tokio::spawn(serve(stream, state, connection));
                tasks.lock().unwrap().push(session);
            }
        });
        self.tasks.lock().unwrap().push(accept);
        self
    }

    /// The steps for `rcpt`'s next messages, in order; after them, messages are accepted.
    pub fn script(&self, rcpt: &str, steps: &[Step]) {
        self.state
            .lock()
            .unwrap()
            .script
            .entry(rcpt.to_string())
            .or_default()
            .extend(steps.iter().cloned());
    }

    /// Offers AUTH PLAIN and LOGIN, and answers every attempt with 535.
    pub fn refuse_logins(&self) {
        self.state.lock().unwrap().refuse_logins = true;
    }

    /// Waits this long before answering the end of DATA (for shutdown tests).
    pub fn delay_data(&self, delay: Duration) {
        self.state.lock().unwrap().data_delay = delay;
    }

    pub fn transactions(&self) -> Vec<Transaction> {
        self.state.lock().unwrap().transactions.clone()
    }

    pub fn accepted(&self) -> Vec<Transaction> {
        self.transactions()
            .into_iter()
            .filter(Transaction::accepted)
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// Stops listening and cuts every open connection.
    pub fn stop(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

async fn serve(stream: tokio::net::TcpStream, state: Arc<Mutex<State>>, connection: usize) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut rcpt = String::new();
    let mut line = String::new();
    if write.write_all(b"220 scripted ESMTP\r\n").await.is_err() {
        return;
    }
    loop {
        line.clear();
        if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let command = line.trim_end().to_ascii_uppercase();
        let reply: String = if command.starts_with("EHLO") {
            if state.lock().unwrap().refuse_logins {
                "250-scripted\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n".into()
            } else {
                "250-scripted\r\n250 8BITMIME\r\n".into()
            }
        } else if command.starts_with("AUTH") {
            "535 5.7.8 Authentication credentials invalid\r\n".into()
        } else if command.starts_with("HELO") || command.starts_with("MAIL FROM") {
            "250 2.1.0 Ok\r\n".into()
        } else if command.starts_with("RCPT TO") {
            let raw = line.trim_end();
            rcpt = raw[raw.find('<').map_or(0, |i| i + 1)..raw.rfind('>').unwrap_or(raw.len())]
                .to_string();
            "250 2.1.5 Ok\r\n".into()
        } else if command == "DATA" {
            if write
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await
                .is_err()
            {
                return;
            }
            let mut message_id = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if line == ".\r\n" {
                    break;
                }
                if message_id.is_empty() && line.to_ascii_lowercase().starts_with("message-id:") {
                    message_id = line["message-id:".len()..]
                        .trim()
                        .trim_matches(['<', '>'])
                        .to_string();
                }
            }
            let (step, delay) = {
                let mut state = state.lock().unwrap();
                let step = state.script.get_mut(&rcpt).and_then(VecDeque::pop_front);
                (
                    step.unwrap_or(Step::Reply("250 2.0.0 Ok: queued")),
                    state.data_delay,
                )
            };
            tokio::time::sleep(delay).await;
            let reply = match step {
                Step::Reply(reply) => Some(reply.to_string()),
                Step::Drop => None,
            };
            state.lock().unwrap().transactions.push(Transaction {
                rcpt: rcpt.clone(),
                message_id,
                reply: reply.clone(),
                connection,
            });
            match reply {
                Some(reply) => format!("{reply}\r\n"),
                None => return,
            }
        } else if command == "RSET" || command == "NOOP" {
            "250 2.0.0 Ok\r\n".into()
        } else if command == "QUIT" {
            drop(write.write_all(b"221 2.0.0 Bye\r\n").await);
            return;
        } else {
            "500 5.5.2 Command not recognized\r\n".into()
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
        if reply.starts_with("421") {
            return;
        }
    }
}
