//! The node's own books: what it served and earned, per day and per ledger epoch, for its owner.
//!
//! Per local day: bytes served to clients and to peers, receipts claimed at the tracker and how each was
//! answered (credited, duplicate, rejected with the tracker's reason), and receipts the node itself refused
//! from clients. Per ledger epoch: the bytes of every ledger record crediting this node whose inclusion in a
//! signed head the node verified, whether the head that sealed the epoch is consistent with every head the
//! node verified, and the tracker's own total for the epoch, so the two can be compared to the byte.
//!
//! A tracker's ledger may be split into shards, each a log of its own: records awaiting verification and
//! the last verified head are kept per shard (shard 0's under the keys they always had), and an epoch is
//! settled once every shard the node has records in has sealed it.
//!
//! Kept in a small RocksDB database of its own (`<data-dir>/earnings`, synced like receipts, apart from the
//! cache that may be rebuilt empty), for [`KEEP_DAYS`] days. `fog-node earnings` reads it while the node
//! runs: RocksDB lets a read-only opener in beside the writer (it takes no lock).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fog_proto::credits::{LedgerLeaf, Outcome, Redeemed, MAX_SHARDS};
use fog_proto::merkle;
use rocksdb::{DBRecoveryMode, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::stats::Counters;
use crate::store::{is_damage_error, is_lock_error};

/// Days of records kept (a little over a year, so last year's month is still there to compare).
pub const KEEP_DAYS: u64 = 400;
/// Epoch records kept at most, whatever the epoch length (400 days of hourly epochs).
const MAX_EPOCHS: usize = 9_600;
/// Ledger records awaiting verification at most; beyond, the oldest are given up and the epoch says so.
pub const MAX_PENDING: usize = 16_384;
/// Distinct rejection or refusal reasons kept per day; the rest are counted under [`OTHER_REASONS`].
const MAX_REASONS: usize = 16;
const OTHER_REASONS: &str = "other reasons";
/// Longest reason kept (the tracker's are one sentence).
const MAX_REASON_LEN: usize = 200;
/// Problems kept per epoch.
const MAX_PROBLEMS: usize = 8;
/// How often bytes served are written down.
const COUNT_EVERY: Duration = Duration::from_secs(10);

const DAY_PREFIX: &str = "day/";
const EPOCH_PREFIX: &str = "epoch/";
const PENDING_PREFIX: &str = "pending/";
/// Epochs not settled yet: a small index beside the epoch records, so finding them costs no scan.
const OPEN_PREFIX: &str = "open/";
/// Shard 0's verified head; shard s's is `head/s`.
const HEAD_KEY: &str = "head";
/// The ledger shards other than 0 this node has had records in (a JSON list).
const SHARDS_KEY: &str = "shards";

#[derive(Debug, thiserror::Error)]
pub enum EarningsError {
    #[error("cannot open the earnings database at {path}: {source}")]
    Open { path: String, source: rocksdb::Error },
    #[error("the earnings database at {path} is locked: is another fog-node using this --data-dir?")]
    Locked { path: String },
    #[error("no earnings database at {path}: has fog-node run with this --data-dir?")]
    Missing { path: String },
    #[error("cannot move the damaged earnings database at {path} aside: {source}")]
    MoveAside { path: String, source: std::io::Error },
    #[error("earnings database failed: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("earnings record {key} is unreadable: {source}")]
    Corrupt { key: String, source: serde_json::Error },
}

impl EarningsError {
    /// Whether trying again may help (a full disk may drain; a lock or damage will not go away).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Db(_))
    }
}

/// One local day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Day {
    /// `YYYY-MM-DD`, local time.
    pub date: String,
    pub client_bytes: u64,
    pub peer_bytes: u64,
    /// Receipts sent to the tracker for redemption.
    pub receipts_claimed: u64,
    pub receipts_credited: u64,
    /// Bytes the tracker credited, as it answered the redemptions.
    pub credited_bytes: u64,
    /// Receipts the tracker had already credited (a retry after a lost answer).
    pub receipts_duplicate: u64,
    pub receipts_rejected: u64,
    /// The tracker's reasons, with how many receipts each.
    pub rejected: BTreeMap<String, u64>,
    /// Receipts clients handed over that this node refused, by reason.
    pub refused: BTreeMap<String, u64>,
}

/// One ledger epoch, as far as this node verified it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    pub epoch: u64,
    /// Local date of the first record of this epoch the node verified (or heard of).
    pub date: String,
    /// Bytes of this node's ledger records in the epoch whose inclusion it verified.
    pub node_bytes: u64,
    /// Those records.
    pub records_verified: u64,
    /// Records that failed verification: not this node's, another amount, not in the signed head.
    pub records_failed: u64,
    /// The tracker's total for this node in the epoch, from its latest statement.
    pub tracker_bytes: Option<u64>,
    /// Size of the head that sealed the epoch, once the node checked it against its verified heads (with
    /// shards: the sum over them).
    pub sealed_size: Option<u64>,
    /// With shards: the size of each shard's head that sealed the epoch.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sealed_shards: BTreeMap<u32, u64>,
    /// Whether that head is consistent with the log the node verified (`None`: not checked yet).
    pub consistent: Option<bool>,
    /// Every record of this node below the sealed size is verified: the epoch's totals can be compared.
    pub settled: bool,
    pub problems: Vec<String>,
}

impl Epoch {
    /// How node and tracker compare, in one word: `agree`, `disagree`, `open` (the epoch is not settled
    /// yet) or `failed` (verification found a problem).
    pub fn agreement(&self) -> &'static str {
        if self.records_failed > 0 || self.consistent == Some(false) {
            "failed"
        } else if !self.settled {
            "open"
        } else if self.tracker_bytes == Some(self.node_bytes) {
            "agree"
        } else {
            "disagree"
        }
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(truncate(&what));
        }
    }
}

/// A ledger record the tracker said it appended for this node, awaiting verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRecord {
    pub credited_bytes: u64,
    pub chain_index: u32,
}

/// The last head whose signature and consistency the node verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedHead {
    pub size: u64,
    pub root: fog_proto::credits::Digest,
}

/// The head that sealed an epoch in one shard, as the node checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub shard: u32,
    pub size: u64,
    /// Whether it is consistent with the shard's verified log, or why not.
    pub consistent: Result<(), String>,
}

/// What verification of a round of records found.
#[derive(Debug, Default)]
pub struct Verification {
    /// Records whose inclusion checked out, with their leaves.
    pub included: Vec<(u64, LedgerLeaf)>,
    /// Records that failed: index, the epoch if the leaf said one, what was wrong.
    pub failed: Vec<(u64, Option<u64>, String)>,
}

/// A month (or any set of days) of books.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `YYYY-MM`.
    pub month: String,
    pub days: Vec<Day>,
    pub epochs: Vec<Epoch>,
    pub totals: Totals,
    /// Ledger records awaiting verification now.
    pub pending_records: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub client_bytes: u64,
    pub peer_bytes: u64,
    pub receipts_claimed: u64,
    pub receipts_credited: u64,
    pub credited_bytes: u64,
    pub receipts_duplicate: u64,
    pub receipts_rejected: u64,
    pub receipts_refused: u64,
    /// Over the month's settled epochs: this node's verified bytes, and the tracker's.
    pub settled_node_bytes: u64,
    pub settled_tracker_bytes: u64,
    /// Settled epochs whose totals differ, or whose verification failed.
    pub epochs_disagreeing: u64,
}

#[derive(Debug)]
pub struct Earnings {
    db: DB,
    /// Serialises read-modify-write of records.
    write: Mutex<()>,
    /// Counter values last written down: (to clients, to peers).
    counted: Mutex<(u64, u64)>,
    /// Refusals since they were last written down, by reason.
    refusals: Mutex<BTreeMap<&'static str, u64>>,
    pending: AtomicU64,
    /// The date of the last pruning: the books are pruned once a day.
    pruned: Mutex<String>,
    /// Set when the database was damaged at start-up: what was done about it.
    recovered: Option<String>,
}

fn options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
    // Tiny: a year of books is about a megabyte, and the data directory's allowance is small.
    o.set_write_buffer_size(256 << 10);
    o.set_max_write_buffer_number(2);
    o.set_target_file_size_base(1 << 20);
    o.set_max_log_file_size(128 << 10);
    o.set_keep_log_file_num(1);
    o.set_max_manifest_file_size(512 << 10);
    o.set_manifest_preallocation_size(32 << 10);
    o
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_REASON_LEN) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Adds `n` under `reason`, keeping at most [`MAX_REASONS`] distinct reasons.
fn count_reason(map: &mut BTreeMap<String, u64>, reason: &str, n: u64) {
    let reason = truncate(reason);
    let key = if map.contains_key(&reason) || map.len() < MAX_REASONS { reason } else { OTHER_REASONS.into() };
    *map.entry(key).or_default() += n;
}

fn epoch_key(epoch: u64) -> String {
    format!("{EPOCH_PREFIX}{epoch:020}")
}

fn open_key(epoch: u64) -> String {
    format!("{OPEN_PREFIX}{epoch:020}")
}

/// Where shard `shard`'s records awaiting verification are kept: shard 0's straight under
/// [`PENDING_PREFIX`] (as before shards), another's under `pending/s<shard>/`.
fn pending_prefix(shard: u32) -> String {
    if shard == 0 {
        PENDING_PREFIX.into()
    } else {
        format!("{PENDING_PREFIX}s{shard:010}/")
    }
}

fn pending_key(shard: u32, index: u64) -> String {
    format!("{}{index:020}", pending_prefix(shard))
}

fn head_key(shard: u32) -> String {
    if shard == 0 {
        HEAD_KEY.into()
    } else {
        format!("{HEAD_KEY}/{shard}")
    }
}

/// Today's local date, `YYYY-MM-DD`.
pub fn today() -> String {
    jiff::ZonedDateTime::now().date().to_string()
}

/// The local date `days` days ago.
fn days_ago(days: u64) -> String {
    jiff::ZonedDateTime::now().date().saturating_sub(jiff::Span::new().days(days as i64)).to_string()
}

impl Earnings {
    /// Opens (creating) the node's books; a damaged database is moved aside and the books start empty.
    pub fn open(path: &Path) -> Result<Self, EarningsError> {
        let display = path.display().to_string();
        let (db, recovered) = match DB::open(&options(), path) {
            Ok(db) => (db, None),
            Err(e) if is_lock_error(&e) => return Err(EarningsError::Locked { path: display }),
            Err(e) if !is_damage_error(&e) => return Err(EarningsError::Open { path: display, source: e }),
            Err(damage) => {
                let aside = moved_aside(path);
                std::fs::rename(path, &aside)
                    .map_err(|source| EarningsError::MoveAside { path: display.clone(), source })?;
                let why =
                    format!("earnings database was damaged ({damage}); moved to {} and started empty", aside.display());
                tracing::error!("{why}");
                let db = DB::open(&options(), path).map_err(|source| EarningsError::Open { path: display, source })?;
                (db, Some(why))
            }
        };
        let earnings = Self::with(db, recovered);
        earnings.prune()?;
        Ok(earnings)
    }

    /// Opens the books of a node that may be running, read-only (`fog-node earnings`). RocksDB's info log
    /// goes to the temporary directory, so the running node's log is left alone.
    pub fn open_read_only(path: &Path) -> Result<Self, EarningsError> {
        let display = path.display().to_string();
        if !path.join("CURRENT").exists() {
            return Err(EarningsError::Missing { path: display });
        }
        let mut opts = options();
        opts.create_if_missing(false);
        opts.set_db_log_dir(std::env::temp_dir().join("fog-node-earnings-log"));
        let db = DB::open_for_read_only(&opts, path, false)
            .map_err(|source| EarningsError::Open { path: display, source })?;
        Ok(Self::with(db, None))
    }

    fn with(db: DB, recovered: Option<String>) -> Self {
        let pending = db
            .prefix_iterator(PENDING_PREFIX)
            .filter_map(Result::ok)
            .take_while(|(k, _)| k.starts_with(PENDING_PREFIX.as_bytes()));
        let pending = pending.count() as u64;
        Self {
            db,
            write: Mutex::new(()),
            counted: Mutex::new((0, 0)),
            refusals: Mutex::new(BTreeMap::new()),
            pending: AtomicU64::new(pending),
            pruned: Mutex::new(String::new()),
            recovered,
        }
    }

    pub fn recovered(&self) -> Option<&str> {
        self.recovered.as_deref()
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, EarningsError> {
        let Some(v) = self.db.get_pinned(key)? else { return Ok(None) };
        serde_json::from_slice(&v).map(Some).map_err(|source| EarningsError::Corrupt { key: key.into(), source })
    }

    fn put<T: Serialize>(batch: &mut WriteBatch, key: &str, value: &T) {
        batch.put(key, serde_json::to_vec(value).expect("earnings records serialise"));
    }

    fn day(&self, date: &str) -> Result<Day, EarningsError> {
        Ok(self.get(&format!("{DAY_PREFIX}{date}"))?.unwrap_or_else(|| Day { date: date.into(), ..Day::default() }))
    }

    fn epoch(&self, epoch: u64) -> Result<Epoch, EarningsError> {
        Ok(self.get(&epoch_key(epoch))?.unwrap_or_else(|| Epoch { epoch, date: today(), ..Epoch::default() }))
    }

    /// Changes today's record in one synced write.
    fn update_today(&self, change: impl FnOnce(&mut Day)) -> Result<(), EarningsError> {
        let _guard = self.write.lock().expect("earnings lock");
        let mut day = self.day(&today())?;
        change(&mut day);
        let mut batch = WriteBatch::default();
        Self::put(&mut batch, &format!("{DAY_PREFIX}{}", day.date), &day);
        Ok(self.db.write_opt(batch, &synced())?)
    }

    /// Notes a receipt a client handed over that the node refused (written down with the bytes served).
    pub fn note_refusal(&self, reason: &'static str) {
        *self.refusals.lock().expect("refusals lock").entry(reason).or_default() += 1;
    }

    /// Writes down bytes served since the last call (counters are totals since start) and the refusals
    /// noted meanwhile, under today's date.
    pub fn count_served(&self, client_total: u64, peer_total: u64) -> Result<(), EarningsError> {
        let (client, peer) = {
            let mut counted = self.counted.lock().expect("counted lock");
            let delta = (client_total.saturating_sub(counted.0), peer_total.saturating_sub(counted.1));
            *counted = (client_total, peer_total);
            delta
        };
        let refusals = std::mem::take(&mut *self.refusals.lock().expect("refusals lock"));
        if client == 0 && peer == 0 && refusals.is_empty() {
            return Ok(());
        }
        let today = today();
        let new_day = *self.pruned.lock().expect("pruned lock") != today;
        self.update_today(|d| {
            d.client_bytes += client;
            d.peer_bytes += peer;
            for (reason, n) in refusals {
                count_reason(&mut d.refused, reason, n);
            }
        })?;
        if new_day {
            self.prune()?;
        }
        Ok(())
    }

    /// Writes down bytes served every few seconds, until the process ends.
    pub async fn count_served_forever(self: Arc<Self>, counters: Arc<Counters>) {
        let mut tick = tokio::time::interval(COUNT_EVERY);
        loop {
            tick.tick().await;
            let (me, counters) = (self.clone(), counters.clone());
            let counted = tokio::task::spawn_blocking(move || me.count_served_now(&counters)).await;
            if let Ok(Err(e)) = counted {
                tracing::warn!(error = %e, "cannot write down bytes served");
            }
        }
    }

    /// [`Earnings::count_served`] from the node's counters (also at shutdown).
    pub fn count_served_now(&self, counters: &Counters) -> Result<(), EarningsError> {
        self.count_served(
            counters.bytes_served.load(Ordering::Relaxed),
            counters.peer_served_bytes.load(Ordering::Relaxed),
        )
    }

    /// Writes down the tracker's answers to a redemption, before the receipts are dropped: a crash in
    /// between redeems them again, and the tracker answers `duplicate`, which adds nothing.
    pub fn record_redemption(&self, results: &[Redeemed]) -> Result<(), EarningsError> {
        let _guard = self.write.lock().expect("earnings lock");
        let mut day = self.day(&today())?;
        let mut batch = WriteBatch::default();
        let mut pending = self.pending.load(Ordering::Relaxed);
        let mut shards = self.shards()?;
        let known = shards.len();
        for r in results {
            day.receipts_claimed += 1;
            match r.outcome {
                Outcome::Credited => {
                    day.receipts_credited += 1;
                    day.credited_bytes += r.credited_bytes;
                    // A shard beyond any ledger's is not kept (its record stays unverified, and the
                    // comparison with the tracker's totals shows it).
                    if let Some(leaf) = r.leaf_index.filter(|_| r.shard < MAX_SHARDS) {
                        let record = PendingRecord { credited_bytes: r.credited_bytes, chain_index: r.index };
                        Self::put(&mut batch, &pending_key(r.shard, leaf), &record);
                        pending += 1;
                        if !shards.contains(&r.shard) {
                            shards.push(r.shard);
                        }
                    }
                }
                Outcome::Duplicate => day.receipts_duplicate += 1,
                Outcome::Rejected => {
                    day.receipts_rejected += 1;
                    count_reason(&mut day.rejected, r.reason.as_deref().unwrap_or("no reason given"), 1);
                }
            }
        }
        Self::put(&mut batch, &format!("{DAY_PREFIX}{}", day.date), &day);
        if shards.len() != known {
            shards.sort_unstable();
            Self::put(&mut batch, SHARDS_KEY, &shards[1..].to_vec());
        }
        self.db.write_opt(batch, &synced())?;
        self.pending.store(pending, Ordering::Relaxed);
        if pending > MAX_PENDING as u64 {
            self.give_up_oldest(pending - MAX_PENDING as u64)?;
        }
        Ok(())
    }

    /// Drops the `n` oldest records awaiting verification (the tracker's ledger could not be read for
    /// long). Their epochs are unknown; the comparison with the tracker's totals shows the gap.
    fn give_up_oldest(&self, n: u64) -> Result<(), EarningsError> {
        let mut oldest = Vec::new();
        for shard in self.shards()? {
            let left = n as usize - oldest.len();
            oldest.extend(self.pending_records(shard, left)?.into_iter().map(|(i, _)| (shard, i)));
        }
        let mut batch = WriteBatch::default();
        for (shard, i) in &oldest {
            batch.delete(pending_key(*shard, *i));
        }
        self.db.write_opt(batch, &synced())?;
        self.pending.fetch_sub(oldest.len() as u64, Ordering::Relaxed);
        tracing::warn!(records = oldest.len(), "gave up verifying the oldest ledger records: too many await it");
        Ok(())
    }

    /// The ledger shards this node has had records in: 0 and those written down, in order.
    pub fn shards(&self) -> Result<Vec<u32>, EarningsError> {
        let mut shards = vec![0];
        shards.extend(self.get::<Vec<u32>>(SHARDS_KEY)?.unwrap_or_default().into_iter().filter(|s| *s != 0));
        Ok(shards)
    }

    /// Up to `n` of a shard's records awaiting verification, oldest first.
    pub fn pending_records(&self, shard: u32, n: usize) -> Result<Vec<(u64, PendingRecord)>, EarningsError> {
        let mut out = Vec::new();
        if n == 0 {
            return Ok(out);
        }
        let prefix = pending_prefix(shard);
        for item in self.db.prefix_iterator(&prefix) {
            let (k, v) = item?;
            let Some(index) = k.strip_prefix(prefix.as_bytes()) else { break };
            // Shard 0's keys end in the index; other shards' (after them) do not parse.
            let Some(index) = std::str::from_utf8(index).ok().and_then(|i| i.parse().ok()) else { break };
            let record = serde_json::from_slice(&v)
                .map_err(|source| EarningsError::Corrupt { key: pending_key(shard, index), source })?;
            out.push((index, record));
            if out.len() >= n {
                break;
            }
        }
        Ok(out)
    }

    pub fn pending_count(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The last head of `shard` whose signature and consistency this node verified.
    pub fn verified_head(&self, shard: u32) -> Result<Option<VerifiedHead>, EarningsError> {
        self.get(&head_key(shard))
    }

    /// Writes down a verified head of `shard` and what verifying the shard's records against it found, in
    /// one synced write.
    pub fn record_verification(
        &self,
        shard: u32,
        head: VerifiedHead,
        found: &Verification,
    ) -> Result<(), EarningsError> {
        let _guard = self.write.lock().expect("earnings lock");
        let mut epochs: BTreeMap<u64, Epoch> = BTreeMap::new();
        let mut batch = WriteBatch::default();
        for (index, leaf) in &found.included {
            let e = match epochs.entry(leaf.epoch) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => v.insert(self.epoch(leaf.epoch)?),
            };
            e.node_bytes += leaf.credited_bytes;
            e.records_verified += 1;
            batch.delete(pending_key(shard, *index));
        }
        let mut unknown_epoch = Vec::new();
        for (index, epoch, why) in &found.failed {
            match epoch {
                Some(epoch) => {
                    let e = match epochs.entry(*epoch) {
                        std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::btree_map::Entry::Vacant(v) => v.insert(self.epoch(*epoch)?),
                    };
                    e.records_failed += 1;
                    e.problem(format!("ledger record {index}: {why}"));
                }
                None => unknown_epoch.push(format!("ledger record {index}: {why}")),
            }
            batch.delete(pending_key(shard, *index));
        }
        for e in epochs.values() {
            Self::put(&mut batch, &epoch_key(e.epoch), e);
            if !e.settled {
                batch.put(open_key(e.epoch), b"");
            }
        }
        Self::put(&mut batch, &head_key(shard), &head);
        self.db.write_opt(batch, &synced())?;
        self.pending.fetch_sub((found.included.len() + found.failed.len()) as u64, Ordering::Relaxed);
        for why in unknown_epoch {
            tracing::error!("{why}");
        }
        Ok(())
    }

    /// Epochs before `current` with records but not settled yet, oldest first, at most `n`.
    pub fn unsettled(&self, current: u64, n: usize) -> Result<Vec<u64>, EarningsError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(OPEN_PREFIX) {
            let (k, _) = item?;
            let Some(epoch) = k.strip_prefix(OPEN_PREFIX.as_bytes()) else { break };
            let Some(epoch) = std::str::from_utf8(epoch).ok().and_then(|e| e.parse().ok()) else { break };
            if epoch >= current || out.len() >= n {
                break;
            }
            out.push(epoch);
        }
        Ok(out)
    }

    /// Whether any epoch with records is not settled yet (the current one included).
    pub fn has_open(&self) -> bool {
        self.db
            .prefix_iterator(OPEN_PREFIX)
            .next()
            .and_then(Result::ok)
            .is_some_and(|(k, _)| k.starts_with(OPEN_PREFIX.as_bytes()))
    }

    /// Writes down the check of the heads that sealed `epoch`, one per shard the node has records in: each
    /// one's size, and whether it is consistent with the node's verified log of its shard. The epoch is
    /// settled once no record of a shard below its sealed size awaits verification. `notes`: how the epoch
    /// was settled, when not by its own sealed heads.
    pub fn record_sealed(&self, epoch: u64, seals: &[Sealed], notes: Vec<String>) -> Result<bool, EarningsError> {
        let _guard = self.write.lock().expect("earnings lock");
        let mut e = self.epoch(epoch)?;
        e.sealed_size = Some(seals.iter().map(|s| s.size).sum());
        e.sealed_shards = match seals {
            [only] if only.shard == 0 => BTreeMap::new(),
            _ => seals.iter().map(|s| (s.shard, s.size)).collect(),
        };
        for note in notes {
            e.problem(note);
        }
        let mut waiting = false;
        for seal in seals {
            match &seal.consistent {
                Ok(()) => e.consistent = Some(e.consistent != Some(false)),
                Err(why) => {
                    e.consistent = Some(false);
                    e.problem(why.clone());
                }
            }
            waiting |= self.pending_records(seal.shard, 1)?.first().is_some_and(|(i, _)| *i < seal.size);
        }
        e.settled = !waiting;
        let mut batch = WriteBatch::default();
        Self::put(&mut batch, &epoch_key(epoch), &e);
        if e.settled {
            batch.delete(open_key(epoch));
        }
        self.db.write_opt(batch, &synced())?;
        Ok(e.settled)
    }

    /// Writes down the tracker's per-epoch totals for this node (its statement), for epochs the node has
    /// books for, and for later ones it has none of (credit it never heard of is shown, not hidden).
    pub fn record_tracker_totals(&self, lines: &[(u64, u64)]) -> Result<(), EarningsError> {
        let _guard = self.write.lock().expect("earnings lock");
        let first = self.epochs()?.first().map(|e| e.epoch);
        let mut batch = WriteBatch::default();
        for &(epoch, bytes) in lines {
            let known = self.get::<Epoch>(&epoch_key(epoch))?;
            let mut e = match (known, first) {
                (Some(e), _) => e,
                (None, Some(first)) if epoch > first && bytes > 0 => Epoch { epoch, date: today(), ..Epoch::default() },
                _ => continue,
            };
            if e.tracker_bytes != Some(bytes) {
                e.tracker_bytes = Some(bytes);
                Self::put(&mut batch, &epoch_key(epoch), &e);
                if !e.settled {
                    batch.put(open_key(epoch), b"");
                }
            }
        }
        Ok(self.db.write_opt(batch, &synced())?)
    }

    fn epochs(&self) -> Result<Vec<Epoch>, EarningsError> {
        self.scan(EPOCH_PREFIX)
    }

    fn scan<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>, EarningsError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(prefix) {
            let (k, v) = item?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            out.push(serde_json::from_slice(&v).map_err(|source| EarningsError::Corrupt { key, source })?);
        }
        Ok(out)
    }

    /// Drops days older than [`KEEP_DAYS`], and epochs first seen then or beyond [`MAX_EPOCHS`].
    fn prune(&self) -> Result<(), EarningsError> {
        let _guard = self.write.lock().expect("earnings lock");
        *self.pruned.lock().expect("pruned lock") = today();
        let cutoff = days_ago(KEEP_DAYS);
        let mut batch = WriteBatch::default();
        for item in self.db.prefix_iterator(DAY_PREFIX) {
            let (k, _) = item?;
            match k.strip_prefix(DAY_PREFIX.as_bytes()) {
                Some(date) if date < cutoff.as_bytes() => batch.delete(&k),
                _ => break,
            }
        }
        let epochs = self.epochs()?;
        let excess = epochs.len().saturating_sub(MAX_EPOCHS);
        for (i, e) in epochs.iter().enumerate() {
            if i < excess || e.date < cutoff {
                batch.delete(epoch_key(e.epoch));
                batch.delete(open_key(e.epoch));
            }
        }
        Ok(self.db.write_opt(batch, &synced())?)
    }

    /// The epochs first seen in `month`, read from the newest back to the month's start (epochs follow
    /// the calendar), so a month costs its own epochs only.
    fn epochs_of(&self, month: &str) -> Result<Vec<Epoch>, EarningsError> {
        let mut out = Vec::new();
        let last = format!("{EPOCH_PREFIX}~");
        for item in self.db.iterator(IteratorMode::From(last.as_bytes(), Direction::Reverse)) {
            let (k, v) = item?;
            if !k.starts_with(EPOCH_PREFIX.as_bytes()) {
                break;
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            let e: Epoch = serde_json::from_slice(&v).map_err(|source| EarningsError::Corrupt { key, source })?;
            if e.date.as_str() < month {
                break;
            }
            if e.date.starts_with(month) {
                out.push(e);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// The books of `month` (`YYYY-MM`): its days, the epochs first seen in it, and totals.
    pub fn month(&self, month: &str) -> Result<Report, EarningsError> {
        let days: Vec<Day> = self.scan(&format!("{DAY_PREFIX}{month}-"))?;
        let epochs = self.epochs_of(month)?;
        let mut t = Totals::default();
        for d in &days {
            t.client_bytes += d.client_bytes;
            t.peer_bytes += d.peer_bytes;
            t.receipts_claimed += d.receipts_claimed;
            t.receipts_credited += d.receipts_credited;
            t.credited_bytes += d.credited_bytes;
            t.receipts_duplicate += d.receipts_duplicate;
            t.receipts_rejected += d.receipts_rejected;
            t.receipts_refused += d.refused.values().sum::<u64>();
        }
        for e in epochs.iter().filter(|e| e.settled) {
            t.settled_node_bytes += e.node_bytes;
            t.settled_tracker_bytes += e.tracker_bytes.unwrap_or(0);
            if matches!(e.agreement(), "disagree" | "failed") {
                t.epochs_disagreeing += 1;
            }
        }
        Ok(Report { month: month.into(), days, epochs, totals: t, pending_records: self.pending_count() })
    }

    /// This month's books.
    pub fn this_month(&self) -> Result<Report, EarningsError> {
        self.month(&today()[..7])
    }

    /// This month's books with only the latest `epochs` epochs listed (the totals still cover all), for
    /// the status page.
    pub fn summary(&self, epochs: usize) -> Result<Report, EarningsError> {
        let mut report = self.this_month()?;
        let older = report.epochs.len().saturating_sub(epochs);
        report.epochs.drain(..older);
        Ok(report)
    }
}

/// A free name beside `path` for a damaged database: `earnings.damaged-<unix seconds>`.
fn moved_aside(path: &Path) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".damaged-{secs}"));
    path.with_file_name(name)
}

/// Checks `leaf` (at `index`, with `proof` into a head of `size` and `root`) against what the tracker
/// answered when it credited `expected`: this node's, the same amount and chain index, and included.
pub fn check_record(
    me: &fog_proto::NodeId,
    index: u64,
    expected: &PendingRecord,
    leaf: &LedgerLeaf,
    proof: &[merkle::Hash],
    size: u64,
    root: &merkle::Hash,
) -> Result<(), String> {
    if leaf.node != *me {
        return Err("the ledger gives this record to another node".into());
    }
    if (leaf.credited_bytes, leaf.chain_index) != (expected.credited_bytes, expected.chain_index) {
        return Err(format!(
            "the ledger says {} bytes for payment {}; the tracker answered {} bytes for payment {}",
            leaf.credited_bytes, leaf.chain_index, expected.credited_bytes, expected.chain_index
        ));
    }
    if !merkle::verify_inclusion(&leaf.bytes(), index, size, proof, root) {
        return Err(format!("not included in the signed head of size {size}"));
    }
    Ok(())
}

/// `fog-node earnings`: the report as text for a terminal.
pub fn render_text(r: &Report) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20));
    let mut out = format!("Earnings for {}\n\n", r.month);
    out.push_str(&format!(
        "{:<10}  {:>12}  {:>12}  {:>8}  {:>8}  {:>12}  {:>9}  {:>8}\n",
        "date", "to clients", "to peers", "claimed", "credited", "credit", "rejected", "refused"
    ));
    for d in &r.days {
        out.push_str(&format!(
            "{:<10}  {:>12}  {:>12}  {:>8}  {:>8}  {:>12}  {:>9}  {:>8}\n",
            d.date,
            mib(d.client_bytes),
            mib(d.peer_bytes),
            d.receipts_claimed,
            d.receipts_credited,
            mib(d.credited_bytes),
            d.receipts_rejected,
            d.refused.values().sum::<u64>()
        ));
        for (reason, n) in &d.rejected {
            out.push_str(&format!("            rejected by the tracker ×{n}: {reason}\n"));
        }
        for (reason, n) in &d.refused {
            out.push_str(&format!("            refused from clients ×{n}: {reason}\n"));
        }
    }
    let t = &r.totals;
    out.push_str(&format!(
        "{:<10}  {:>12}  {:>12}  {:>8}  {:>8}  {:>12}  {:>9}  {:>8}\n\n",
        "total",
        mib(t.client_bytes),
        mib(t.peer_bytes),
        t.receipts_claimed,
        t.receipts_credited,
        mib(t.credited_bytes),
        t.receipts_rejected,
        t.receipts_refused
    ));
    out.push_str("Ledger epochs (bytes: this node's verified records / the tracker's ledger)\n");
    for e in &r.epochs {
        let tracker = e.tracker_bytes.map_or("–".into(), |b| b.to_string());
        let consistency = match e.consistent {
            Some(true) => "consistent",
            Some(false) => "INCONSISTENT",
            None => "not sealed yet",
        };
        let verdict = match e.agreement() {
            "disagree" => format!("DISAGREE: node {} bytes, tracker {tracker} bytes", e.node_bytes),
            "failed" => "VERIFICATION FAILED".to_string(),
            other => other.to_string(),
        };
        out.push_str(&format!(
            "  epoch {} ({}): {} / {tracker} bytes; {} records included{}; {consistency}; {verdict}\n",
            e.epoch,
            e.date,
            e.node_bytes,
            e.records_verified,
            if e.records_failed > 0 { format!(", {} FAILED", e.records_failed) } else { String::new() },
        ));
        for p in &e.problems {
            out.push_str(&format!("      {p}\n"));
        }
    }
    if r.epochs.is_empty() {
        out.push_str("  none this month\n");
    }
    out.push_str(&format!(
        "\nSettled epochs: this node {} bytes, the tracker {} bytes{}",
        t.settled_node_bytes,
        t.settled_tracker_bytes,
        if t.epochs_disagreeing > 0 { format!("; {} epochs DISAGREE", t.epochs_disagreeing) } else { String::new() }
    ));
    if r.pending_records > 0 {
        out.push_str(&format!("; {} ledger records await verification", r.pending_records));
    }
    out.push('\n');
    out
}

/// The CSV columns of [`render_csv`].
pub const CSV_HEADER: &str = "record,date,epoch,client_bytes,peer_bytes,receipts_claimed,receipts_credited,\
receipts_duplicate,receipts_rejected,receipts_refused,node_bytes,tracker_bytes,records_verified,records_failed,\
consistent,agreement,reason,count";

/// `fog-node earnings --csv`: one row per day (`day`), per reason a day's receipts were rejected by the
/// tracker (`rejected`) or refused by the node (`refused`), per epoch (`epoch`), and the month (`total`).
pub fn render_csv(r: &Report) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    let mut out = format!("{CSV_HEADER}\n");
    let n = |v: u64| v.to_string();
    let mut row = |cells: [String; 18]| {
        out.push_str(&cells.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    };
    let e = String::new;
    for d in &r.days {
        let refused = d.refused.values().sum::<u64>();
        row([
            "day".into(),
            d.date.clone(),
            e(),
            n(d.client_bytes),
            n(d.peer_bytes),
            n(d.receipts_claimed),
            n(d.receipts_credited),
            n(d.receipts_duplicate),
            n(d.receipts_rejected),
            n(refused),
            n(d.credited_bytes),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
        ]);
        for (kind, reasons) in [("rejected", &d.rejected), ("refused", &d.refused)] {
            for (reason, count) in reasons {
                let mut cells: [String; 18] = Default::default();
                (cells[0], cells[1], cells[16], cells[17]) = (kind.into(), d.date.clone(), reason.clone(), n(*count));
                row(cells);
            }
        }
    }
    for ep in &r.epochs {
        let mut cells: [String; 18] = Default::default();
        cells[0] = "epoch".into();
        cells[1] = ep.date.clone();
        cells[2] = n(ep.epoch);
        cells[10] = n(ep.node_bytes);
        cells[11] = ep.tracker_bytes.map(n).unwrap_or_default();
        cells[12] = n(ep.records_verified);
        cells[13] = n(ep.records_failed);
        cells[14] = ep.consistent.map(|c| c.to_string()).unwrap_or_default();
        cells[15] = ep.agreement().into();
        cells[16] = ep.problems.join("; ");
        row(cells);
    }
    let t = &r.totals;
    row([
        "total".into(),
        r.month.clone(),
        e(),
        n(t.client_bytes),
        n(t.peer_bytes),
        n(t.receipts_claimed),
        n(t.receipts_credited),
        n(t.receipts_duplicate),
        n(t.receipts_rejected),
        n(t.receipts_refused),
        n(t.settled_node_bytes),
        n(t.settled_tracker_bytes),
        e(),
        e(),
        e(),
        (if t.epochs_disagreeing > 0 { "disagree" } else { "agree" }).into(),
        e(),
        n(t.epochs_disagreeing),
    ]);
    out
}

#[cfg(test)]
mod tests {
    use fog_proto::credits::{ChainId, Digest, SessionId};
    use fog_proto::NodeId;

    use super::*;

    fn credited(leaf: u64, bytes: u64, index: u32) -> Redeemed {
        Redeemed {
            chain_id: ChainId([leaf as u8; 16]),
            index,
            credited_bytes: bytes,
            outcome: Outcome::Credited,
            reason: None,
            leaf_index: Some(leaf),
            shard: 0,
        }
    }

    fn sealed(shard: u32, size: u64) -> Sealed {
        Sealed { shard, size, consistent: Ok(()) }
    }

    fn leaf(epoch: u64, bytes: u64, index: u32) -> LedgerLeaf {
        LedgerLeaf {
            epoch,
            node: NodeId([1; 32]),
            session: SessionId([2; 16]),
            chain_index: index,
            credited_bytes: bytes,
        }
    }

    #[test]
    fn books_count_verify_settle_and_compare() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("earnings");
        let books = Earnings::open(&path).expect("open");
        books.count_served(100, 10).expect("count");
        books.count_served(250, 10).expect("count");
        books.note_refusal("forged");
        books.count_served(250, 10).expect("refusals are written down with the bytes");
        let rejected = Redeemed {
            outcome: Outcome::Rejected,
            reason: Some("no ticket: the tracker never issued this session".into()),
            leaf_index: None,
            credited_bytes: 0,
            ..credited(0, 0, 1)
        };
        let duplicate = Redeemed { outcome: Outcome::Duplicate, leaf_index: None, ..credited(0, 0, 1) };
        books.record_redemption(&[credited(0, 1000, 1), credited(1, 500, 2), rejected, duplicate]).expect("record");
        assert_eq!(books.pending_count(), 2);
        let head = VerifiedHead { size: 2, root: Digest([0; 32]) };
        let found =
            Verification { included: vec![(0, leaf(7, 1000, 1))], failed: vec![(1, Some(7), "not included".into())] };
        books.record_verification(0, head, &found).expect("verified");
        assert_eq!(books.pending_count(), 0);
        assert_eq!(books.verified_head(0).expect("head"), Some(head));
        books.record_tracker_totals(&[(7, 1000), (3, 99)]).expect("tracker totals");
        assert_eq!(books.unsettled(8, 10).expect("unsettled"), vec![7]);
        assert!(books.has_open());
        assert!(books.record_sealed(7, &[sealed(0, 2)], vec![]).expect("sealed"), "nothing awaits verification");
        assert!(!books.has_open() && books.unsettled(8, 10).expect("unsettled").is_empty());

        let report = books.this_month().expect("report");
        let day = &report.days[0];
        assert_eq!((day.client_bytes, day.peer_bytes), (250, 10));
        assert_eq!((day.receipts_claimed, day.receipts_credited, day.credited_bytes), (4, 2, 1500));
        assert_eq!((day.receipts_duplicate, day.receipts_rejected), (1, 1));
        assert_eq!(day.refused.get("forged"), Some(&1));
        assert_eq!(report.epochs.len(), 1, "epoch 3 predates the books: not shown");
        let epoch = &report.epochs[0];
        assert_eq!((epoch.node_bytes, epoch.tracker_bytes, epoch.records_failed), (1000, Some(1000), 1));
        assert_eq!(epoch.agreement(), "failed", "a record that failed verification is shown");
        let csv = render_csv(&report);
        assert!(csv.lines().all(|l| l.split(',').count() >= 18), "{csv}");
        assert!(csv.contains("rejected,") && csv.contains("no ticket"), "{csv}");
        assert!(render_text(&report).contains("VERIFICATION FAILED"));

        // A second opener reads the books while the writer has them open.
        let reader = Earnings::open_read_only(&path).expect("read-only beside the writer");
        assert_eq!(reader.this_month().expect("report"), report);
    }

    #[test]
    fn disagreement_is_shown_and_reasons_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let books = Earnings::open(&dir.path().join("earnings")).expect("open");
        books.record_redemption(&[credited(0, 1000, 1)]).expect("record");
        let found = Verification { included: vec![(0, leaf(5, 1000, 1))], failed: vec![] };
        books.record_verification(0, VerifiedHead { size: 1, root: Digest([0; 32]) }, &found).expect("verified");
        books.record_tracker_totals(&[(5, 1200), (6, 300)]).expect("tracker totals");
        books.record_sealed(5, &[sealed(0, 1)], vec![]).expect("sealed");
        let report = books.this_month().expect("report");
        assert_eq!(report.epochs[0].agreement(), "disagree");
        assert_eq!((report.epochs[1].node_bytes, report.epochs[1].tracker_bytes), (0, Some(300)), "unseen credit");
        assert_eq!(report.totals.epochs_disagreeing, 1);
        assert!(render_text(&report).contains("DISAGREE: node 1000 bytes, tracker 1200 bytes"));

        let mut reasons = BTreeMap::new();
        for i in 0..40 {
            count_reason(&mut reasons, &format!("reason {i}"), 1);
        }
        assert_eq!(reasons.len(), MAX_REASONS + 1);
        assert_eq!(reasons[OTHER_REASONS], 40 - MAX_REASONS as u64);
    }

    /// Records of several shards: kept, verified and settled per shard, shard 0's where they always were.
    #[test]
    fn records_are_kept_and_settled_per_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let books = Earnings::open(&dir.path().join("earnings")).expect("open");
        let in_shard = |shard, leaf, bytes| Redeemed { shard, ..credited(leaf, bytes, 1) };
        let answers = [in_shard(0, 0, 100), in_shard(2, 0, 200), in_shard(2, 1, 300), in_shard(1, 0, 400)];
        books.record_redemption(&answers).expect("record");
        assert_eq!(books.shards().expect("shards"), [0, 1, 2]);
        assert_eq!(books.pending_count(), 4);
        assert!(books.db.get(pending_key(0, 0)).expect("read").is_some(), "shard 0's where it always was");
        let ids = |shard| -> Vec<u64> {
            books.pending_records(shard, 10).expect("pending").into_iter().map(|(i, _)| i).collect()
        };
        assert_eq!((ids(0), ids(1), ids(2)), (vec![0], vec![0], vec![0, 1]));
        assert!(ids(3).is_empty());
        // Shard 2's records verified against its head; shards 0 and 1 not yet.
        let head = VerifiedHead { size: 2, root: Digest([2; 32]) };
        let found = Verification { included: vec![(0, leaf(5, 200, 1)), (1, leaf(5, 300, 1))], failed: vec![] };
        books.record_verification(2, head, &found).expect("verified");
        assert_eq!((books.verified_head(2).expect("head"), books.verified_head(0).expect("head")), (Some(head), None));
        assert_eq!(books.pending_count(), 2);
        // Sealed in every shard, but shard 1's record below its sealed size awaits verification.
        let seals = [sealed(0, 0), sealed(1, 1), sealed(2, 2)];
        assert!(!books.record_sealed(5, &seals, vec![]).expect("sealed"), "shard 1 waits");
        let found = Verification { included: vec![(0, leaf(5, 400, 1))], failed: vec![] };
        books.record_verification(1, VerifiedHead { size: 1, root: Digest([1; 32]) }, &found).expect("verified");
        assert!(books.record_sealed(5, &seals, vec![]).expect("sealed"), "every shard verified");
        let epoch = books.this_month().expect("report").epochs.remove(0);
        assert_eq!((epoch.node_bytes, epoch.sealed_size, epoch.settled), (900, Some(3), true));
        assert_eq!(epoch.sealed_shards, BTreeMap::from([(0, 0), (1, 1), (2, 2)]));
    }
}
