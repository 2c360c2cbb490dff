//! History on disk (`HISTORY_DIR`): every message a channel keeps is also
//! written to a redb database (`history.redb` in that directory), so that
//! a restart continues each channel's epoch and offsets.
//!
//! The owner cores never wait on the disk: they hand each kept message to
//! a bounded queue ([`HistoryDisk::append`]); one storage thread takes
//! what gathered and commits it in one transaction (a group commit, at
//! most every [`GROUP_COMMIT`]), pruning what falls out of each channel's
//! size. A message that cannot be queued or written (the queue is full,
//! the disk is full) is counted and logged once, and its channel starts a
//! new epoch on its next message ([`HistorySink::lost`]): clients are told
//! `recovered:false` rather than given a gap.
//!
//! At start ([`HistoryDisk::open`]) the database is read back. After a
//! clean stop (the storage thread flushed everything and marked the file
//! clean) each channel continues its epoch; after a crash (`kill -9`,
//! power loss) the last group commit's messages may be missing while
//! clients saw them, so every channel goes on with what reached the disk
//! under a new epoch, numbered again from 1.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use redb::{Database, ReadableTable, TableDefinition};

use prometheus_client::metrics::counter::Counter;

use super::metrics::Metrics;
use crate::engine::history::{new_epoch, HistorySink, Keep, Restored, Rules, META_TTL_MS};
use crate::engine::personal::{Cursor, Durable, Record};

/// The longest a kept message waits before it is committed.
pub const GROUP_COMMIT: Duration = Duration::from_millis(20);

/// How often the users' durable subscriptions and cursors are saved
/// when they changed (a crash loses at most this much of the cursors'
/// progress: those messages are delivered again).
pub const SAVE_PERSONAL: Duration = Duration::from_secs(1);

/// How often the storage thread drops what expired from the disk.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Messages waiting for the storage thread before new ones are dropped
/// (and their channels start new epochs).
const QUEUE: usize = 65_536;

/// channel -> (epoch, top offset).
const CHANNELS: TableDefinition<&str, (&str, u64)> = TableDefinition::new("channels");
/// (channel, offset) -> (Unix ms, frame).
const MESSAGES: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("messages");
/// (namespace, user) -> its durable subscriptions, as JSON:
/// `[[channel, epoch, offset], ...]` (personal channels).
const PERSONAL: TableDefinition<(u16, &str), &str> = TableDefinition::new("personal");
/// "clean" -> 1 when the last run stopped cleanly.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Rebuilds a stored frame of channel `.0` with another offset (the
/// front-end that built it knows its layout); `None`: the frame is dropped.
pub type Reoffset = fn(&str, &[u8], u64) -> Option<Bytes>;

/// Why `HISTORY_DIR` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("HISTORY_DIR {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("HISTORY_DIR {0}: {1}")]
    Db(PathBuf, String),
    /// Another process has the file open (a restart's old process).
    #[error("HISTORY_DIR {0}: the history file is open in another process")]
    Locked(PathBuf),
}

struct Append {
    key: Box<str>,
    epoch: Arc<str>,
    offset: u64,
    unix_ms: u64,
    keep: Keep,
    frame: Bytes,
}

enum Op {
    Append(Append),
    /// Flush everything, mark the file clean, stop.
    Stop(Sender<()>),
}

/// What the cores share with the storage thread.
struct Shared {
    /// Channels whose history could not be written.
    lost: Mutex<HashSet<Box<str>>>,
    any_lost: AtomicBool,
    /// Messages that could not be stored (queue full, write failed).
    dropped: Counter,
    /// Messages committed.
    written: Counter,
    warned: AtomicBool,
}

impl Shared {
    fn lose(&self, key: &str, why: &str) {
        self.dropped.inc();
        if let Ok(mut l) = self.lost.lock() {
            l.insert(key.into());
        }
        self.any_lost.store(true, Ordering::Release);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "history could not be written to HISTORY_DIR ({why}); live delivery goes on, \
                 the affected channels start new epochs (logged once)"
            );
        }
    }
}

/// The storage side of `HISTORY_DIR`.
pub struct HistoryDisk {
    tx: Sender<Op>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl HistorySink for HistoryDisk {
    fn append(&self, key: &str, epoch: &Arc<str>, offset: u64, keep: Keep, frame: &Bytes) {
        let op = Op::Append(Append {
            key: key.into(),
            epoch: epoch.clone(),
            offset,
            unix_ms: crate::clock::unix_ms(),
            keep,
            frame: frame.clone(),
        });
        match self.tx.try_send(op) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.shared.lose(key, "the storage queue is full"),
            Err(TrySendError::Disconnected(_)) => {
                self.shared.lose(key, "the storage thread stopped")
            }
        }
    }

    fn lost(&self, key: &str) -> bool {
        if !self.shared.any_lost.load(Ordering::Acquire) {
            return false;
        }
        let Ok(mut l) = self.shared.lost.lock() else {
            return false;
        };
        let was = l.remove(key);
        if l.is_empty() {
            self.shared.any_lost.store(false, Ordering::Release);
        }
        was
    }
}

fn db_err(dir: &Path, e: impl std::fmt::Display) -> DiskError {
    DiskError::Db(dir.to_path_buf(), e.to_string())
}

impl HistoryDisk {
    /// Opens (or creates) the database in `dir`, reads back what the
    /// channels `rules` still cover, and starts the storage thread.
    /// `now_ms` is the engine's clock; `owner` says which of `cores` owns
    /// a routing key. Returns the history by owner core.
    pub fn open(
        dir: &Path,
        keeping: &Keeping,
        now_ms: u64,
        cores: usize,
        owner: impl Fn(&str) -> usize,
        reoffset: Reoffset,
        metrics: &Metrics,
    ) -> Result<(Arc<HistoryDisk>, Vec<Vec<Restored>>), DiskError> {
        std::fs::create_dir_all(dir).map_err(|e| DiskError::Dir(dir.to_path_buf(), e))?;
        let db = match Database::create(dir.join("history.redb")) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(DiskError::Locked(dir.to_path_buf()))
            }
            Err(e) => return Err(db_err(dir, e)),
        };
        let unix_now = crate::clock::unix_ms();
        let mut restored: Vec<Vec<Restored>> = (0..cores).map(|_| Vec::new()).collect();
        // Read back, and mark the file as in use (not clean) before the
        // first new message can be written.
        let txn = db.begin_write().map_err(|e| db_err(dir, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| db_err(dir, e))?;
            let clean = meta
                .get("clean")
                .map_err(|e| db_err(dir, e))?
                .is_some_and(|v| v.value() == 1);
            // The users' durable subscriptions first: their channels keep
            // history too.
            let personal = txn.open_table(PERSONAL).map_err(|e| db_err(dir, e))?;
            let records = read_personal(&personal).map_err(|e| db_err(dir, e))?;
            drop(personal);
            let subscriptions = records.len();
            let refused = keeping.durable.restore(records);
            if refused > 0 {
                tracing::warn!(
                    refused,
                    "HISTORY_DIR: durable subscriptions over PERSONAL_MAX_CHANNELS were left out"
                );
            }
            tracing::info!(
                subscriptions,
                "durable subscriptions read back from HISTORY_DIR"
            );
            let mut channels = txn.open_table(CHANNELS).map_err(|e| db_err(dir, e))?;
            let mut messages = txn.open_table(MESSAGES).map_err(|e| db_err(dir, e))?;
            let mut known: Vec<(String, String, u64)> = Vec::new();
            for row in channels.iter().map_err(|e| db_err(dir, e))? {
                let (k, v) = row.map_err(|e| db_err(dir, e))?;
                let (epoch, top) = v.value();
                known.push((k.value().to_string(), epoch.to_string(), top));
            }
            let mut kept = 0usize;
            for (key, epoch, top) in known {
                // Herald's own channels, and the front-ends' that users
                // follow durably.
                let keep = match keeping.keep_of(&key) {
                    Some(k) => k,
                    None => {
                        // No longer kept: forget it.
                        channels.remove(key.as_str()).map_err(|e| db_err(dir, e))?;
                        messages
                            .retain_in((key.as_str(), 0)..=(key.as_str(), u64::MAX), |_, _| false)
                            .map_err(|e| db_err(dir, e))?;
                        continue;
                    }
                };
                let first = top.saturating_sub(keep.size as u64) + 1;
                let oldest_unix = unix_now.saturating_sub(keep.ttl_ms);
                let mut entries = Vec::new();
                let range = messages
                    .range((key.as_str(), first)..=(key.as_str(), top))
                    .map_err(|e| db_err(dir, e))?;
                for row in range {
                    let (k, v) = row.map_err(|e| db_err(dir, e))?;
                    let (unix_ms, frame) = v.value();
                    let offset = k.value().1;
                    // Entries must be contiguous up to the top: restart the
                    // run at any hole.
                    if entries.len() as u64 != offset - first {
                        entries.clear();
                    }
                    let at = now_ms.saturating_sub(unix_now.saturating_sub(unix_ms));
                    entries.push((offset, unix_ms, at, Bytes::copy_from_slice(frame)));
                }
                // Contiguous to the top, and not expired.
                let contiguous = entries
                    .iter()
                    .rev()
                    .enumerate()
                    .take_while(|(i, e)| e.0 == top - *i as u64)
                    .count();
                let alive: Vec<(u64, u64, u64, Bytes)> = entries
                    .split_off(entries.len() - contiguous)
                    .into_iter()
                    .filter(|e| e.1 > oldest_unix)
                    .collect();
                let (epoch, top, entries): (Arc<str>, u64, Vec<(u64, Bytes)>) = if clean {
                    let entries = alive.into_iter().map(|e| (e.2, e.3)).collect();
                    (epoch.into(), top, entries)
                } else {
                    // After a crash the last commit's messages may be
                    // missing though clients saw them: what was kept goes on
                    // as a new epoch, numbered again from 1 (each frame
                    // rebuilt with its new offset), on disk too.
                    let fresh = new_epoch();
                    let mut renumbered: Vec<(u64, u64, Bytes)> = Vec::new();
                    for (_, unix, at, frame) in alive {
                        let n = renumbered.len() as u64 + 1;
                        if let Some(f) = reoffset(&key, &frame, n) {
                            renumbered.push((unix, at, f));
                        }
                    }
                    let k = key.as_str();
                    messages
                        .retain_in((k, 0)..=(k, u64::MAX), |_, _| false)
                        .map_err(|e| db_err(dir, e))?;
                    for (i, (unix, _, f)) in renumbered.iter().enumerate() {
                        messages
                            .insert((k, i as u64 + 1), (*unix, &f[..]))
                            .map_err(|e| db_err(dir, e))?;
                    }
                    let n = renumbered.len() as u64;
                    channels
                        .insert(k, (&*fresh, n))
                        .map_err(|e| db_err(dir, e))?;
                    let entries = renumbered.into_iter().map(|(_, at, f)| (at, f)).collect();
                    (fresh, n, entries)
                };
                kept += entries.len();
                let restored_key: Box<str> = key.as_str().into();
                restored[owner(&key) % cores].push(Restored {
                    key: restored_key,
                    epoch,
                    top,
                    keep,
                    entries,
                });
            }
            meta.insert("clean", 0).map_err(|e| db_err(dir, e))?;
            if !clean {
                tracing::warn!(
                    "HISTORY_DIR: the last run did not stop cleanly; every channel goes on with \
                     what reached the disk, under a new epoch"
                );
            }
            tracing::info!(
                channels = restored.iter().map(Vec::len).sum::<usize>(),
                messages = kept,
                "history read back from HISTORY_DIR"
            );
        }
        txn.commit().map_err(|e| db_err(dir, e))?;
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let shared = Arc::new(Shared {
            lost: Mutex::new(HashSet::new()),
            any_lost: AtomicBool::new(false),
            dropped: metrics.history_disk_dropped.clone(),
            written: metrics.history_disk_written.clone(),
            warned: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        let keeping = keeping.clone();
        let thread = std::thread::Builder::new()
            .name("herald-history".into())
            .spawn(move || writer(db, rx, s2, keeping))
            .map_err(|e| DiskError::Dir(dir.to_path_buf(), e))?;
        Ok((
            Arc::new(HistoryDisk {
                tx,
                shared,
                thread: Mutex::new(Some(thread)),
            }),
            restored,
        ))
    }

    /// Writes what is queued, marks the database clean and stops the
    /// storage thread (a graceful shutdown; within `timeout`).
    pub fn stop(&self, timeout: Duration) {
        let (done, wait) = crossbeam_channel::bounded(1);
        if self.tx.send_timeout(Op::Stop(done), timeout).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// The storage thread: group commits until told to stop, and every
/// [`PRUNE_EVERY`] a prune of what expired.
fn writer(db: Database, rx: Receiver<Op>, shared: Arc<Shared>, keeping: Keeping) {
    let durable = &keeping.durable;
    let mut batch: Vec<Append> = Vec::new();
    let mut next_prune = Instant::now() + PRUNE_EVERY;
    let mut saved = durable.changes();
    loop {
        if Instant::now() >= next_prune {
            if let Err(e) = prune(&db, &keeping, crate::clock::unix_ms()) {
                tracing::warn!("HISTORY_DIR: pruning failed: {e}");
            }
            next_prune = Instant::now() + PRUNE_EVERY;
        }
        save_personal(&db, durable, &mut saved);
        let first = match rx.recv_deadline(next_prune.min(Instant::now() + SAVE_PERSONAL)) {
            Ok(op) => op,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let mut stop = None;
        match first {
            Op::Append(a) => batch.push(a),
            Op::Stop(done) => stop = Some(done),
        }
        // Gather what arrives within the group-commit interval.
        let until = Instant::now() + GROUP_COMMIT;
        while stop.is_none() && batch.len() < QUEUE {
            match rx.recv_deadline(until) {
                Ok(Op::Append(a)) => batch.push(a),
                Ok(Op::Stop(done)) => stop = Some(done),
                Err(_) => break,
            }
        }
        if stop.is_some() {
            // Everything queued before the stop.
            while let Ok(op) = rx.try_recv() {
                if let Op::Append(a) = op {
                    batch.push(a);
                }
            }
        }
        if !batch.is_empty() {
            match commit(&db, &batch) {
                Ok(()) => {
                    shared.written.inc_by(batch.len() as u64);
                }
                Err(e) => {
                    for a in &batch {
                        shared.lose(&a.key, &e);
                    }
                }
            }
            batch.clear();
        }
        if let Some(done) = stop {
            save_personal(&db, durable, &mut saved);
            if let Err(e) = mark_clean(&db) {
                tracing::error!("HISTORY_DIR: could not mark the history clean: {e}");
            }
            let _ = done.send(());
            return;
        }
    }
}

/// One transaction: every message of the batch, each channel's epoch and
/// top (written once per channel), and what fell out of each channel's
/// size.
fn commit(db: &Database, batch: &[Append]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut channels = txn.open_table(CHANNELS).map_err(|e| e.to_string())?;
        let mut messages = txn.open_table(MESSAGES).map_err(|e| e.to_string())?;
        // Per channel: the epoch its stored messages belong to, and its top.
        let mut seen: HashMap<&str, (&Arc<str>, u64)> = HashMap::new();
        for a in batch {
            let key = &*a.key;
            let same_epoch = match seen.get(key) {
                Some((epoch, _)) => **epoch == a.epoch,
                None => channels
                    .get(key)
                    .map_err(|e| e.to_string())?
                    .is_some_and(|v| v.value().0 == &*a.epoch),
            };
            if !same_epoch {
                // A new epoch: what was stored is another run.
                messages
                    .retain_in((key, 0)..=(key, u64::MAX), |_, _| false)
                    .map_err(|e| e.to_string())?;
            }
            messages
                .insert((key, a.offset), (a.unix_ms, &a.frame[..]))
                .map_err(|e| e.to_string())?;
            if let Some(gone) = a.offset.checked_sub(a.keep.size as u64) {
                messages.remove((key, gone)).map_err(|e| e.to_string())?;
            }
            seen.insert(key, (&a.epoch, a.offset));
        }
        for (key, (epoch, top)) in seen {
            channels
                .insert(key, (&**epoch, top))
                .map_err(|e| e.to_string())?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// Drops from the disk what the channels no longer keep: messages older
/// than their time to live (oldest first, stopping at the first still
/// young), and channels no `HISTORY` pattern covers any more or left
/// without messages for [`META_TTL_MS`]. Returns the messages dropped.
fn prune(db: &Database, keeping: &Keeping, unix_now: u64) -> Result<usize, String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let mut dropped = 0;
    {
        let mut channels = txn.open_table(CHANNELS).map_err(|e| e.to_string())?;
        let mut messages = txn.open_table(MESSAGES).map_err(|e| e.to_string())?;
        let keys: Vec<String> = channels
            .iter()
            .map_err(|e| e.to_string())?
            .filter_map(|r| r.ok().map(|(k, _)| k.value().to_string()))
            .collect();
        for key in keys {
            let k = key.as_str();
            let Some(keep) = keeping.keep_of(k) else {
                channels.remove(k).map_err(|e| e.to_string())?;
                messages
                    .retain_in((k, 0)..=(k, u64::MAX), |_, _| {
                        dropped += 1;
                        false
                    })
                    .map_err(|e| e.to_string())?;
                continue;
            };
            let oldest = unix_now.saturating_sub(keep.ttl_ms);
            let mut expired = Vec::new();
            let mut newest_unix = None;
            for row in messages
                .range((k, 0)..=(k, u64::MAX))
                .map_err(|e| e.to_string())?
            {
                let (id, v) = row.map_err(|e| e.to_string())?;
                let unix_ms = v.value().0;
                newest_unix = Some(unix_ms);
                if unix_ms > oldest {
                    break;
                }
                expired.push(id.value().1);
            }
            for offset in &expired {
                messages.remove((k, *offset)).map_err(|e| e.to_string())?;
            }
            dropped += expired.len();
            let empty = newest_unix.is_none_or(|u| u <= oldest);
            let last = newest_unix.unwrap_or(0);
            if empty && last.saturating_add(META_TTL_MS) <= unix_now {
                channels.remove(k).map_err(|e| e.to_string())?;
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
    Ok(dropped)
}

/// Which channels keep what on disk: herald's own by `HISTORY`, and any
/// channel users follow durably.
#[derive(Clone)]
pub struct Keeping {
    pub rules: Rules,
    pub durable: Arc<Durable>,
}

impl Keeping {
    /// What the channel of routing key `key` keeps, if anything.
    fn keep_of(&self, key: &str) -> Option<Keep> {
        let (namespace, channel) = match key.split_once('#') {
            Some((n, channel)) => (n.parse().ok()?, channel),
            None => (0, key),
        };
        let ruled = (namespace == 0).then(|| self.rules.keep(channel)).flatten();
        Keep::widest(ruled, self.durable.keeps(namespace, channel))
    }
}

/// Reads the durable subscriptions back; a row that does not parse is
/// left out (and logged).
fn read_personal(
    table: &impl ReadableTable<(u16, &'static str), &'static str>,
) -> Result<Vec<Record>, redb::StorageError> {
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let (namespace, user) = k.value();
        match serde_json::from_str::<Vec<(String, String, u64)>>(v.value()) {
            Ok(subs) => out.extend(subs.into_iter().map(|(channel, epoch, offset)| Record {
                namespace,
                user: user.into(),
                channel: channel.into(),
                cursor: Cursor {
                    epoch: epoch.into(),
                    offset,
                },
            })),
            Err(e) => tracing::warn!(
                user,
                "HISTORY_DIR: a durable subscription row is unreadable ({e}); left out"
            ),
        }
    }
    Ok(out)
}

/// Writes the users whose durable subscriptions changed since `saved`.
fn save_personal(db: &Database, durable: &Durable, saved: &mut u64) {
    let now = durable.changes();
    if now == *saved {
        return;
    }
    let changed = durable.take_changed();
    let write = || -> Result<(), String> {
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut t = txn.open_table(PERSONAL).map_err(|e| e.to_string())?;
            for ((namespace, user), subs) in &changed {
                if subs.is_empty() {
                    t.remove((*namespace, &**user)).map_err(|e| e.to_string())?;
                    continue;
                }
                let rows: Vec<(&str, &str, u64)> = subs
                    .iter()
                    .map(|(c, k)| (&**c, &*k.epoch, k.offset))
                    .collect();
                let json = serde_json::to_string(&rows).map_err(|e| e.to_string())?;
                t.insert((*namespace, &**user), json.as_str())
                    .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    };
    match write() {
        Ok(()) => *saved = now,
        Err(e) => tracing::warn!("HISTORY_DIR: durable subscriptions not saved ({e}); retrying"),
    }
}

fn mark_clean(db: &Database) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        meta.insert("clean", 1).map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(key: &str, epoch: &Arc<str>, offset: u64, unix_ms: u64) -> Append {
        Append {
            key: key.into(),
            epoch: epoch.clone(),
            offset,
            unix_ms,
            keep: Keep {
                size: 100,
                ttl_ms: 1000,
            },
            frame: Bytes::from(format!("m{offset}")),
        }
    }

    fn offsets(db: &Database, key: &str) -> Vec<u64> {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(MESSAGES).unwrap();
        t.range((key, 0)..=(key, u64::MAX))
            .unwrap()
            .map(|r| r.unwrap().0.value().1)
            .collect()
    }

    #[test]
    fn durable_subscriptions_are_saved_as_they_change_and_bad_rows_left_out() {
        let dir = std::env::temp_dir().join(format!("herald-disk-personal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Database::create(dir.join("h.redb")).unwrap();
        let durable = Durable::default();
        let at = |offset| Cursor {
            epoch: "e1".into(),
            offset,
        };
        durable.subscribe(0, "u1", "news", at(3)).unwrap();
        durable.subscribe(2, "u2", "alerts", at(0)).unwrap();
        let mut saved = 0;
        save_personal(&db, &durable, &mut saved);
        assert_eq!(saved, durable.changes());
        durable.commit(0, "u1", "news", &at(9).epoch, 9);
        durable.unsubscribe(2, "u2", "alerts");
        save_personal(&db, &durable, &mut saved);
        // A row another version or a broken disk wrote.
        let txn = db.begin_write().unwrap();
        txn.open_table(PERSONAL)
            .unwrap()
            .insert((1, "u3"), "not json")
            .unwrap();
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let records = read_personal(&txn.open_table(PERSONAL).unwrap()).unwrap();
        assert_eq!(
            records,
            vec![Record {
                namespace: 0,
                user: "u1".into(),
                channel: "news".into(),
                cursor: at(9)
            }],
            "the cursor as committed, the ended one gone, the bad row left out"
        );
        drop(txn);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn commits_and_prunes_by_age_and_by_rule() {
        let dir = std::env::temp_dir().join(format!("herald-disk-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Database::create(dir.join("h.redb")).unwrap();
        let e: Arc<str> = "e1".into();
        let batch: Vec<Append> = (1..=4).map(|i| append("news", &e, i, 1000 * i)).collect();
        let mut batch = batch;
        batch.push(append("gone", &e, 1, 1000));
        commit(&db, &batch).unwrap();
        assert_eq!(offsets(&db, "news"), vec![1, 2, 3, 4]);
        let rules = Rules::parse("news=100/1s").unwrap();
        // At 3,500 ms, messages sent at or before 2,500 ms are too old.
        let keeping = Keeping {
            rules,
            durable: Arc::new(Durable::default()),
        };
        assert_eq!(prune(&db, &keeping, 3500).unwrap(), 2 + 1);
        assert_eq!(offsets(&db, "news"), vec![3, 4]);
        assert!(
            offsets(&db, "gone").is_empty(),
            "no pattern covers it any more"
        );
        // A new epoch replaces what was stored.
        let e2: Arc<str> = "e2".into();
        commit(&db, &[append("news", &e2, 1, 5000)]).unwrap();
        assert_eq!(offsets(&db, "news"), vec![1]);
        // Long after its last message, the channel itself is forgotten.
        assert_eq!(prune(&db, &keeping, 5000 + META_TTL_MS + 2000).unwrap(), 1);
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(CHANNELS).unwrap();
        assert!(t.get("news").unwrap().is_none());
        drop(t);
        drop(txn);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
