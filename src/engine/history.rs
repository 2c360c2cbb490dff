//! Channel history: which channels keep it ([`Rules`], from `HISTORY`),
//! and each owner core's [`Store`] of the recent frames of the channels it
//! sequences, with their epochs and offsets (protocol.md 1.1, "Channel
//! order and offsets", "History").
//!
//! A channel's messages are numbered by the one core that owns it (see
//! [`super::core::Core::publish`]), so a store is touched by one thread
//! only: no locks. What is kept is the frame subscribers were sent, as
//! built once for the publish: a replay is the same zero-copy write as a
//! live delivery. An entry is the frame's handle and its time, 40 bytes
//! beside the frame; offsets are implied by position.
//!
//! Size and age are both enforced without a timer per message: appends
//! drop what falls out of the size, reads skip what is too old, and the
//! core's once-a-second sweep ([`Store::prune`]) visits only the channels
//! whose oldest entry is due, in deadline order.
//!
//! Idempotency keys ([`Idempotency`]) live beside the store on the same
//! owner core: a repeated publish is answered as the first was.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// How long a channel's epoch and top offset are kept after its last
/// message left its history, so that a client that saw everything can
/// still resume (`recovered:true`, nothing to replay) instead of being
/// told its epoch is gone.
pub const META_TTL_MS: u64 = 24 * 3600 * 1000;

/// Which channels keep how much history.
#[derive(Debug, Clone, Default)]
pub struct Rules(Vec<Rule>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    pattern: Pattern,
    keep: Keep,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    All,
    Prefix(Box<str>),
    Exact(Box<str>),
}

/// How much of a channel's history is kept: the last `size` messages, none
/// older than `ttl_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub size: usize,
    pub ttl_ms: u64,
}

impl Keep {
    /// At least `least`: the larger size and the longer time to live.
    pub fn at_least(self, least: Keep) -> Keep {
        Keep {
            size: self.size.max(least.size),
            ttl_ms: self.ttl_ms.max(least.ttl_ms),
        }
    }

    /// The more of the two (either may be none).
    pub fn widest(a: Option<Keep>, b: Option<Keep>) -> Option<Keep> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.at_least(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Why a `HISTORY` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RulesError {
    #[error("`{0}`: expected pattern=size/ttl, e.g. chat:*=100/5m")]
    Shape(String),
    #[error("`{0}`: the size must be a whole number from 1 to 1000000")]
    Size(String),
    #[error("`{0}`: the time to live must be a duration from 1s to 365d, e.g. 30s, 5m, 1h")]
    Ttl(String),
    #[error("`{0}`: a pattern is a channel name, a prefix ending in `*`, or `*`")]
    Pattern(String),
}

impl Rules {
    /// Parses `pattern=size/ttl[,pattern=size/ttl...]`; empty: none.
    pub fn parse(s: &str) -> Result<Rules, RulesError> {
        let mut rules = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (pattern, keep) = item
                .rsplit_once('=')
                .ok_or_else(|| RulesError::Shape(item.into()))?;
            let (size, ttl) = keep
                .split_once('/')
                .ok_or_else(|| RulesError::Shape(item.into()))?;
            let size: usize = size
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=1_000_000).contains(n))
                .ok_or_else(|| RulesError::Size(item.into()))?;
            let ttl: Duration = humantime::parse_duration(ttl.trim())
                .ok()
                .filter(|d| *d >= Duration::from_secs(1) && *d <= Duration::from_secs(365 * 86400))
                .ok_or_else(|| RulesError::Ttl(item.into()))?;
            let pattern = pattern.trim();
            let pattern = match pattern {
                "*" => Pattern::All,
                p if p.is_empty() || p[..p.len() - 1].contains('*') => {
                    return Err(RulesError::Pattern(item.into()))
                }
                p => match p.strip_suffix('*') {
                    Some(prefix) => Pattern::Prefix(prefix.into()),
                    None => Pattern::Exact(p.into()),
                },
            };
            rules.push(Rule {
                pattern,
                keep: Keep {
                    size,
                    ttl_ms: ttl.as_millis() as u64,
                },
            });
        }
        Ok(Rules(rules))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What `channel` keeps: the first matching rule's, if any.
    pub fn keep(&self, channel: &str) -> Option<Keep> {
        self.0
            .iter()
            .find(|r| match &r.pattern {
                Pattern::All => true,
                Pattern::Prefix(p) => channel.starts_with(&**p),
                Pattern::Exact(c) => **c == *channel,
            })
            .map(|r| r.keep)
    }
}

/// A new epoch: 16 random hex digits.
pub fn new_epoch() -> Arc<str> {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No randomness from the OS (never on Linux): still different
        // from the last run's epochs, which is what matters.
        let t = fallback_seed();
        b = t.to_le_bytes();
    }
    let mut s = String::with_capacity(16);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s.into()
}

fn fallback_seed() -> u64 {
    ahash::RandomState::new().hash_one(std::process::id())
}

/// Where a reader wants to start: after `offset` of `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub epoch: Box<str>,
    pub offset: u64,
}

/// A page of a channel's history: its epoch and newest offset, and some
/// of its frames with their offsets, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub epoch: Arc<str>,
    pub top: u64,
    pub messages: Vec<(u64, Bytes)>,
}

/// What a history read found.
#[derive(Debug)]
pub enum HistoryRead {
    Page(Page),
    /// The channel keeps no history.
    NotKept,
    /// The history is in the cluster's broker, which cannot be reached.
    Unavailable,
}

/// One channel's history on its owner core.
#[derive(Debug)]
pub struct Stream {
    pub epoch: Arc<str>,
    /// The offset of the newest message (0: none yet in this epoch).
    pub top: u64,
    keep: Keep,
    /// Frames of offsets `top - entries.len() + 1 ..= top`, oldest first.
    entries: VecDeque<(u64, Bytes)>,
    /// When the last message was appended (the store's clock).
    last_ms: u64,
    /// A prune of this stream is queued for this time.
    due: Option<u64>,
}

impl Stream {
    fn new(keep: Keep, now: u64) -> Stream {
        Stream {
            epoch: new_epoch(),
            top: 0,
            keep,
            entries: VecDeque::new(),
            last_ms: now,
            due: None,
        }
    }

    /// The offset of the oldest kept message (top + 1 when none).
    pub fn first(&self) -> u64 {
        self.top + 1 - self.entries.len() as u64
    }

    /// Drops entries older than the TTL; returns how many and their bytes.
    fn drop_expired(&mut self, now: u64) -> (usize, usize) {
        let mut dropped = (0, 0);
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| at.saturating_add(self.keep.ttl_ms) <= now)
        {
            if let Some((_, f)) = self.entries.pop_front() {
                dropped.0 += 1;
                dropped.1 += f.len();
            }
        }
        if self.entries.is_empty() && self.entries.capacity() > 0 {
            self.entries = VecDeque::new();
        }
        dropped
    }

    /// The frames after `after`, oldest first, at most `limit`, or `None`
    /// when some of them are no longer kept.
    pub fn after(&self, after: u64, limit: usize) -> Option<Vec<(u64, Bytes)>> {
        if after > self.top {
            return None;
        }
        if after + 1 < self.first() {
            return None;
        }
        let skip = (after + 1 - self.first()) as usize;
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(limit)
                .enumerate()
                .map(|(i, (_, f))| (after + 1 + i as u64, f.clone()))
                .collect(),
        )
    }

    /// The newest `limit` frames, oldest first.
    pub fn newest(&self, limit: usize) -> Vec<(u64, Bytes)> {
        let n = self.entries.len().min(limit);
        let start = self.top + 1 - n as u64;
        self.entries
            .iter()
            .skip(self.entries.len() - n)
            .enumerate()
            .map(|(i, (_, f))| (start + i as u64, f.clone()))
            .collect()
    }

    /// What a history read returns (protocol.md 1.1, "Reading history"):
    /// the messages after `since` (from the start of the current epoch
    /// when `since` names another, from the oldest kept when some are
    /// gone), else the newest; at most `limit`, oldest first.
    pub fn page(&self, since: Option<&Since>, limit: usize) -> Page {
        let messages = match since {
            None => self.newest(limit),
            Some(s) => {
                let after = if *s.epoch == *self.epoch {
                    s.offset.max(self.first() - 1)
                } else {
                    self.first() - 1
                };
                self.after(after, limit).unwrap_or_default()
            }
        };
        Page {
            epoch: self.epoch.clone(),
            top: self.top,
            messages,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The histories of the channels one core owns.
#[derive(Debug, Default)]
pub struct Store {
    streams: HashMap<Box<str>, Stream, ahash::RandomState>,
    /// (when, channel): streams to prune then, checked lazily.
    due: BinaryHeap<Reverse<(u64, Box<str>)>>,
    /// Frames kept, and their bytes.
    pub frames: usize,
    pub bytes: usize,
}

impl Store {
    /// The stream of `key`, created (with a new epoch) if needed; old
    /// entries are dropped first, so what it holds is current.
    pub fn stream(&mut self, key: &str, keep: Keep, now: u64) -> &mut Stream {
        if !self.streams.contains_key(key) {
            self.streams.insert(key.into(), Stream::new(keep, now));
        }
        let s = self.streams.get_mut(key).expect("just inserted");
        let (n, b) = s.drop_expired(now);
        self.frames -= n;
        self.bytes -= b;
        s.keep = keep;
        s
    }

    /// Puts back a channel's history read at start.
    pub fn restore(&mut self, r: Restored, now: u64) {
        let len = r.entries.len();
        let bytes: usize = r.entries.iter().map(|e| e.1.len()).sum();
        let oldest = r.entries.first().map(|e| e.0);
        let stream = Stream {
            epoch: r.epoch,
            top: r.top,
            keep: r.keep,
            entries: r.entries.into(),
            last_ms: now,
            due: None,
        };
        if let Some(old) = self.streams.insert(r.key.clone(), stream) {
            self.frames -= old.entries.len();
            self.bytes -= old.entries.iter().map(|e| e.1.len()).sum::<usize>();
        }
        self.frames += len;
        self.bytes += bytes;
        let at = match oldest {
            Some(at) => at.saturating_add(r.keep.ttl_ms),
            None => now.saturating_add(META_TTL_MS),
        };
        if let Some(s) = self.streams.get_mut(&r.key) {
            s.due = Some(at);
        }
        self.due.push(Reverse((at, r.key)));
    }

    /// Starts `key`'s history again under a new epoch (what was kept is
    /// no longer an unbroken run).
    pub fn restart(&mut self, key: &str, keep: Keep, now: u64) {
        if let Some(old) = self.streams.remove(key) {
            self.frames -= old.entries.len();
            self.bytes -= old.entries.iter().map(|e| e.1.len()).sum::<usize>();
        }
        self.streams.insert(key.into(), Stream::new(keep, now));
    }

    /// A stream if the channel has one (no epoch is created).
    pub fn get(&mut self, key: &str, now: u64) -> Option<&Stream> {
        let s = self.streams.get_mut(key)?;
        let (n, b) = s.drop_expired(now);
        self.frames -= n;
        self.bytes -= b;
        Some(s)
    }

    /// Appends the next message's frame to `key`'s stream; returns its
    /// offset and the stream's epoch.
    pub fn append(&mut self, key: &str, keep: Keep, frame: Bytes, now: u64) -> (Arc<str>, u64) {
        let (epoch, offset, _) = self.append_with(key, keep, now, |_| frame);
        (epoch, offset)
    }

    /// [`Store::append`] of the frame `build` makes for the next offset
    /// (one lookup of the stream); returns the frame too.
    pub fn append_with(
        &mut self,
        key: &str,
        keep: Keep,
        now: u64,
        build: impl FnOnce(u64) -> Bytes,
    ) -> (Arc<str>, u64, Bytes) {
        let s = self.stream(key, keep, now);
        s.top += 1;
        let frame = build(s.top);
        let len = frame.len();
        s.last_ms = now;
        s.entries.push_back((now, frame.clone()));
        let mut dropped = (0, 0);
        while s.entries.len() > s.keep.size {
            if let Some((_, f)) = s.entries.pop_front() {
                dropped.0 += 1;
                dropped.1 += f.len();
            }
        }
        let out = (s.epoch.clone(), s.top, frame);
        let schedule = s.due.is_none().then(|| {
            let at = now.saturating_add(s.keep.ttl_ms);
            s.due = Some(at);
            at
        });
        self.frames = self.frames + 1 - dropped.0;
        self.bytes = self.bytes + len - dropped.1;
        if let Some(at) = schedule {
            self.due.push(Reverse((at, key.into())));
        }
        out
    }

    /// Appends a message another process numbered (a restart's successor,
    /// see `integrations::handoff`): message `offset` of `epoch`. When it
    /// does not follow the stream's top in the same epoch, the stream
    /// starts again there (what was kept is no longer an unbroken run).
    pub fn put(
        &mut self,
        key: &str,
        keep: Keep,
        (epoch, offset): (&Arc<str>, u64),
        frame: Bytes,
        now: u64,
    ) {
        let s = self.stream(key, keep, now);
        if s.epoch != *epoch || offset != s.top + 1 {
            let dropped = std::mem::take(&mut s.entries);
            s.epoch = epoch.clone();
            s.top = offset.saturating_sub(1);
            self.frames -= dropped.len();
            self.bytes -= dropped.iter().map(|e| e.1.len()).sum::<usize>();
        }
        self.append_with(key, keep, now, |_| frame);
    }

    /// Every stream as it is now (kept frames and remembered epochs), for
    /// a restart's successor; times stay on this store's clock.
    pub fn export(&mut self, now: u64) -> Vec<Restored> {
        let mut out = Vec::with_capacity(self.streams.len());
        for (key, s) in self.streams.iter_mut() {
            let (n, b) = s.drop_expired(now);
            self.frames -= n;
            self.bytes -= b;
            out.push(Restored {
                key: key.clone(),
                epoch: s.epoch.clone(),
                top: s.top,
                keep: s.keep,
                entries: s.entries.iter().cloned().collect(),
            });
        }
        out
    }

    /// Drops what has expired by `now` from the streams that are due, and
    /// forgets streams empty for [`META_TTL_MS`]. Returns how many frames
    /// were dropped.
    pub fn prune(&mut self, now: u64) -> usize {
        let mut dropped = 0;
        while let Some(Reverse((at, _))) = self.due.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, key))) = self.due.pop() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&key) else {
                continue;
            };
            let (n, b) = s.drop_expired(now);
            dropped += n;
            self.frames -= n;
            self.bytes -= b;
            let next = match s.entries.front() {
                Some((at, _)) => Some(at.saturating_add(s.keep.ttl_ms)),
                None if s.last_ms.saturating_add(META_TTL_MS) <= now => {
                    self.streams.remove(&key);
                    continue;
                }
                None => Some(s.last_ms.saturating_add(META_TTL_MS)),
            };
            s.due = next;
            if let Some(at) = next {
                self.due.push(Reverse((at, key)));
            }
        }
        dropped
    }

    /// Channels with a stream (kept messages or a remembered epoch).
    pub fn channels(&self) -> usize {
        self.streams.len()
    }
}

/// Where kept history goes besides memory (`HISTORY_DIR`): told of every
/// message a channel keeps, by the channel's owner core, which must never
/// wait on it.
pub trait HistorySink: Send + Sync {
    /// `frame` is message `offset` of `key`'s epoch `epoch`, sent now; the
    /// channel keeps `keep`.
    fn append(&self, key: &str, epoch: &Arc<str>, offset: u64, keep: Keep, frame: &Bytes);
    /// Could `key`'s stored history not be written? Its epoch must then
    /// change (what is on disk is no longer the unbroken history).
    fn lost(&self, key: &str) -> bool;
}

/// A channel's history read back at start, for its owner core's store.
#[derive(Debug)]
pub struct Restored {
    pub key: Box<str>,
    pub epoch: Arc<str>,
    pub top: u64,
    pub keep: Keep,
    /// (time on the store's clock, frame) of offsets `top - len + 1 ..= top`.
    pub entries: Vec<(u64, Bytes)>,
}

/// An idempotency key handed over by a restart's old process: the
/// routing key it was seen on, its first outcome, and until when it is
/// remembered (on the receiving store's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub channel: Box<str>,
    pub key: Box<str>,
    pub place: Option<Place>,
    pub until: u64,
}

/// A message's place: its channel's epoch and its offset.
pub type Place = (Arc<str>, u64);

/// What a publish was given: its channel's epoch and its offset (both
/// absent on a channel without history).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub position: Option<Place>,
    /// A repeat of an idempotency key seen within the window: not
    /// delivered again; `position` is the first publish's.
    pub duplicate: bool,
    /// The cluster could not take the publish (its broker is unreachable):
    /// it reached no one, or, when the broker stopped answering midway,
    /// possibly some nodes.
    pub unavailable: bool,
}

impl Outcome {
    /// A publish that reached no one: the node cannot take it now.
    pub fn unavailable() -> Outcome {
        Outcome {
            unavailable: true,
            ..Outcome::default()
        }
    }
}

/// Most idempotency keys one core remembers; past it the oldest are
/// forgotten early (a publisher retrying after that long has other
/// problems), so a flood of keys cannot take memory without bound.
pub const MAX_IDEMPOTENCY_KEYS: usize = 200_000;

/// Recent idempotency keys of the channels one core owns.
#[derive(Debug, Default)]
pub struct Idempotency {
    seen: HashMap<(Box<str>, Box<str>), Option<Place>, ahash::RandomState>,
    /// Insertion order = expiry order (one window for all).
    order: VecDeque<(u64, Box<str>, Box<str>)>,
}

impl Idempotency {
    /// The first outcome of (`channel`, `key`) if seen within the window.
    pub fn check(&mut self, channel: &str, key: &str, now: u64) -> Option<Option<Place>> {
        self.expire(now);
        self.seen.get(&(channel.into(), key.into())).cloned()
    }

    /// Remembers (`channel`, `key`) until `until`.
    pub fn remember(&mut self, channel: &str, key: &str, pos: Option<Place>, until: u64) {
        if self.seen.len() >= MAX_IDEMPOTENCY_KEYS {
            if let Some((_, c, k)) = self.order.pop_front() {
                self.seen.remove(&(c, k));
            }
        }
        self.seen.insert((channel.into(), key.into()), pos);
        self.order.push_back((until, channel.into(), key.into()));
    }

    fn expire(&mut self, now: u64) {
        while self
            .order
            .front()
            .is_some_and(|(until, _, _)| *until <= now)
        {
            if let Some((_, c, k)) = self.order.pop_front() {
                self.seen.remove(&(c, k));
            }
        }
    }

    /// Every key remembered now, oldest first, for a restart's successor.
    pub fn export(&mut self, now: u64) -> Vec<Remembered> {
        self.expire(now);
        self.order
            .iter()
            .filter_map(|(until, c, k)| {
                let place = self.seen.get(&(c.clone(), k.clone()))?.clone();
                Some(Remembered {
                    channel: c.clone(),
                    key: k.clone(),
                    place,
                    until: *until,
                })
            })
            .collect()
    }

    /// Puts back a key an earlier process remembered.
    pub fn restore(&mut self, r: Remembered) {
        self.remember(&r.channel, &r.key, r.place, r.until);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(size: usize, ttl_ms: u64) -> Keep {
        Keep { size, ttl_ms }
    }

    #[test]
    fn rules_parse_and_first_match_wins() {
        let r = Rules::parse("chat:*=100/5m, news=1000/1h,*=5/10s").unwrap();
        assert_eq!(r.keep("chat:a"), Some(keep(100, 300_000)));
        assert_eq!(r.keep("news"), Some(keep(1000, 3_600_000)));
        assert_eq!(r.keep("newsroom"), Some(keep(5, 10_000)));
        assert!(Rules::parse("").unwrap().is_empty());
        assert_eq!(Rules::parse("news=10/1h").unwrap().keep("other"), None);
        for bad in [
            "news",
            "news=10",
            "news=0/1h",
            "news=x/1h",
            "news=10/0s",
            "news=10/forever",
            "a*b=1/1s",
            "=1/1s",
        ] {
            assert!(Rules::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn offsets_are_gapless_and_size_is_kept() {
        let mut s = Store::default();
        let k = keep(3, 60_000);
        let mut epoch = None;
        for i in 1..=5u64 {
            let (e, off) = s.append("c", k, Bytes::from(vec![i as u8; 10]), 1000 + i);
            assert_eq!(off, i);
            epoch.get_or_insert(e.clone());
            assert_eq!(Some(&e), epoch.as_ref(), "one epoch");
        }
        assert_eq!((s.frames, s.bytes), (3, 30));
        let st = s.get("c", 1010).unwrap();
        assert_eq!((st.first(), st.top), (3, 5));
        let after = st.after(3, 10).unwrap();
        assert_eq!(after.iter().map(|e| e.0).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(after[0].1[0], 4);
        assert!(st.after(1, 10).is_none(), "offset 2 is gone");
        assert_eq!(st.after(5, 10).unwrap().len(), 0, "up to date");
        assert!(st.after(6, 10).is_none(), "from the future");
        assert_eq!(st.after(2, 1).unwrap().len(), 1, "limited");
        assert_eq!(
            st.newest(2).iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![4, 5]
        );
    }

    #[test]
    fn ttl_drops_old_frames_without_a_timer_each_and_keeps_the_epoch() {
        let mut s = Store::default();
        let k = keep(100, 1000);
        let (e1, _) = s.append("c", k, Bytes::from_static(b"a"), 0);
        s.append("c", k, Bytes::from_static(b"b"), 500);
        assert_eq!(s.prune(999), 0);
        assert_eq!(s.prune(1000), 1, "the first expired");
        assert_eq!(s.frames, 1);
        assert_eq!(s.prune(1500), 1);
        assert_eq!((s.frames, s.bytes), (0, 0));
        let st = s.get("c", 1500).unwrap();
        assert_eq!((st.top, st.len()), (2, 0));
        assert_eq!(st.epoch, e1, "meta kept");
        assert!(
            st.after(2, 10).unwrap().is_empty(),
            "a reader at the top recovers"
        );
        assert!(st.after(1, 10).is_none());
        s.prune(500 + META_TTL_MS);
        assert_eq!(s.channels(), 0, "forgotten after the meta TTL");
        let (e2, off) = s.append("c", k, Bytes::from_static(b"c"), 600 + META_TTL_MS);
        assert_eq!(off, 1);
        assert_ne!(e2, e1, "a new epoch");
    }

    #[test]
    fn restored_history_continues_and_a_restart_changes_the_epoch() {
        let mut s = Store::default();
        let k = keep(10, 1000);
        s.restore(
            Restored {
                key: "c".into(),
                epoch: "e1".into(),
                top: 7,
                keep: k,
                entries: vec![
                    (100, Bytes::from_static(b"6")),
                    (200, Bytes::from_static(b"7")),
                ],
            },
            300,
        );
        assert_eq!((s.frames, s.bytes), (2, 2));
        let (e, off) = s.append("c", k, Bytes::from_static(b"8"), 400);
        assert_eq!((&*e, off), ("e1", 8), "offsets continue in the same epoch");
        assert_eq!(s.get("c", 400).unwrap().after(5, 10).unwrap().len(), 3);
        assert_eq!(
            s.prune(1100),
            1,
            "restored entries expire on their own times"
        );
        s.restart("c", k, 1200);
        let (e, off) = s.append("c", k, Bytes::from_static(b"x"), 1200);
        assert_ne!(&*e, "e1");
        assert_eq!(off, 1);
        assert_eq!(s.frames, 1);
    }

    #[test]
    fn idempotency_keys_expire_and_are_bounded() {
        let mut i = Idempotency::default();
        assert_eq!(i.check("c", "k", 0), None);
        i.remember("c", "k", Some(("e".into(), 7)), 100);
        assert_eq!(i.check("c", "k", 99), Some(Some(("e".into(), 7))));
        assert_eq!(i.check("d", "k", 99), None, "per channel");
        assert_eq!(i.check("c", "k", 100), None, "expired");
        for n in 0..MAX_IDEMPOTENCY_KEYS + 10 {
            i.remember("c", &n.to_string(), None, 1000);
        }
        assert_eq!(i.len(), MAX_IDEMPOTENCY_KEYS);
        assert_eq!(i.check("c", "0", 1), None, "oldest forgotten first");
        assert_eq!(
            i.check("c", &(MAX_IDEMPOTENCY_KEYS + 9).to_string(), 1),
            Some(None)
        );
    }

    #[test]
    fn a_replica_follows_the_numbers_it_is_given() {
        let k = keep(3, 1000);
        let mut s = Store::default();
        let (epoch, _) = s.append("c", k, Bytes::from_static(b"1"), 0);
        // What another process numbered, in the same epoch.
        for n in 2..=4u64 {
            s.put("c", k, (&epoch, n), Bytes::from(n.to_string()), 10);
        }
        let st = s.get("c", 10).unwrap();
        assert_eq!((st.top, st.first()), (4, 2), "size still enforced");
        assert_eq!(s.frames, 3);
        // A gap, or another epoch: the run starts again there.
        s.put("c", k, (&epoch, 9), Bytes::from_static(b"9"), 20);
        let st = s.get("c", 20).unwrap();
        assert_eq!((st.top, st.len()), (9, 1));
        let other: Arc<str> = "other".into();
        s.put("c", k, (&other, 1), Bytes::from_static(b"a"), 30);
        let st = s.get("c", 30).unwrap();
        assert_eq!((&*st.epoch, st.top, st.len()), ("other", 1, 1));
        assert_eq!((s.frames, s.bytes), (1, 1));
    }

    #[test]
    fn what_a_store_exports_restores_as_it_was() {
        let k = keep(10, 1000);
        let mut s = Store::default();
        s.append("a", k, Bytes::from_static(b"x"), 0);
        s.append("a", k, Bytes::from_static(b"y"), 500);
        s.append("b", k, Bytes::from_static(b"z"), 0);
        // At 1200, a's first and b's only message expired; b's epoch is
        // still exported (a client that saw everything can resume).
        let out = s.export(1200);
        assert_eq!(out.len(), 2);
        let mut back = Store::default();
        for r in out {
            back.restore(r, 1200);
        }
        let a = back.get("a", 1200).unwrap();
        assert_eq!((a.top, a.first()), (2, 2));
        assert_eq!(a.after(1, 10).unwrap()[0].1, Bytes::from_static(b"y"));
        let b = back.get("b", 1200).unwrap();
        assert_eq!((b.top, b.len()), (1, 0));
        assert_eq!(back.frames, 1);

        let mut i = Idempotency::default();
        i.remember("a", "k1", Some(("e".into(), 1)), 100);
        i.remember("a", "k2", None, 5000);
        let keys = i.export(200);
        assert_eq!(keys.len(), 1, "expired keys are not handed over");
        let mut j = Idempotency::default();
        for k in keys {
            j.restore(k);
        }
        assert_eq!(j.check("a", "k2", 4999), Some(None));
        assert_eq!(j.check("a", "k2", 5000), None);
    }
}
