//! The link between a restart's two processes on a single node (no
//! cluster broker): a Unix socket pair the old process creates when it
//! starts its successor (`HERALD_LINK_FD` in the successor).
//!
//! It makes the two processes one node for the length of the drain:
//!
//! 1. The new process asks for the old one's state (`Want`) before it
//!    accepts anyone. The old one's owner cores stop numbering (each now
//!    forwards what it would have sequenced, see [`crate::engine::handoff`]),
//!    then each writes its channels' history and idempotency keys
//!    (`Stream`, `Entry`, `Key`); with `HISTORY_DIR` the old process
//!    closes the file instead of writing the history, and the new one
//!    reads it from there. `End` closes the state.
//! 2. The new process starts with that history (same epochs, offsets go
//!    on) and numbers every channel from then on: the publishes the old
//!    one forwards (`Publish`, answered with `Ack` when the publisher
//!    waits for it) as well as its own clients'.
//! 3. Every message the new process numbers goes back to the old one
//!    (`Sequenced`), whose owner cores keep it in their history (a
//!    replica, for the joins with `since` of clients still there) and fan
//!    it out to the subscribers it still has, in the same order.
//!
//! When the old process exits, the new one stops copying. If the link is
//! lost while the old process still serves clients, it closes them all at
//! once (they come back to the new one and recover); if the new process
//! dies before it accepts, the old one numbers its channels again.
//!
//! Records are `u32` length (little-endian), type byte, body; every field
//! is checked, and nothing from the link can make either process wait
//! without bound.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use super::history_disk::HistoryDisk;
use crate::engine::core::{Core, Envelope, Hub, Publish};
use crate::engine::handoff::{Forward, Forwarded, Tap};
use crate::engine::history::{Keep, Outcome, Place, Remembered, Restored};
use crate::engine::message::Message;
use crate::engine::personal::{Cursor, Record as DurableRecord};

/// The longest record either side accepts (a kept frame and its header).
const MAX_RECORD: usize = 64 << 20;
/// Records queued towards the other process past which the link is given
/// up rather than let grow (the other process stopped reading).
const QUEUE_LIMIT: usize = 262_144;
/// How long the new process waits for the old one's state, and the old
/// one for each of its cores to write it.
pub const STATE_WITHIN: Duration = Duration::from_secs(30);

const WANT: u8 = 1;
const STREAM: u8 = 2;
const ENTRY: u8 = 3;
const KEY: u8 = 4;
const END: u8 = 5;
const PUBLISH: u8 = 6;
const SEQUENCED: u8 = 7;
const ACK: u8 = 8;
const DURABLE: u8 = 9;

/// Why the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the link to the other process: {0}")]
    Io(#[from] io::Error),
    #[error("the other process closed the link")]
    Closed,
    #[error("a malformed record from the other process ({0})")]
    Malformed(&'static str),
}

/// One record, as read.
#[derive(Debug, PartialEq)]
pub enum Record {
    Want,
    /// A channel's history; `entries` [`Record::Entry`] records follow.
    Stream {
        key: Box<str>,
        epoch: Arc<str>,
        top: u64,
        keep: Keep,
        entries: u32,
    },
    /// A kept frame and when it was published (Unix ms).
    Entry {
        unix_ms: u64,
        frame: Bytes,
    },
    /// An idempotency key, remembered until `until_unix_ms`.
    Key {
        channel: Box<str>,
        key: Box<str>,
        place: Option<Place>,
        until_unix_ms: u64,
    },
    End,
    /// A publish of the old process's clients, from its owner core
    /// `owner`; `ticket` (nonzero) asks for an [`Record::Ack`].
    Publish {
        owner: u16,
        ticket: u64,
        idempotency_key: Option<Box<str>>,
        wire: Bytes,
    },
    /// A message the new process numbered (at `place`).
    Sequenced {
        place: Option<Place>,
        wire: Bytes,
    },
    /// The outcome of a publish the old process forwarded.
    Ack {
        owner: u16,
        ticket: u64,
        duplicate: bool,
        place: Option<Place>,
    },
    /// A user's durable subscription (personal channels) and its cursor.
    Durable(DurableRecord),
}

/// Appends records to a buffer.
struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    /// Starts a record of type `kind`; [`Writer::end`] fills its length.
    fn start(out: &mut Vec<u8>, kind: u8) -> (Writer<'_>, usize) {
        let at = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, kind]);
        (Writer(out), at)
    }
    fn end(self, at: usize) {
        let len = (self.0.len() - at - 4) as u32;
        self.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        // Channel names, keys and epochs: all well under 64 KiB.
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn place(&mut self, place: Option<&Place>) {
        match place {
            None => self.0.push(0),
            Some((epoch, offset)) => {
                self.0.push(1);
                self.str(epoch);
                self.u64(*offset);
            }
        }
    }
}

fn put_simple(out: &mut Vec<u8>, kind: u8) {
    let (w, at) = Writer::start(out, kind);
    w.end(at);
}

/// A channel's history, its header and then each kept frame; `unix` turns
/// the store's clock into Unix ms.
fn put_stream(out: &mut Vec<u8>, r: &Restored, unix: impl Fn(u64) -> u64) {
    let (mut w, at) = Writer::start(out, STREAM);
    w.str(&r.key);
    w.str(&r.epoch);
    w.u64(r.top);
    w.u64(r.keep.size as u64);
    w.u64(r.keep.ttl_ms);
    w.0.extend_from_slice(&(r.entries.len() as u32).to_le_bytes());
    w.end(at);
    for (t, frame) in &r.entries {
        let (mut w, at) = Writer::start(out, ENTRY);
        w.u64(unix(*t));
        w.0.extend_from_slice(frame);
        w.end(at);
    }
}

fn put_key(out: &mut Vec<u8>, k: &Remembered, until_unix_ms: u64) {
    let (mut w, at) = Writer::start(out, KEY);
    w.str(&k.channel);
    w.str(&k.key);
    w.place(k.place.as_ref());
    w.u64(until_unix_ms);
    w.end(at);
}

fn put_publish(
    out: &mut Vec<u8>,
    owner: usize,
    ticket: u64,
    idempotency_key: Option<&str>,
    msg: &Message,
    origin: u64,
) {
    let (mut w, at) = Writer::start(out, PUBLISH);
    w.0.extend_from_slice(&(owner as u16).to_le_bytes());
    w.u64(ticket);
    match idempotency_key {
        None => w.0.push(0),
        Some(k) => {
            w.0.push(1);
            w.str(k);
        }
    }
    msg.encode_wire(origin, w.0);
    w.end(at);
}

fn put_sequenced(out: &mut Vec<u8>, place: Option<&Place>, msg: &Message, origin: u64) {
    let (mut w, at) = Writer::start(out, SEQUENCED);
    w.place(place);
    msg.encode_wire(origin, w.0);
    w.end(at);
}

fn put_durable(out: &mut Vec<u8>, r: &DurableRecord) {
    let (mut w, at) = Writer::start(out, DURABLE);
    w.0.extend_from_slice(&r.namespace.to_le_bytes());
    w.str(&r.user);
    w.str(&r.channel);
    w.str(&r.cursor.epoch);
    w.u64(r.cursor.offset);
    w.end(at);
}

fn put_ack(out: &mut Vec<u8>, owner: u16, ticket: u64, outcome: &Outcome) {
    let (mut w, at) = Writer::start(out, ACK);
    w.0.extend_from_slice(&owner.to_le_bytes());
    w.u64(ticket);
    w.0.push(u8::from(outcome.duplicate));
    w.place(outcome.position.as_ref());
    w.end(at);
}

/// Reads a record's fields, each checked.
struct Fields {
    buf: Bytes,
    at: usize,
}

impl Fields {
    fn take(&mut self, n: usize) -> Result<&[u8], LinkError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(LinkError::Malformed("truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, LinkError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, LinkError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, LinkError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, LinkError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn str(&mut self) -> Result<&str, LinkError> {
        let n = usize::from(self.u16()?);
        std::str::from_utf8(self.take(n)?).map_err(|_| LinkError::Malformed("not UTF-8"))
    }
    fn place(&mut self) -> Result<Option<Place>, LinkError> {
        match self.u8()? {
            0 => Ok(None),
            1 => {
                let epoch: Arc<str> = self.str()?.into();
                Ok(Some((epoch, self.u64()?)))
            }
            _ => Err(LinkError::Malformed("place")),
        }
    }
    /// What is left, without a copy.
    fn rest(&mut self) -> Bytes {
        let r = self.buf.slice(self.at..);
        self.at = self.buf.len();
        r
    }
    fn done(&self) -> Result<(), LinkError> {
        match self.at == self.buf.len() {
            true => Ok(()),
            false => Err(LinkError::Malformed("trailing bytes")),
        }
    }
}

impl Record {
    /// Reads one record's type and body.
    pub fn decode(kind: u8, body: Bytes) -> Result<Record, LinkError> {
        let mut f = Fields { buf: body, at: 0 };
        let r = match kind {
            WANT => Record::Want,
            END => Record::End,
            STREAM => {
                let key = f.str()?.into();
                let epoch = f.str()?.into();
                let top = f.u64()?;
                let size = f.u64()?;
                let ttl_ms = f.u64()?;
                let entries = f.u32()?;
                if size == 0 || size > 1_000_000 || u64::from(entries) > size.min(top) {
                    return Err(LinkError::Malformed("stream"));
                }
                Record::Stream {
                    key,
                    epoch,
                    top,
                    keep: Keep {
                        size: size as usize,
                        ttl_ms,
                    },
                    entries,
                }
            }
            ENTRY => {
                let unix_ms = f.u64()?;
                Record::Entry {
                    unix_ms,
                    frame: f.rest(),
                }
            }
            DURABLE => Record::Durable(DurableRecord {
                namespace: f.u16()?,
                user: f.str()?.into(),
                channel: f.str()?.into(),
                cursor: Cursor {
                    epoch: f.str()?.into(),
                    offset: f.u64()?,
                },
            }),
            KEY => Record::Key {
                channel: f.str()?.into(),
                key: f.str()?.into(),
                place: f.place()?,
                until_unix_ms: f.u64()?,
            },
            PUBLISH => {
                let owner = f.u16()?;
                let ticket = f.u64()?;
                let idempotency_key = match f.u8()? {
                    0 => None,
                    1 => Some(f.str()?.into()),
                    _ => return Err(LinkError::Malformed("idempotency key")),
                };
                Record::Publish {
                    owner,
                    ticket,
                    idempotency_key,
                    wire: f.rest(),
                }
            }
            SEQUENCED => {
                let place = f.place()?;
                Record::Sequenced {
                    place,
                    wire: f.rest(),
                }
            }
            ACK => {
                let owner = f.u16()?;
                let ticket = f.u64()?;
                let duplicate = match f.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(LinkError::Malformed("ack")),
                };
                Record::Ack {
                    owner,
                    ticket,
                    duplicate,
                    place: f.place()?,
                }
            }
            _ => return Err(LinkError::Malformed("unknown record type")),
        };
        f.done()?;
        Ok(r)
    }
}

/// Reads the next record (blocking, within the socket's read timeout).
pub fn read_record(r: &mut impl Read) -> Result<Record, LinkError> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(LinkError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if !(1..=MAX_RECORD).contains(&len) {
        return Err(LinkError::Malformed("length"));
    }
    let mut body = vec![0u8; len - 1];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => LinkError::Closed,
        _ => e.into(),
    })?;
    Record::decode(head[4], Bytes::from(body))
}

/// What goes to the other process, in order.
enum Out {
    /// Records already written out.
    Bytes(Vec<u8>),
    /// A numbered message, written out on the writer's thread.
    Sequenced(Arc<Message>, Option<Place>),
    /// Nothing more: write what is queued and end the link.
    Close,
}

/// The sending half: a thread that writes what the cores queue, in
/// batches.
struct Outbox {
    tx: Sender<Out>,
    thread: Mutex<Option<JoinHandle<()>>>,
    broken: Arc<AtomicBool>,
    /// The link itself, to end it at once ([`Outbox::cut`]).
    link: UnixStream,
}

impl Outbox {
    fn start(mut link: UnixStream, origin: u64, name: &str) -> io::Result<Outbox> {
        // A process that stops reading for this long has lost the link.
        link.set_write_timeout(Some(Duration::from_secs(5)))?;
        let cut = link.try_clone()?;
        let (tx, rx): (Sender<Out>, Receiver<Out>) = crossbeam_channel::unbounded();
        let broken = Arc::new(AtomicBool::new(false));
        let b = broken.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 << 10);
                let mut closing = false;
                while let Ok(first) = rx.recv() {
                    let mut next = Some(first);
                    while let Some(out) = next.take() {
                        match out {
                            Out::Bytes(b) => buf.extend_from_slice(&b),
                            Out::Sequenced(msg, place) => {
                                put_sequenced(&mut buf, place.as_ref(), &msg, origin)
                            }
                            Out::Close => closing = true,
                        }
                        if buf.len() < 256 << 10 && !closing {
                            next = rx.try_recv().ok();
                        }
                    }
                    if let Err(e) = link.write_all(&buf) {
                        if !b.load(Ordering::Acquire) {
                            tracing::warn!(
                                "the other process does not read the link ({e}): it is given up"
                            );
                        }
                        b.store(true, Ordering::Release);
                        let _ = link.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    buf.clear();
                    if closing {
                        break;
                    }
                }
                // What was queued is written; the other side reads the
                // end of the link.
                let _ = link.shutdown(std::net::Shutdown::Write);
            })?;
        Ok(Outbox {
            tx,
            thread: Mutex::new(Some(thread)),
            broken,
            link: cut,
        })
    }

    /// Ends the link now, whatever is still queued: the other process
    /// reads its end at once.
    fn cut(&self) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            tracing::warn!("too much is queued for the other process: the link is given up");
        }
        let _ = self.link.shutdown(std::net::Shutdown::Both);
    }

    /// Queues `out`; false if the link is broken or full.
    fn send(&self, out: Out) -> bool {
        !self.broken.load(Ordering::Acquire)
            && self.tx.len() < QUEUE_LIMIT
            && self.tx.send(out).is_ok()
    }
}

/// A clock-free conversion between a store's clock and Unix ms, from one
/// reading of each.
#[derive(Clone, Copy)]
struct Clocks {
    store_now: u64,
    unix_now: u64,
}

impl Clocks {
    /// `t` (past or future) on the store's clock, in Unix ms.
    fn to_unix(self, t: u64) -> u64 {
        shift(t, self.store_now, self.unix_now)
    }
    /// Unix ms `unix` (past or future) on the store's clock, which starts
    /// at 0.
    fn of_unix(self, unix: u64) -> u64 {
        shift(unix, self.unix_now, self.store_now)
    }
}

/// `t` moved from a clock that reads `from` now to one that reads `to`.
fn shift(t: u64, from: u64, to: u64) -> u64 {
    let v = i128::from(t) - i128::from(from) + i128::from(to);
    v.clamp(0, i128::from(u64::MAX)) as u64
}

// ---------------------------------------------------------------------
// The old process's side.

/// The old process's end of the link, from the moment its successor
/// starts.
pub struct Predecessor {
    out: Outbox,
    state: Arc<OldState>,
}

struct OldState {
    /// The link is gone.
    down: AtomicBool,
    /// The successor accepts (this process drains).
    handed_over: AtomicBool,
    /// Owner cores forward (the state went to the successor).
    switched: AtomicBool,
    origin: u64,
}

/// What the old process is told of its link.
pub enum OldEvent {
    /// Lost while this process still serves clients after the handover:
    /// they must be closed now, to come back to the new process.
    LostAfterHandover,
}

struct Forwarder {
    out: Arc<Predecessor>,
}

impl Forward for Forwarder {
    fn forward(
        &self,
        owner: usize,
        msg: &Arc<Message>,
        idempotency_key: Option<&str>,
        ticket: u64,
    ) -> Forwarded {
        let s = &self.out.state;
        if s.down.load(Ordering::Acquire) {
            return match s.handed_over.load(Ordering::Acquire) {
                true => Forwarded::Refused,
                false => Forwarded::Gone,
            };
        }
        let mut b = Vec::with_capacity(64 + msg.frame().len());
        put_publish(&mut b, owner, ticket, idempotency_key, msg, s.origin);
        match self.out.out.send(Out::Bytes(b)) {
            true => Forwarded::Sent,
            false => Forwarded::Refused,
        }
    }
}

impl Predecessor {
    /// Serves the link to a successor just started: its request for the
    /// state, the messages it numbers, its answers. `disk` is this
    /// process's `HISTORY_DIR`, closed for the successor to open.
    pub fn start(
        link: UnixStream,
        hub: Arc<Hub>,
        disk: Option<Arc<HistoryDisk>>,
        tell: impl Fn(OldEvent) + Send + 'static,
    ) -> io::Result<Arc<Predecessor>> {
        let reading = link.try_clone()?;
        let origin = super::cluster::origin_tag();
        let me = Arc::new(Predecessor {
            out: Outbox::start(link, origin, "herald-handoff-w")?,
            state: Arc::new(OldState {
                down: AtomicBool::new(false),
                handed_over: AtomicBool::new(false),
                switched: AtomicBool::new(false),
                origin,
            }),
        });
        let me2 = me.clone();
        std::thread::Builder::new()
            .name("herald-handoff-r".into())
            .spawn(move || me2.read(reading, hub, disk, tell))?;
        Ok(me)
    }

    /// The successor accepts: from now on a lost link closes this
    /// process's clients rather than have it number channels again.
    pub fn handed_over(&self) {
        self.state.handed_over.store(true, Ordering::Release);
    }

    /// At exit: writes what is still queued and ends the link (bounded
    /// by the link's write timeout).
    pub fn finish(&self) {
        let _ = self.out.tx.send(Out::Close);
        let thread = self.out.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    fn read(
        self: Arc<Self>,
        mut link: UnixStream,
        hub: Arc<Hub>,
        disk: Option<Arc<HistoryDisk>>,
        tell: impl Fn(OldEvent),
    ) {
        let src = hub.outside_source();
        let why = loop {
            let record = match read_record(&mut link) {
                Ok(r) => r,
                Err(e) => break e,
            };
            match record {
                Record::Want => {
                    if !self.state.switched.swap(true, Ordering::AcqRel) {
                        self.hand_state(&hub, disk.as_deref());
                    }
                }
                Record::Sequenced { place, wire } => {
                    let mut msg = match Message::decode_wire(wire, self.state.origin) {
                        Ok(m) => m,
                        Err(_) => break LinkError::Malformed("a message"),
                    };
                    if let Some((_, offset)) = &place {
                        let (_, carried_by) = hub.history_encoding(msg.namespace());
                        msg.set_offset(*offset, carried_by);
                    }
                    let owner = hub.owner(msg.hash());
                    let r = Box::new((Arc::new(msg), place));
                    hub.bus.send(src, owner, Envelope::Replicate(r));
                }
                Record::Ack {
                    owner,
                    ticket,
                    duplicate,
                    place,
                } => {
                    let outcome = Outcome {
                        position: place,
                        duplicate,
                        unavailable: false,
                    };
                    let owner = usize::from(owner);
                    if owner < hub.cores() {
                        hub.bus.send(
                            src,
                            owner,
                            Envelope::Run(Box::new(move |core: &Core| {
                                core.answer_forwarded(ticket, &outcome)
                            })),
                        );
                    }
                }
                _ => break LinkError::Malformed("a record only the old process sends"),
            }
        };
        self.state.down.store(true, Ordering::Release);
        if !self.state.switched.load(Ordering::Acquire) {
            return;
        }
        match self.state.handed_over.load(Ordering::Acquire) {
            true => {
                tracing::warn!("{why}: closing this process's clients now, for the new process");
                tell(OldEvent::LostAfterHandover);
            }
            false => {
                tracing::warn!(
                    "{why}: the new process is gone; numbering every channel here again"
                );
                hub.handoff.set_forward(None);
            }
        }
        for core in 0..hub.cores() {
            hub.bus.send(
                src,
                core,
                Envelope::Run(Box::new(|c: &Core| c.fail_forwarded())),
            );
        }
    }

    /// Stops numbering here and writes the state for the successor.
    fn hand_state(self: &Arc<Self>, hub: &Arc<Hub>, disk: Option<&HistoryDisk>) {
        let src = hub.outside_source();
        hub.handoff
            .set_forward(Some(Arc::new(Forwarder { out: self.clone() })));
        // Each core, behind what it was sequencing: from here on it
        // forwards, so what it exports is complete.
        let (written, all) = crossbeam_channel::bounded(hub.cores());
        let with_streams = disk.is_none();
        for core in 0..hub.cores() {
            let written = written.clone();
            let me = self.clone();
            hub.bus.send(
                src,
                core,
                Envelope::Run(Box::new(move |c: &Core| {
                    let (now, streams, keys) = c.export_history();
                    let clocks = Clocks {
                        store_now: now,
                        unix_now: crate::clock::unix_ms(),
                    };
                    let mut b = Vec::new();
                    if with_streams {
                        for s in &streams {
                            put_stream(&mut b, s, |t| clocks.to_unix(t));
                        }
                    }
                    for k in &keys {
                        put_key(&mut b, k, clocks.to_unix(k.until));
                    }
                    me.out.send(Out::Bytes(b));
                    let _ = written.send(());
                })),
            );
        }
        for _ in 0..hub.cores() {
            if all.recv_timeout(STATE_WITHIN).is_err() {
                tracing::error!("a worker did not write its history for the new process in time");
                break;
            }
        }
        let mut b = Vec::new();
        match disk {
            // Written and marked clean (the users' durable subscriptions
            // too): the successor reads it back.
            Some(disk) => disk.stop(STATE_WITHIN),
            None => {
                for r in hub.durable.export() {
                    put_durable(&mut b, &r);
                }
            }
        }
        put_simple(&mut b, END);
        self.out.send(Out::Bytes(b));
        tracing::info!("history handed to the new process; it numbers every channel now");
    }
}

// ---------------------------------------------------------------------
// The new process's side.

/// What the new process starts with, by owner core; and the publishes
/// the old one forwarded meanwhile, to sequence first.
#[derive(Default)]
pub struct Inherited {
    pub streams: Vec<Vec<Restored>>,
    pub keys: Vec<Vec<Remembered>>,
    /// The users' durable subscriptions (without `HISTORY_DIR`, which
    /// keeps them).
    pub durable: Vec<DurableRecord>,
    publishes: Vec<Record>,
}

/// In a successor, before it accepts: asks the old process for its state
/// and reads it, within [`STATE_WITHIN`]. `owner` says which of `cores`
/// owns a routing key here; `now` is the engine's clock.
pub fn receive_state(
    link: &mut UnixStream,
    cores: usize,
    owner: impl Fn(&str) -> usize,
    now: u64,
) -> Result<Inherited, LinkError> {
    let mut b = Vec::new();
    put_simple(&mut b, WANT);
    link.write_all(&b)?;
    link.set_read_timeout(Some(STATE_WITHIN))?;
    let clocks = Clocks {
        store_now: now,
        unix_now: crate::clock::unix_ms(),
    };
    let mut got = Inherited {
        streams: (0..cores).map(|_| Vec::new()).collect(),
        keys: (0..cores).map(|_| Vec::new()).collect(),
        durable: Vec::new(),
        publishes: Vec::new(),
    };
    let deadline = std::time::Instant::now() + STATE_WITHIN;
    let mut stream: Option<(Restored, u32)> = None;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(LinkError::Io(io::ErrorKind::TimedOut.into()));
        }
        let record = read_record(link)?;
        // A stream's entries come right behind it.
        if let Some((mut s, left)) = stream.take() {
            match record {
                Record::Entry { unix_ms, frame } => {
                    s.entries.push((clocks.of_unix(unix_ms), frame));
                    match left > 1 {
                        true => stream = Some((s, left - 1)),
                        false => got.streams[owner(&s.key) % cores].push(s),
                    }
                    continue;
                }
                _ => return Err(LinkError::Malformed("a stream's entries")),
            }
        }
        match record {
            Record::Stream {
                key,
                epoch,
                top,
                keep,
                entries,
            } => {
                let s = Restored {
                    key,
                    epoch,
                    top,
                    keep,
                    entries: Vec::with_capacity(entries as usize),
                };
                match entries {
                    0 => got.streams[owner(&s.key) % cores].push(s),
                    n => stream = Some((s, n)),
                }
            }
            Record::Key {
                channel,
                key,
                place,
                until_unix_ms,
            } => {
                let i = owner(&channel) % cores;
                got.keys[i].push(Remembered {
                    channel,
                    key,
                    place,
                    until: clocks.of_unix(until_unix_ms),
                });
            }
            p @ Record::Publish { .. } => got.publishes.push(p),
            Record::Durable(r) => got.durable.push(r),
            Record::End => break,
            _ => return Err(LinkError::Malformed("a record only the new process sends")),
        }
    }
    link.set_read_timeout(None)?;
    let n: usize = got.streams.iter().map(Vec::len).sum();
    tracing::info!(channels = n, "history handed over by the old process");
    Ok(got)
}

/// The new process's end of the link, while the old process drains.
pub struct Successor {
    out: Outbox,
    origin: u64,
    hub: Arc<Hub>,
}

impl Tap for Successor {
    fn sequenced(&self, msg: &Arc<Message>, place: Option<&Place>) {
        if !self.out.send(Out::Sequenced(msg.clone(), place.cloned())) {
            // The old process stopped reading: it loses its link and
            // closes its clients, who come here.
            self.hub.handoff.set_tap(None);
            self.out.cut();
        }
    }
}

impl Successor {
    /// Copies what this process numbers to the old one, and sequences
    /// what it forwards (first what it forwarded while the state was
    /// read), until the old process exits.
    pub fn start(link: UnixStream, hub: Arc<Hub>, inherited: Inherited) -> io::Result<()> {
        let reading = link.try_clone()?;
        let origin = super::cluster::origin_tag();
        let me = Arc::new(Successor {
            out: Outbox::start(link, origin, "herald-handoff-w")?,
            origin,
            hub: hub.clone(),
        });
        hub.handoff.set_tap(Some(me.clone()));
        std::thread::Builder::new()
            .name("herald-handoff-r".into())
            .spawn(move || {
                let mut link = reading;
                for p in inherited.publishes {
                    me.sequence(p);
                }
                let why = loop {
                    match read_record(&mut link) {
                        Ok(p @ Record::Publish { .. }) => me.sequence(p),
                        Ok(_) => break LinkError::Malformed("a record only the new process sends"),
                        Err(e) => break e,
                    }
                };
                hub.handoff.set_tap(None);
                match why {
                    LinkError::Closed => tracing::info!("the old process is gone"),
                    e => tracing::warn!("{e}: the old process's clients are closed to come here"),
                }
                let _ = link.shutdown(std::net::Shutdown::Both);
            })?;
        Ok(())
    }

    /// Hands a forwarded publish to its channel's owner here.
    fn sequence(&self, p: Record) {
        let Record::Publish {
            owner,
            ticket,
            idempotency_key,
            wire,
        } = p
        else {
            return;
        };
        let Ok(msg) = Message::decode_wire(wire, self.origin) else {
            tracing::debug!("dropped a malformed publish from the old process");
            return;
        };
        let done: Option<crate::engine::core::Done> = (ticket != 0).then(|| {
            let tx = self.out.tx.clone();
            Box::new(move |_: &Core, outcome: &Outcome| {
                let mut b = Vec::new();
                put_ack(&mut b, owner, ticket, outcome);
                let _ = tx.send(Out::Bytes(b));
            }) as crate::engine::core::Done
        });
        let dst = self.hub.owner(msg.hash());
        self.hub.bus.send(
            self.hub.outside_source(),
            dst,
            Envelope::SequenceWith(Box::new(Publish {
                msg: Arc::new(msg),
                idempotency_key,
                done,
            })),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut b: &[u8]) -> Vec<Record> {
        let mut out = Vec::new();
        while !b.is_empty() {
            out.push(read_record(&mut b).unwrap());
        }
        out
    }

    fn message() -> Message {
        let frame = Bytes::from_static(b"{\"channel\":\"news\",\"data\":42}");
        Message::new(
            frame,
            crate::engine::message::Encoding(0),
            12..16,
            25..27,
            crate::engine::message::PayloadKind::Json,
            0,
        )
    }

    #[test]
    fn every_record_reads_back_as_written() {
        let epoch: Arc<str> = "e1".into();
        let mut b = Vec::new();
        put_simple(&mut b, WANT);
        let r = Restored {
            key: "news".into(),
            epoch: epoch.clone(),
            top: 7,
            keep: Keep {
                size: 10,
                ttl_ms: 60_000,
            },
            entries: vec![
                (100, Bytes::from_static(b"six")),
                (150, Bytes::from_static(b"seven")),
            ],
        };
        put_stream(&mut b, &r, |t| t + 1000);
        let k = Remembered {
            channel: "news".into(),
            key: "k1".into(),
            place: Some((epoch.clone(), 7)),
            until: 5,
        };
        put_key(&mut b, &k, 9000);
        let m = message();
        put_publish(&mut b, 1, 3, Some("k2"), &m, 77);
        put_sequenced(&mut b, Some(&(epoch.clone(), 8)), &m, 77);
        let outcome = Outcome {
            position: Some((epoch.clone(), 8)),
            duplicate: true,
            unavailable: false,
        };
        put_ack(&mut b, 1, 3, &outcome);
        let durable = DurableRecord {
            namespace: 2,
            user: "u1".into(),
            channel: "news".into(),
            cursor: Cursor {
                epoch: epoch.clone(),
                offset: 6,
            },
        };
        put_durable(&mut b, &durable);
        put_simple(&mut b, END);
        let got = read_all(&b);
        assert_eq!(got.len(), 10);
        assert_eq!(got[0], Record::Want);
        assert_eq!(
            got[1],
            Record::Stream {
                key: "news".into(),
                epoch: epoch.clone(),
                top: 7,
                keep: r.keep,
                entries: 2
            }
        );
        assert_eq!(
            got[3],
            Record::Entry {
                unix_ms: 1150,
                frame: Bytes::from_static(b"seven")
            }
        );
        assert_eq!(
            got[4],
            Record::Key {
                channel: "news".into(),
                key: "k1".into(),
                place: Some((epoch.clone(), 7)),
                until_unix_ms: 9000
            }
        );
        let Record::Publish {
            owner,
            ticket,
            idempotency_key,
            wire,
        } = &got[5]
        else {
            panic!("{:?}", got[5]);
        };
        assert_eq!(
            (*owner, *ticket, idempotency_key.as_deref()),
            (1, 3, Some("k2"))
        );
        let back = Message::decode_wire(wire.clone(), 77).unwrap();
        assert_eq!((back.channel(), back.payload()), ("news", &b"42"[..]));
        let Record::Sequenced { place, .. } = &got[6] else {
            panic!("{:?}", got[6]);
        };
        assert_eq!(place, &Some((epoch.clone(), 8)));
        assert_eq!(
            got[7],
            Record::Ack {
                owner: 1,
                ticket: 3,
                duplicate: true,
                place: Some((epoch, 8))
            }
        );
        assert_eq!(got[8], Record::Durable(durable));
        assert_eq!(got[9], Record::End);
    }

    #[test]
    fn malformed_records_are_refused_not_trusted() {
        // A length past the limit, or of nothing.
        let mut huge = ((MAX_RECORD + 1) as u32).to_le_bytes().to_vec();
        huge.push(WANT);
        assert!(matches!(
            read_record(&mut &huge[..]),
            Err(LinkError::Malformed("length"))
        ));
        assert!(matches!(
            read_record(&mut &[0u8, 0, 0, 0, 1][..]),
            Err(LinkError::Malformed("length"))
        ));
        // Truncated: the link ended inside a record.
        let mut b = Vec::new();
        put_key(
            &mut b,
            &Remembered {
                channel: "c".into(),
                key: "k".into(),
                place: None,
                until: 0,
            },
            1,
        );
        assert!(matches!(
            read_record(&mut &b[..b.len() - 1]),
            Err(LinkError::Closed)
        ));
        // A field cut short inside a complete record.
        let mut cut = b.clone();
        cut.truncate(b.len() - 3);
        let len = (cut.len() - 4) as u32;
        cut[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            read_record(&mut &cut[..]),
            Err(LinkError::Malformed("truncated"))
        ));
        // An unknown type, trailing bytes, a stream claiming more entries
        // than it can hold.
        assert!(read_record(&mut &[1u8, 0, 0, 0, 99][..]).is_err());
        assert!(matches!(
            read_record(&mut &[2u8, 0, 0, 0, WANT, 0][..]),
            Err(LinkError::Malformed("trailing bytes"))
        ));
        let mut s = Vec::new();
        let r = Restored {
            key: "k".into(),
            epoch: "e".into(),
            top: 1,
            keep: Keep { size: 5, ttl_ms: 1 },
            entries: vec![(0, Bytes::new()), (0, Bytes::new())],
        };
        put_stream(&mut s, &r, |t| t);
        assert!(matches!(
            read_record(&mut &s[..]),
            Err(LinkError::Malformed("stream"))
        ));
    }

    #[test]
    fn times_cross_clocks_by_their_distance_from_now() {
        let old = Clocks {
            store_now: 5_000,
            unix_now: 1_000_000,
        };
        let new = Clocks {
            store_now: 200,
            unix_now: 1_000_010,
        };
        // Published 1 s before the old process's now: 1.01 s before the
        // new one's.
        let unix = old.to_unix(4_000);
        assert_eq!(unix, 999_000);
        assert_eq!(new.of_unix(unix), 0, "saturates at the clock's start");
        assert_eq!(new.of_unix(1_000_005), 195);
        // A key remembered for 5 s more stays remembered 5 s more.
        assert_eq!(new.of_unix(old.to_unix(10_000)), 5_190);
    }
}
