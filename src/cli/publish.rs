//! `herald pub`: publishes one message, or one per line of standard input,
//! over one WebSocket connection.
//!
//! Every publish carries an `id` and waits for its `ack` before the next is
//! sent, so an error (`forbidden`, `bad_request`, `rate_limited`, ..) is
//! reported against the message that caused it, and exit status 0 means the
//! server accepted every message. It does not reconnect: a lost connection
//! is an error, since some messages may not have been published.

use std::io::{self, BufRead};
use std::net::TcpStream;
use std::time::Duration;

use clap::Args;
use tungstenite::{Message, WebSocket};

use super::conn::{self, ConnArgs};
use super::line::{self, Frame};
use super::sub::parse_channel;
use super::CliError;

pub const EXAMPLES: &str = "\
Examples:
  herald pub news '{\"title\":\"hello\"}'
  herald pub news hello                     # sent as the JSON string \"hello\"
  printf '1\\n2\\n3\\n' | herald pub counter   # three messages: 1, 2 and 3
  herald pub --token \"$(herald token --write 'chat:*')\" chat:room1 '{\"text\":\"hi\"}'";

/// How long to wait for the ack of one publish.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Args)]
pub struct PubArgs {
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Channel to publish to.
    #[arg(value_parser = parse_channel)]
    pub channel: String,

    /// The message: JSON is sent as it is (`{"x":1}`, `42`, `"text"`), any other
    /// text as a JSON string. Without it, each non-empty line of standard input
    /// is one message.
    pub data: Option<String>,
}

/// Runs `herald pub`.
pub fn run(args: PubArgs) -> Result<(), CliError> {
    let mut ws = conn::connect(&args.conn)?;
    ws.get_mut()
        .set_read_timeout(Some(ACK_TIMEOUT))
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let mut publisher = Publisher {
        ws: &mut ws,
        channel: &args.channel,
        next_id: 1,
    };
    match &args.data {
        Some(data) => publisher.publish(data)?,
        None => {
            for (n, text) in io::stdin().lock().lines().enumerate() {
                let text =
                    text.map_err(|e| CliError::Failed(format!("cannot read standard input: {e}")))?;
                let text = text.strip_suffix('\r').unwrap_or(&text);
                if text.trim().is_empty() {
                    continue;
                }
                publisher.publish(text).map_err(|e| match e {
                    CliError::Server { code, message } => CliError::Server {
                        code,
                        message: format!("{message} (standard input line {})", n + 1),
                    },
                    other => other,
                })?;
            }
        }
    }
    close(&mut ws);
    Ok(())
}

struct Publisher<'a> {
    ws: &'a mut WebSocket<TcpStream>,
    channel: &'a str,
    next_id: u64,
}

impl Publisher<'_> {
    /// Publishes `text` (see [`line::data_json`]) and waits for its ack.
    fn publish(&mut self, text: &str) -> Result<(), CliError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = line::publish_request(self.channel, &line::data_json(text), id);
        self.ws.send(Message::text(request)).map_err(|e| {
            CliError::Failed(format!(
                "connection lost while publishing: {}",
                conn::describe_error(&e)
            ))
        })?;
        let want = id.to_string();
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => match line::parse_frame(&text) {
                    Some(Frame::Ack { id: Some(got) }) if got == want => return Ok(()),
                    // An error without an id can only be about this publish:
                    // it is the only request in flight.
                    Some(Frame::Error { id, code, message })
                        if id.is_none() || id == Some(want.as_str()) =>
                    {
                        return Err(CliError::Server {
                            code: code.into_owned(),
                            message: super::one_line(&message),
                        });
                    }
                    _ => {}
                },
                Ok(Message::Close(frame)) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Err(CliError::Failed(format!(
                        "the server closed the connection ({}) before acknowledging the publish",
                        conn::describe_close(code, &reason)
                    )));
                }
                Ok(_) => {}
                Err(e) if conn::is_interrupted(&e) => {}
                Err(e) if conn::is_timeout(&e) => {
                    return Err(CliError::Failed(format!(
                        "no acknowledgement from the server within {}s",
                        ACK_TIMEOUT.as_secs()
                    )))
                }
                Err(e) => {
                    return Err(CliError::Failed(format!(
                        "connection lost before the publish was acknowledged: {}",
                        conn::describe_error(&e)
                    )))
                }
            }
        }
    }
}

/// Closes politely (RFC 6455 §7.1.2): send a close frame and read until the
/// server's answer, briefly. Everything was acknowledged already, so a
/// failure here changes nothing.
fn close(ws: &mut WebSocket<TcpStream>) {
    let _ = ws.get_mut().set_read_timeout(Some(Duration::from_secs(1)));
    if ws.close(None).is_err() {
        return;
    }
    while ws.read().is_ok() {}
}
