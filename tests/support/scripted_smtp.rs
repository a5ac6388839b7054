//! A scriptable SMTP server for faults a real server will not produce on demand: a chosen
//! reply (451, 550, 421) to a chosen recipient's message, a dropped connection, a slow reply,
//! or, for soak tests, such faults at random from a seed. It speaks just enough SMTP for
//! herald's client and records every transaction.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

/// What the server does with one message to a recipient.
#[derive(Debug, Clone)]
pub enum Step {
    /// Reply with this line at the end of DATA, e.g. `451 4.3.0 Try again later`.
    Reply(&'static str),
    /// Close the connection at the end of DATA without replying.
    Drop,
    /// Refuse the recipient at RCPT TO with this line (then DATA with 554, as a server
    /// that offers PIPELINING must).
    RefuseRecipient(&'static str),
    /// Refuse the recipient at RCPT TO with this line, then close the connection.
    RefuseRecipientAndHangUp(&'static str),
    /// Refuse the recipient at RCPT TO with this line, yet answer DATA with 354 (a broken
    /// server), then refuse the empty message that follows.
    RefuseRecipientThenGoAhead(&'static str),
}

/// One message that reached the end of DATA, or whose connection ended during DATA.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub rcpt: String,
    /// Without angle brackets; empty if the message ended before its `Message-ID` header.
    pub message_id: String,
    /// The reply written to the client; `None` while it is held back, or if none was.
    pub reply: Option<String>,
    pub connection: usize,
    /// False when the connection ended during DATA, closed by either side.
    pub complete: bool,
    /// When the message data ended (or was cut off).
    pub at: chrono::DateTime<chrono::Utc>,
}

impl Transaction {
    pub fn accepted(&self) -> bool {
        self.reply.as_deref().is_some_and(|r| r.starts_with('2'))
    }
}

/// Faults drawn at random, for soak tests. Each message's fate is drawn from the seed, the
/// recipient, the Message-ID without its random part and how many times this server has seen
/// that message before. A seed thus replays the same faults for the same deliveries on a fresh
/// database, whatever order the messages arrive in and however the retries interleave.
#[derive(Debug, Clone, Copy)]
pub struct RandomFaults {
    pub seed: u64,
    /// The share of messages answered `451 4.3.0` at the end of DATA.
    pub temporary_failures: f64,
    /// The share of messages whose connection the server closes: half of them in the middle
    /// of DATA (just after the `Message-ID` header), half at its end, before the reply.
    pub dropped_connections: f64,
}

/// What [`RandomFaults`] came to so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub temporary_failures: usize,
    pub drops_mid_data: usize,
    pub drops_before_reply: usize,
}

/// One message's fate under [`RandomFaults`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Accept,
    TemporaryFailure,
    DropMidData,
    DropBeforeReply,
}

#[derive(Default)]
struct State {
    script: HashMap<String, VecDeque<Step>>,
    transactions: Vec<Transaction>,
    connections: usize,
    data_delay: Duration,
    /// Offer AUTH and refuse every login (for tests that a password never leaks).
    refuse_logins: bool,
    /// Leave PIPELINING out of the EHLO reply, so that the client waits for each reply.
    without_pipelining: bool,
    /// MAIL FROM commands that arrived with the next command already behind them.
    pipelined_envelopes: usize,
    random: Option<RandomFaults>,
    /// Per message (see [`RandomFaults`]), how many times its DATA was seen.
    seen: HashMap<String, u64>,
    faults: FaultCounts,
}

impl State {
    /// Draws the fate of this attempt at the message, counting the fault it brings.
    fn fate(&mut self, rcpt: &str, message_id: &str) -> Fate {
        let scripted = self.script.get(rcpt).is_some_and(|steps| !steps.is_empty());
        let Some(random) = self.random.filter(|_| !scripted) else {
            return Fate::Accept;
        };
        let key = format!("{rcpt} {}", stable_part(message_id));
        let seen = self.seen.entry(key.clone()).or_default();
        let attempt = *seen;
        *seen += 1;

        let mut rng = fastrand::Rng::with_seed(
            random.seed ^ fnv1a(key.as_bytes()) ^ attempt.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let draw = rng.f64();
        let drop = random.dropped_connections;
        let fate = if draw < drop / 2.0 {
            Fate::DropMidData
        } else if draw < drop {
            Fate::DropBeforeReply
        } else if draw < drop + random.temporary_failures {
            Fate::TemporaryFailure
        } else {
            Fate::Accept
        };
        match fate {
            Fate::Accept => {}
            Fate::TemporaryFailure => self.faults.temporary_failures += 1,
            Fate::DropMidData => self.faults.drops_mid_data += 1,
            Fate::DropBeforeReply => self.faults.drops_before_reply += 1,
        }
        fate
    }
}

/// A Message-ID without herald's random part (`herald.OUTBOX.RANDOM@domain` gives
/// `herald.OUTBOX`): the outbox row, which a fresh database numbers the same every run.
fn stable_part(message_id: &str) -> &str {
    let local = message_id.split('@').next().unwrap_or(message_id);
    local.rsplit_once('.').map_or(local, |(stable, _)| stable)
}

/// FNV-1a: a hash that, unlike the standard library's, is the same on every toolchain.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
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

    /// Stops offering PIPELINING (from the next session on).
    pub fn without_pipelining(&self) {
        self.state.lock().unwrap().without_pipelining = true;
    }

    /// How many MAIL FROM commands arrived with the following command in the same read: the
    /// client pipelined its envelope.
    pub fn pipelined_envelopes(&self) -> usize {
        self.state.lock().unwrap().pipelined_envelopes
    }

    /// Waits this long before answering the end of DATA (for shutdown tests).
    pub fn delay_data(&self, delay: Duration) {
        self.state.lock().unwrap().data_delay = delay;
    }

    /// Turns on random faults for every message from now on. A recipient's scripted steps
    /// still come first.
    pub fn random_faults(&self, faults: RandomFaults) {
        self.state.lock().unwrap().random = Some(faults);
    }

    /// The random faults served so far.
    pub fn fault_counts(&self) -> FaultCounts {
        self.state.lock().unwrap().faults
    }

    /// How many messages were accepted so far, without copying the record.
    pub fn accepted_count(&self) -> usize {
        let state = self.state.lock().unwrap();
        state.transactions.iter().filter(|t| t.accepted()).count()
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
    let mut rcpt_refused = false;
    let mut go_ahead_anyway = false;
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
            let state = state.lock().unwrap();
            let mut reply = "250-scripted\r\n".to_string();
            if state.refuse_logins {
                reply += "250-AUTH PLAIN LOGIN\r\n";
            }
            if !state.without_pipelining {
                reply += "250-PIPELINING\r\n";
            }
            reply + "250 8BITMIME\r\n"
        } else if command.starts_with("AUTH") {
            "535 5.7.8 Authentication credentials invalid\r\n".into()
        } else if command.starts_with("MAIL FROM") {
            if !lines.buffer().is_empty() {
                state.lock().unwrap().pipelined_envelopes += 1;
            }
            "250 2.1.0 Ok\r\n".into()
        } else if command.starts_with("HELO") {
            "250 2.1.0 Ok\r\n".into()
        } else if command.starts_with("RCPT TO") {
            let raw = line.trim_end();
            rcpt = raw[raw.find('<').map_or(0, |i| i + 1)..raw.rfind('>').unwrap_or(raw.len())]
                .to_string();
            let refusal = {
                let mut state = state.lock().unwrap();
                let steps = state.script.get_mut(&rcpt);
                match steps.as_ref().and_then(|steps| steps.front()) {
                    Some(
                        step @ (Step::RefuseRecipient(_)
                        | Step::RefuseRecipientAndHangUp(_)
                        | Step::RefuseRecipientThenGoAhead(_)),
                    ) => {
                        let step = step.clone();
                        steps.and_then(VecDeque::pop_front);
                        Some(step)
                    }
                    _ => None,
                }
            };
            go_ahead_anyway = matches!(refusal, Some(Step::RefuseRecipientThenGoAhead(_)));
            rcpt_refused = refusal.is_some();
            match refusal {
                Some(Step::RefuseRecipientAndHangUp(reply)) => {
                    drop(write.write_all(format!("{reply}\r\n").as_bytes()).await);
                    return;
                }
                Some(Step::RefuseRecipient(reply) | Step::RefuseRecipientThenGoAhead(reply)) => {
                    format!("{reply}\r\n")
                }
                _ => "250 2.1.5 Ok\r\n".into(),
            }
        } else if command == "DATA" && rcpt_refused && go_ahead_anyway {
            rcpt_refused = false;
            if write.write_all(b"354 Go ahead\r\n").await.is_err() {
                return;
            }
            loop {
                line.clear();
                if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if line == ".\r\n" {
                    break;
                }
            }
            "554 5.5.1 Error: no valid recipients\r\n".into()
        } else if command == "DATA" && rcpt_refused {
            rcpt_refused = false;
            "554 5.5.1 Error: no valid recipients\r\n".into()
        } else if command == "DATA" {
            match data(&mut lines, &mut write, &state, &rcpt, connection).await {
                Some(reply) if !reply.starts_with("421") => continue,
                _ => return,
            }
        } else if command == "RSET" || command == "NOOP" {
            rcpt_refused = false;
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
    }
}

/// One DATA exchange, recorded as a transaction. Returns the reply written, or `None` when
/// the connection is over.
async fn data(
    lines: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
    state: &Mutex<State>,
    rcpt: &str,
    connection: usize,
) -> Option<String> {
    let record = |message_id: &str, complete: bool| {
        let mut state = state.lock().unwrap();
        state.transactions.push(Transaction {
            rcpt: rcpt.to_string(),
            message_id: message_id.to_string(),
            reply: None,
            connection,
            complete,
            at: chrono::Utc::now(),
        });
        state.transactions.len() - 1
    };
    write
        .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        .await
        .ok()?;

    // The message, up to the lone dot; random faults are drawn once its Message-ID is known.
    let mut message_id = String::new();
    let mut fate = None;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
            record(&message_id, false);
            return None;
        }
        if line == ".\r\n" {
            break;
        }
        if message_id.is_empty() && line.to_ascii_lowercase().starts_with("message-id:") {
            message_id = line["message-id:".len()..]
                .trim()
                .trim_matches(['<', '>'])
                .to_string();
            let drawn = state.lock().unwrap().fate(rcpt, &message_id);
            if drawn == Fate::DropMidData {
                record(&message_id, false);
                return None;
            }
            fate = Some(drawn);
        }
    }

    // What to answer: a scripted step first, else the drawn fate.
    let (step, delay) = {
        let mut state = state.lock().unwrap();
        let scripted = state.script.get_mut(rcpt).and_then(VecDeque::pop_front);
        let step = scripted.unwrap_or_else(|| {
            match fate.unwrap_or_else(|| state.fate(rcpt, &message_id)) {
                Fate::Accept => Step::Reply("250 2.0.0 Ok: queued"),
                Fate::TemporaryFailure => Step::Reply("451 4.3.0 Try again later"),
                Fate::DropMidData | Fate::DropBeforeReply => Step::Drop,
            }
        });
        (step, state.data_delay)
    };
    let index = record(&message_id, true);
    tokio::time::sleep(delay).await;

    // The reply is recorded once written: a reply never sent (the server stopped meanwhile)
    // is no acceptance, just as the client sees it.
    let Step::Reply(reply) = step else {
        return None;
    };
    write
        .write_all(format!("{reply}\r\n").as_bytes())
        .await
        .ok()?;
    state.lock().unwrap().transactions[index].reply = Some(reply.to_string());
    Some(reply.to_string())
}
