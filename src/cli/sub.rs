//! `herald sub`: subscribes to channels and prints every message on one
//! line until interrupted, reconnecting with backoff when the server goes
//! away.
//!
//! This module owns the session loop and the reconnect policy: which close
//! codes and refusals end the command ([`close_is_final`],
//! [`super::conn::ConnectError::is_retryable`]) and how long to wait between
//! attempts ([`Backoff`]). Turning a frame into a line is [`super::line`]'s
//! job. stdout carries only messages; status goes to stderr, one line per
//! event, prefixed `herald sub:`.
//!
//! On channels with history (protocol.md 1.1) it remembers each channel's
//! epoch and the offset of the last message printed, and resubscribes
//! after a reconnect with `since`: what was published meanwhile is printed
//! then, once and in order. When the server cannot give it back (too much
//! missed, or the history was lost), it says so on stderr.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Duration;

use clap::Args;
use tungstenite::{Message, WebSocket};

use super::conn::{self, ConnArgs};
use super::line::{self, Frame};
use super::CliError;

pub const EXAMPLES: &str = "\
Examples:
  herald sub news 'chat:room1'
  herald sub --url ws://herald.internal:6380/ws --token \"$(herald token --read '*')\" news
  herald sub --json news | jq .data";

/// How often an idle connection is checked with a ping; a connection that
/// does not answer within another interval is considered lost.
const KEEPALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Args)]
pub struct SubArgs {
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Print each message as the server's JSON frame, one per line, instead of `channel<TAB>data`.
    #[arg(long)]
    pub json: bool,

    /// Channels to subscribe to.
    #[arg(required = true, value_name = "CHANNEL", value_parser = parse_channel)]
    pub channels: Vec<String>,
}

/// Checks a channel name as the server would (protocol.md "Channel names").
pub fn parse_channel(s: &str) -> Result<String, String> {
    crate::frontends::native::protocol::validate_channel(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// The wait between connection attempts: 100 ms doubling to 5 s, each wait
/// drawn from the upper half of the current step ("equal jitter"), so many
/// clients dropped together do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        Backoff { step: Self::FIRST }
    }

    /// Back to the first step, after a connection that worked.
    pub fn reset(&mut self) {
        self.step = Self::FIRST;
    }

    /// The next wait, for a random `r`; then the step doubles.
    pub fn next_wait(&mut self, r: u64) -> Duration {
        let half = self.step / 2;
        let jitter = half.mul_f64((r >> 11) as f64 / (1u64 << 53) as f64);
        self.step = (self.step * 2).min(Self::MAX);
        half + jitter
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Does a close frame with `code` end `herald sub` instead of a reconnect?
/// 4001 (token expired or revoked) and other application codes would repeat
/// or are deliberate, and so would protocol errors and policy violations
/// (1002, 1003, 1007, 1008, 1009, 1010). A server going away or restarting
/// (1000, 1001, 1006, 1011, 1012, 1013) and a slow-consumer close (4008)
/// are worth another connection.
pub fn close_is_final(code: u16) -> bool {
    match code {
        4008 => false,
        4000..=4999 => true,
        1002 | 1003 | 1007 | 1008 | 1009 | 1010 => true,
        _ => false,
    }
}

/// How one connection ended.
enum End {
    /// The server went away; reconnect.
    Lost(String),
    /// Stop with this error.
    Fatal(CliError),
    /// Whoever read stdout is gone: stop quietly.
    StdoutClosed,
}

/// Runs `herald sub` until a signal (exit 0) or a final error.
pub fn run(args: SubArgs) -> Result<(), CliError> {
    exit_on_signals()?;
    let mut backoff = Backoff::new();
    let mut subscribed_once = false;
    // A status line was printed for the current outage; print no more until
    // a connection opens again (its end prints its own line).
    let mut outage_reported = false;
    let random = RandomState::new();
    let mut attempt = 0u64;
    let mut positions = Positions::new();
    loop {
        match conn::connect(&args.conn) {
            Ok(mut ws) => {
                let end = session(
                    &mut ws,
                    &args,
                    &mut subscribed_once,
                    &mut backoff,
                    &mut positions,
                );
                match end {
                    End::Lost(why) => {
                        eprintln!("herald sub: connection lost ({why}); reconnecting");
                        outage_reported = true;
                    }
                    End::Fatal(e) => return Err(e),
                    End::StdoutClosed => return Ok(()),
                }
            }
            Err(e) if e.is_retryable() => {
                if !outage_reported {
                    eprintln!("herald sub: {}; retrying", super::one_line(&e.to_string()));
                    outage_reported = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        attempt += 1;
        let mut h = random.build_hasher();
        h.write_u64(attempt);
        std::thread::sleep(backoff.next_wait(h.finish()));
    }
}

/// Per channel with history: its epoch and the offset of the last message
/// printed (or of the channel's newest when subscribed).
type Positions = HashMap<String, (String, u64)>;

/// One connection: subscribe to every channel (resuming where the last
/// connection stopped), then print until it ends.
fn session(
    ws: &mut WebSocket<TcpStream>,
    args: &SubArgs,
    subscribed_once: &mut bool,
    backoff: &mut Backoff,
    positions: &mut Positions,
) -> End {
    if let Err(e) = ws.get_mut().set_read_timeout(Some(KEEPALIVE)) {
        return End::Lost(e.to_string());
    }
    for (i, channel) in args.channels.iter().enumerate() {
        let since = positions
            .get(channel)
            .map(|(epoch, offset)| (epoch.as_str(), *offset));
        let request = line::subscribe_request(channel, i as u64, since);
        if let Err(e) = ws.send(Message::text(request)) {
            return End::Lost(conn::describe_error(&e));
        }
    }
    let mut confirmed = vec![false; args.channels.len()];
    let mut waiting = args.channels.len();
    let mut ping_sent = false;
    let stdout = io::stdout();
    loop {
        let msg = match ws.read() {
            Ok(m) => m,
            Err(e) if conn::is_interrupted(&e) => continue,
            Err(e) if conn::is_timeout(&e) => {
                if ping_sent {
                    return End::Lost(format!(
                        "no answer from the server for {}s",
                        KEEPALIVE.as_secs()
                    ));
                }
                if let Err(e) = ws.send(Message::Ping(Default::default())) {
                    return End::Lost(conn::describe_error(&e));
                }
                ping_sent = true;
                continue;
            }
            Err(e) => return End::Lost(conn::describe_error(&e)),
        };
        ping_sent = false;
        let out = match msg {
            Message::Text(text) => match line::parse_frame(&text) {
                Some(Frame::Message {
                    channel,
                    data,
                    offset,
                }) => {
                    if let (Some(offset), Some(pos)) = (offset, positions.get_mut(&*channel)) {
                        pos.1 = offset;
                    }
                    Some(if args.json {
                        line::compact_json(&text).into_owned()
                    } else {
                        line::message_line(&channel, data)
                    })
                }
                Some(Frame::Subscribed {
                    id,
                    epoch,
                    offset,
                    recovered,
                }) => {
                    if let Some(i) = our_id(id, &confirmed) {
                        let channel = &args.channels[i];
                        if recovered == Some(false) {
                            eprintln!(
                                "herald sub: messages of {channel} published while disconnected \
                                 could not be recovered (too many, or the server lost its history)"
                            );
                        }
                        match (epoch, offset) {
                            // Resumed: replayed messages move the position.
                            (Some(_), Some(_)) if recovered == Some(true) => {}
                            (Some(epoch), Some(top)) => {
                                positions.insert(channel.clone(), (epoch.into_owned(), top));
                            }
                            _ => {
                                positions.remove(channel);
                            }
                        }
                        if !std::mem::replace(&mut confirmed[i], true) {
                            waiting -= 1;
                        }
                        if waiting == 0 {
                            announce_subscribed(args, *subscribed_once);
                            *subscribed_once = true;
                            backoff.reset();
                        }
                    }
                    None
                }
                Some(Frame::Error { id, code, message }) => {
                    if let Some(i) = our_id(id, &confirmed) {
                        let channel = &args.channels[i];
                        let mut message = message.into_owned();
                        if !message.contains(channel.as_str()) {
                            message = format!("{message} (subscribing to {channel})");
                        }
                        return End::Fatal(CliError::Server {
                            code: code.into_owned(),
                            message,
                        });
                    }
                    eprintln!(
                        "herald sub: server error: {code}: {}",
                        super::one_line(&message)
                    );
                    None
                }
                Some(Frame::Unsubscribed { channel, id: None }) => {
                    eprintln!("herald sub: the server unsubscribed this connection from {channel}");
                    None
                }
                _ => None,
            },
            Message::Binary(frame) => match line::binary_line(&frame, args.json) {
                Ok(l) => Some(l),
                Err(why) => {
                    eprintln!("herald sub: ignoring a malformed binary message: {why}");
                    None
                }
            },
            Message::Close(frame) => {
                // tungstenite has queued the close reply; send it.
                let _ = ws.flush();
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                let what = conn::describe_close(code, &reason);
                if close_is_final(code) {
                    return End::Fatal(CliError::Failed(format!(
                        "the server closed the connection ({what}); not reconnecting"
                    )));
                }
                return End::Lost(what);
            }
            _ => None,
        };
        if let Some(l) = out {
            let mut o = stdout.lock();
            if let Err(e) = writeln!(o, "{l}").and_then(|()| o.flush()) {
                if e.kind() == io::ErrorKind::BrokenPipe {
                    return End::StdoutClosed;
                }
                return End::Fatal(CliError::Failed(format!(
                    "cannot write to standard output: {e}"
                )));
            }
        }
    }
}

/// The index of one of our subscribe requests, from a reply's raw `id`.
fn our_id(id: Option<&str>, confirmed: &[bool]) -> Option<usize> {
    id?.parse::<usize>().ok().filter(|&i| i < confirmed.len())
}

fn announce_subscribed(args: &SubArgs, again: bool) {
    let channels = args.channels.join(", ");
    if again {
        eprintln!(
            "herald sub: reconnected to {}; subscribed to {channels}",
            args.conn.url
        );
    } else {
        eprintln!(
            "herald sub: connected to {}; subscribed to {channels}",
            args.conn.url
        );
    }
}

/// SIGINT and SIGTERM end `herald sub` with status 0 and no message, after
/// flushing what was printed.
fn exit_on_signals() -> Result<(), CliError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| CliError::Failed(format!("cannot handle signals: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = io::stdout().lock().flush();
                std::process::exit(0);
            }
        })
        .map_err(|e| CliError::Failed(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new();
        let lows: Vec<_> = (0..8).map(|_| b.next_wait(0)).collect();
        let ms = |d: &Duration| d.as_millis();
        assert_eq!(
            lows.iter().map(ms).collect::<Vec<_>>(),
            [50, 100, 200, 400, 800, 1600, 2500, 2500]
        );
        let mut b = Backoff::new();
        let highs: Vec<_> = (0..8).map(|_| b.next_wait(u64::MAX)).collect();
        for (lo, hi) in lows.iter().zip(&highs) {
            assert!(hi > lo && *hi <= *lo * 2, "{lo:?} {hi:?}");
        }
        assert!(highs[7] <= Backoff::MAX);
        b.reset();
        assert_eq!(b.next_wait(0), Duration::from_millis(50));
    }

    #[test]
    fn final_close_codes() {
        for code in [4001, 4003, 1002, 1008, 1009] {
            assert!(close_is_final(code), "{code}");
        }
        for code in [1000, 1001, 1005, 1006, 1011, 1012, 1013, 4008] {
            assert!(!close_is_final(code), "{code}");
        }
    }

    #[test]
    fn reply_ids_are_matched_to_requests() {
        let confirmed = [false, false];
        assert_eq!(our_id(Some("1"), &confirmed), Some(1));
        assert_eq!(our_id(Some("2"), &confirmed), None);
        assert_eq!(our_id(Some("\"1\""), &confirmed), None);
        assert_eq!(our_id(None, &confirmed), None);
    }

    #[test]
    fn channels_are_checked_like_the_server_does() {
        assert!(parse_channel("chat:room-1").is_ok());
        assert!(parse_channel("a b").is_err());
        assert!(parse_channel("chat:*").is_err());
        assert!(parse_channel("").is_err());
    }
}
