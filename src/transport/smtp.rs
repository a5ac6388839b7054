//! SMTP through mail-send: one session, opened on demand and reused for message after
//! message, dropped and reopened whenever it may be out of step with the server.
//!
//! mail-send opens the session (greeting, STARTTLS, EHLO, AUTH); herald runs each mail
//! transaction itself, so that it can pipeline MAIL, RCPT and DATA (RFC 2920) when the server
//! offers it and write each message in one piece. That halves the round trips per message,
//! which on a fast relay are most of the cost.

use std::sync::OnceLock;
use std::time::Duration;

use mail_send::smtp::tls::build_tls_connector;
use mail_send::{Credentials, SmtpClient, SmtpClientBuilder};
use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::{EXT_PIPELINING, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{Outcome, Outgoing, Unavailable};
use crate::config::{SmtpSettings, TlsMode};

enum Connection {
    Plain(SmtpClient<TcpStream>),
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
}

/// An open session and what the server said it can do.
struct Session {
    connection: Connection,
    /// The server offered PIPELINING in its EHLO reply.
    pipelining: bool,
}

pub struct SmtpTransport {
    settings: SmtpSettings,
    session: Option<Session>,
    /// The message being sent, dot-stuffed and terminated; kept to reuse its allocation.
    data: Vec<u8>,
}

impl std::fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("host", &self.settings.host)
            .field("port", &self.settings.port)
            .field("connected", &self.session.is_some())
            .finish()
    }
}

/// The TLS configuration (the system's trusted roots), loaded once per process rather than
/// for every session: loading it reads every certificate file on the system.
fn tls_connector() -> Result<TlsConnector, String> {
    static CONNECTOR: OnceLock<Result<TlsConnector, String>> = OnceLock::new();
    CONNECTOR.get_or_init(|| build_tls_connector(false)).clone()
}

impl SmtpTransport {
    pub fn new(settings: SmtpSettings) -> Self {
        Self {
            settings,
            session: None,
            data: Vec::new(),
        }
    }

    pub async fn ready(&mut self) -> Result<(), Unavailable> {
        if self.session.is_none() {
            self.session = Some(self.connect().await?);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<Session, Unavailable> {
        let settings = &self.settings;
        let unavailable = |err: mail_send::Error| {
            Unavailable(format!(
                "cannot open an SMTP session with {}:{}: {}",
                settings.host,
                settings.port,
                describe_error(&err)
            ))
        };
        let tls = tls_connector()
            .map_err(|err| Unavailable(format!("cannot set up TLS for SMTP: {err}")))?;
        // EHLO is left to `greet`, which keeps the server's capabilities.
        let builder =
            SmtpClientBuilder::new_with_tls_connector(settings.host.clone(), settings.port, tls)
                .helo_host(settings.helo_name.clone())
                .timeout(settings.timeout)
                .say_ehlo(false);
        // mail-send bounds each step but not a silent greeting on a plain connection; bound
        // the whole handshake here: connect, greeting, EHLO, STARTTLS and AUTH.
        let handshake = Duration::from_secs(1) + settings.timeout * 2;
        let connecting = async {
            match settings.tls {
                TlsMode::None => {
                    let mut client = builder.connect_plain().await?;
                    let pipelining = greet(&mut client, settings).await?;
                    Ok(Session {
                        connection: Connection::Plain(client),
                        pipelining,
                    })
                }
                TlsMode::Starttls | TlsMode::Implicit => {
                    let mut client = builder
                        .implicit_tls(settings.tls == TlsMode::Implicit)
                        .connect()
                        .await?;
                    let pipelining = greet(&mut client, settings).await?;
                    Ok(Session {
                        connection: Connection::Tls(Box::new(client)),
                        pipelining,
                    })
                }
            }
        };
        let session = match tokio::time::timeout(handshake, connecting).await {
            Ok(session) => session.map_err(unavailable)?,
            Err(_) => return Err(unavailable(mail_send::Error::Timeout)),
        };

        // Each message goes out in as few writes as the exchange allows; without
        // TCP_NODELAY a write that follows another unanswered one would wait for the
        // server's delayed ACK (about 40 ms).
        let socket = match &session.connection {
            Connection::Plain(client) => &client.stream,
            Connection::Tls(client) => client.stream.get_ref().0,
        };
        if let Err(err) = socket.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY on the SMTP connection");
        }
        Ok(session)
    }

    pub async fn send(&mut self, message: Outgoing<'_>) -> Outcome {
        let Some(session) = self.session.as_mut() else {
            return Outcome::Transient {
                error: "not connected".into(),
                reply: None,
            };
        };
        data_block(message.bytes, &mut self.data);
        let (from, to, data, pipelining) =
            (message.from, message.to, &self.data, session.pipelining);
        let result = match &mut session.connection {
            Connection::Plain(client) => transaction(client, pipelining, from, to, data).await,
            Connection::Tls(client) => transaction(client, pipelining, from, to, data).await,
        };
        let outcome = classify(result);

        // After a refused command the session is still usable once reset; after anything
        // else (I/O error, timeout, garbled reply, 421) it is out of step: start afresh.
        let reusable = match &outcome {
            Outcome::Sent { .. } => true,
            Outcome::Transient {
                reply: Some(reply), ..
            } => !reply.starts_with("421"),
            Outcome::Permanent { reply: Some(_), .. } => true,
            _ => false,
        };
        if !reusable {
            self.session = None;
        } else if !matches!(outcome, Outcome::Sent { .. }) {
            let reset = match self.session.as_mut().map(|session| &mut session.connection) {
                Some(Connection::Plain(client)) => client.rset().await,
                Some(Connection::Tls(client)) => client.rset().await,
                None => Ok(()),
            };
            if reset.is_err() {
                self.session = None;
            }
        }
        outcome
    }

    pub fn abandon(&mut self) {
        self.session = None;
    }

    pub async fn close(&mut self) {
        match self.session.take().map(|session| session.connection) {
            Some(Connection::Plain(client)) => drop(client.quit().await),
            Some(Connection::Tls(client)) => drop(client.quit().await),
            None => {}
        }
    }
}

/// EHLO, then AUTH when credentials are configured. Returns whether the server offers
/// PIPELINING.
async fn greet<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    settings: &SmtpSettings,
) -> mail_send::Result<bool> {
    let capabilities = client.capabilities(&settings.helo_name, false).await?;
    if let Some((username, password)) = &settings.credentials {
        let credentials = Credentials::new(username.as_str(), password.expose());
        client.authenticate(&credentials, &capabilities).await?;
    }
    Ok(capabilities.has_capability(EXT_PIPELINING))
}

/// One mail transaction: MAIL, RCPT and DATA (in one write when pipelining, else each
/// awaiting its reply), then the message in one write. Returns the server's reply to the
/// message, or the first refusal.
async fn transaction<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    pipelining: bool,
    from: &str,
    to: &str,
    data: &[u8],
) -> mail_send::Result<Response<String>> {
    let commands = [
        format!("MAIL FROM:<{from}>\r\n"),
        format!("RCPT TO:<{to}>\r\n"),
        "DATA\r\n".to_string(),
    ];
    let replies = if pipelining {
        // One write (mail-send's `cmds` writes each command on its own).
        let envelope = commands.concat();
        tokio::time::timeout(client.timeout, async {
            client.stream.write_all(envelope.as_bytes()).await?;
            client.stream.flush().await?;
            read_replies(client, commands.len()).await
        })
        .await
        .map_err(|_| mail_send::Error::Timeout)??
    } else {
        let mut replies = Vec::with_capacity(commands.len());
        for command in &commands {
            let reply = client.cmd(command).await?;
            let refused = !is_positive(&reply) && reply.code != 354;
            replies.push(reply);
            if refused {
                break;
            }
        }
        replies
    };

    // The first refusal is the one that explains the outcome: after it, a pipelining
    // server refuses the rest as a consequence ("503 no valid recipients").
    let go_ahead = replies.len() == commands.len() && replies[2].code == 354;
    if let Some(refusal) = replies.iter().take(2).find(|reply| !is_positive(reply)) {
        if go_ahead {
            // A server that says "go ahead" although it refused the sender or recipient gets
            // an empty message (RFC 2920 section 3.1), which it must refuse for want of a
            // recipient; the refusal that counts is the envelope's.
            if write_then_read(client, b".\r\n").await.is_err() {
                return Err(mail_send::Error::UnparseableReply);
            }
        }
        return Err(mail_send::Error::UnexpectedReply(refusal.clone()));
    }
    if !go_ahead {
        // DATA refused, or the server closed before answering it.
        return Err(match replies.into_iter().last() {
            Some(reply) if !is_positive(&reply) => mail_send::Error::UnexpectedReply(reply),
            _ => mail_send::Error::UnparseableReply,
        });
    }

    let reply = write_then_read(client, data).await?;
    if is_positive(&reply) {
        Ok(reply)
    } else {
        Err(mail_send::Error::UnexpectedReply(reply))
    }
}

/// Writes `bytes` in one piece and reads the one reply they call for, within the timeout.
async fn write_then_read<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    bytes: &[u8],
) -> mail_send::Result<Response<String>> {
    tokio::time::timeout(client.timeout, async {
        client.stream.write_all(bytes).await?;
        client.stream.flush().await?;
        client.read().await
    })
    .await
    .map_err(|_| mail_send::Error::Timeout)?
}

/// Reads the replies to `count` pipelined commands. A server may answer some and then close
/// the connection (a 421, or a 554 and goodbye): the replies read until then are returned,
/// since the first refusal among them is the outcome. mail-send's `read_many` would lose them.
async fn read_replies<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    count: usize,
) -> mail_send::Result<Vec<Response<String>>> {
    let mut buf = [0u8; 1024];
    let mut replies = Vec::with_capacity(count);
    let mut parser = ResponseReceiver::default();
    while replies.len() < count {
        let read = client.stream.read(&mut buf).await?;
        if read == 0 {
            return if replies.is_empty() {
                Err(mail_send::Error::UnparseableReply)
            } else {
                Ok(replies)
            };
        }
        let mut bytes = buf[..read].iter();
        while replies.len() < count {
            match parser.parse(&mut bytes) {
                Ok(reply) => {
                    replies.push(reply);
                    parser.reset();
                }
                Err(smtp_proto::Error::NeedsMoreData { .. }) => break,
                Err(_) => return Err(mail_send::Error::UnparseableReply),
            }
        }
    }
    Ok(replies)
}

fn is_positive(reply: &Response<String>) -> bool {
    (200..300).contains(&reply.code)
}

/// The message as DATA carries it (RFC 5321 section 4.5.2): a line starting with a dot gets
/// one more, and a line with a lone dot ends it.
fn data_block(message: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(message.len() + 16);
    let mut line_start = true;
    for &byte in message {
        if line_start && byte == b'.' {
            out.push(b'.');
        }
        out.push(byte);
        line_start = byte == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// Sorts the result of one SMTP transaction: 2xx sent, 4xx and broken connections transient,
/// 5xx permanent.
fn classify(result: Result<Response<String>, mail_send::Error>) -> Outcome {
    match result {
        Ok(reply) => Outcome::Sent {
            reply: format_reply(&reply),
        },
        Err(mail_send::Error::UnexpectedReply(reply)) => {
            let text = format_reply(&reply);
            let error = format!("server replied {text}");
            if reply.code >= 500 {
                Outcome::Permanent {
                    error,
                    reply: Some(text),
                }
            } else {
                Outcome::Transient {
                    error,
                    reply: Some(text),
                }
            }
        }
        Err(err) => Outcome::Transient {
            error: describe_error(&err),
            reply: None,
        },
    }
}

/// The reply on one line, as it is logged and stored. Control characters are replaced with
/// U+FFFD: a relay's text must not be able to break a log line or, as a NUL does, be refused
/// by PostgreSQL, which would leave the outcome unrecorded and the message sent again and
/// again.
fn format_reply(reply: &Response<String>) -> String {
    let message = reply
        .message
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(|c: char| c.is_control(), "\u{FFFD}");
    match reply.esc {
        [0, 0, 0] => format!("{} {message}", reply.code),
        [a, b, c] => format!("{} {a}.{b}.{c} {message}", reply.code),
    }
}

fn describe_error(err: &mail_send::Error) -> String {
    match err {
        mail_send::Error::Io(io) => format!("connection error: {io}"),
        mail_send::Error::Timeout => "timed out waiting for the server".into(),
        mail_send::Error::UnparseableReply => "connection closed or reply not understood".into(),
        mail_send::Error::UnexpectedReply(reply) => format!("server replied {}", format_reply(reply)),
        mail_send::Error::AuthenticationFailed(reply) => {
            format!("authentication failed: {}; check transport.smtp.username and password", format_reply(reply))
        }
        mail_send::Error::MissingStartTls => {
            "the server does not offer STARTTLS; set transport.smtp.tls to none only for a trusted relay".into()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::data_block;

    fn block(message: &str) -> String {
        let mut out = b"left over from the last message".to_vec();
        data_block(message.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_starting_with_a_dot_get_another() {
        assert_eq!(
            block(".first\r\nmid.dle\r\n.\r\n..two\r\n"),
            "..first\r\nmid.dle\r\n..\r\n...two\r\n.\r\n"
        );
    }

    #[test]
    fn the_end_marker_follows_a_line_break() {
        assert_eq!(
            block("Subject: x\r\n\r\nbody\r\n"),
            "Subject: x\r\n\r\nbody\r\n.\r\n"
        );
        assert_eq!(block("no final break"), "no final break\r\n.\r\n");
        assert_eq!(block(""), "\r\n.\r\n");
    }
}
