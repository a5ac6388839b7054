//! SMTP through mail-send: one connection, opened on demand and reused for message after
//! message, dropped and reopened whenever it may be out of step with the server.

use std::time::Duration;

use mail_send::smtp::message::Message;
use mail_send::{SmtpClient, SmtpClientBuilder};
use smtp_proto::Response;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Outcome, Outgoing, Unavailable};
use crate::config::{SmtpSettings, TlsMode};

enum Connection {
    Plain(SmtpClient<TcpStream>),
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
}

pub struct SmtpTransport {
    settings: SmtpSettings,
    connection: Option<Connection>,
}

impl std::fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("host", &self.settings.host)
            .field("port", &self.settings.port)
            .field("connected", &self.connection.is_some())
            .finish()
    }
}

impl SmtpTransport {
    pub fn new(settings: SmtpSettings) -> Self {
        Self {
            settings,
            connection: None,
        }
    }

    pub async fn ready(&mut self) -> Result<(), Unavailable> {
        if self.connection.is_none() {
            self.connection = Some(self.connect().await?);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<Connection, Unavailable> {
        let settings = &self.settings;
        let unavailable = |err: mail_send::Error| {
            Unavailable(format!(
                "cannot open an SMTP session with {}:{}: {}",
                settings.host,
                settings.port,
                describe_error(&err)
            ))
        };
        let mut builder = SmtpClientBuilder::new(settings.host.clone(), settings.port)
            .map_err(|err| Unavailable(format!("invalid SMTP host {:?}: {err}", settings.host)))?
            .helo_host(settings.helo_name.clone())
            .timeout(settings.timeout);
        if let Some((username, password)) = &settings.credentials {
            builder = builder.credentials((username.clone(), password.expose().to_string()));
        }
        // mail-send bounds each step but not a silent greeting on a plain connection; bound
        // the whole handshake here: connect, greeting, EHLO, STARTTLS and AUTH.
        let handshake = Duration::from_secs(1) + settings.timeout * 2;
        let connecting = async {
            match settings.tls {
                TlsMode::None => builder.connect_plain().await.map(Connection::Plain),
                TlsMode::Starttls => builder
                    .implicit_tls(false)
                    .connect()
                    .await
                    .map(|client| Connection::Tls(Box::new(client))),
                TlsMode::Implicit => builder
                    .implicit_tls(true)
                    .connect()
                    .await
                    .map(|client| Connection::Tls(Box::new(client))),
            }
        };
        let connection = match tokio::time::timeout(handshake, connecting).await {
            Ok(connection) => connection.map_err(unavailable)?,
            Err(_) => return Err(unavailable(mail_send::Error::Timeout)),
        };

        // mail-send writes the message body and the final "." in separate writes; with
        // Nagle's algorithm the second waits for the server's delayed ACK (about 40 ms), which
        // would stall every message and widen the window in which a crash causes a resend.
        let socket = match &connection {
            Connection::Plain(client) => &client.stream,
            Connection::Tls(client) => client.stream.get_ref().0,
        };
        if let Err(err) = socket.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY on the SMTP connection");
        }
        Ok(connection)
    }

    pub async fn send(&mut self, message: Outgoing<'_>) -> Outcome {
        let Some(connection) = self.connection.as_mut() else {
            return Outcome::Transient {
                error: "not connected".into(),
                reply: None,
            };
        };
        let envelope = Message::new(message.from, [message.to], message.bytes);
        let result = match connection {
            Connection::Plain(client) => client.send(envelope).await,
            Connection::Tls(client) => client.send(envelope).await,
        };
        let outcome = classify(result);

        // After a rejected command the session is still usable once reset; after anything
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
            self.connection = None;
        } else if !matches!(outcome, Outcome::Sent { .. }) {
            let reset = match self.connection.as_mut() {
                Some(Connection::Plain(client)) => client.rset().await,
                Some(Connection::Tls(client)) => client.rset().await,
                None => Ok(()),
            };
            if reset.is_err() {
                self.connection = None;
            }
        }
        outcome
    }

    pub fn abandon(&mut self) {
        self.connection = None;
    }

    pub async fn close(&mut self) {
        match self.connection.take() {
            Some(Connection::Plain(client)) => drop(client.quit().await),
            Some(Connection::Tls(client)) => drop(client.quit().await),
            None => {}
        }
    }
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

fn format_reply(reply: &Response<String>) -> String {
    let message = reply
        .message
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
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
