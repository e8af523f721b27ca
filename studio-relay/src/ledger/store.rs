//! The on-disk layout: one sled tree with prefixed keys, a hash chain over the log, and a head
//! file outside sled that remembers how far the log reached.
//!
//! | key | value |
//! |---|---|
//! | `l` + seq (u64 BE) | a log record: the [`Entry`] and the chain hash up to it |
//! | `a` + account name | the account's four counters ([`Account`]) |
//! | `m` + `head` | the last seq and its chain hash |
//! | `m` + `format` | the layout version |
//!
//! Recovery ([`scan`]) replays the whole log through a fresh [`LedgerState`] and compares.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::LedgerError;
use super::{Account, Entry, LedgerBooks, LedgerState};

/// Layout version stored under `m/format`.
const FORMAT: &[u8] = b"aimatrix-ledger/1";
const KEY_HEAD: &[u8] = b"mhead";
const KEY_FORMAT: &[u8] = b"mformat";
const PREFIX_LOG: u8 = b'l';
const PREFIX_ACCOUNT: u8 = b'a';
const HEAD_MAGIC: &[u8; 8] = b"AIMXLDG1";
const HEAD_SLOT_LEN: u64 = 64;

/// A chain hash: `sha256("aimatrix/ledger/chain" || previous || encoded entry)`.
pub(crate) type Chain = [u8; 32];

/// A log record as stored.
#[derive(Serialize, Deserialize)]
struct Record {
    entry: Entry,
    chain: Chain,
}

/// The last seq and the chain hash up to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Head {
    pub(crate) seq: u64,
    pub(crate) chain: Chain,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    match bincode::serde::encode_to_vec(value, config()) {
        Ok(bytes) => bytes,
        Err(err) => panic!("encoding ledger records cannot fail: {err}"),
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|err| err.to_string())?;
    if used != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - used));
    }
    Ok(value)
}

/// The chain hash after `entry`.
pub(crate) fn chain_next(previous: &Chain, entry: &Entry) -> Chain {
    let mut h = Sha256::new();
    h.update(b"aimatrix/ledger/chain");
    h.update(previous);
    h.update(encode(entry));
    h.finalize().into()
}

fn log_key(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = PREFIX_LOG;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn account_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(PREFIX_ACCOUNT);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Paths inside a ledger directory.
#[derive(Clone, Debug)]
pub(crate) struct Paths {
    pub(crate) dir: PathBuf,
    pub(crate) db: PathBuf,
    pub(crate) head: PathBuf,
}

impl Paths {
    pub(crate) fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), db: dir.join("db"), head: dir.join("head") }
    }
}

/// Opens sled, mapping its failures (and panics on damaged files) to clear errors; a lock this
/// process has only just released is waited for ([`crate::store::retry_while_locked`]).
pub(crate) fn open_db(paths: &Paths) -> Result<sled::Db, LedgerError> {
    crate::store::retry_while_locked(
        || open_db_once(paths),
        |e| matches!(e, LedgerError::Locked { .. }),
    )
}

fn open_db_once(paths: &Paths) -> Result<sled::Db, LedgerError> {
    let path = paths.db.clone();
    let opened = std::panic::catch_unwind(move || {
        sled::Config::new().path(&path).flush_every_ms(None).cache_capacity(256 << 20).open()
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(err))) if err.kind() == std::io::ErrorKind::WouldBlock => {
            Err(LedgerError::Locked { path: paths.dir.clone() })
        }
        Ok(Err(sled::Error::Io(err)))
            if err.to_string().contains("lock") || err.raw_os_error() == Some(11) =>
        {
            Err(LedgerError::Locked { path: paths.dir.clone() })
        }
        Ok(Err(err @ sled::Error::Corruption { .. })) => {
            Err(corrupt(paths, format!("sled refused the files: {err}")))
        }
        Ok(Err(err)) => Err(corrupt(paths, format!("sled could not open it: {err}"))),
        Err(_) => Err(corrupt(paths, "sled panicked while reading its files".to_owned())),
    }
}

pub(crate) fn corrupt(paths: &Paths, detail: String) -> LedgerError {
    LedgerError::Corrupt { path: paths.dir.clone(), detail }
}

/// What a full scan of the database found.
pub(crate) struct Scan {
    /// The state rebuilt from the log (up to the first bad entry).
    pub(crate) state: LedgerState,
    /// The head after the last good entry.
    pub(crate) head: Head,
    /// Every discrepancy, one line each.
    pub(crate) problems: Vec<String>,
    /// Entries read.
    pub(crate) entries: u64,
    /// Each job's money as the entries read record it, for the cross-check with the job store.
    pub(crate) books: LedgerBooks,
}

/// Replays the log and checks it against the stored accounts, the stored head, the head file
/// and the invariants.
pub(crate) fn scan(db: &sled::Db, paths: &Paths, was_recovered: bool) -> Scan {
    let mut state = LedgerState::new();
    let mut problems = Vec::new();
    let mut head = Head::default();
    let mut sums: BTreeMap<String, Account> = BTreeMap::new();
    let mut chains_at: BTreeMap<u64, Chain> = BTreeMap::new();
    let file_heads = read_head_file(&paths.head);
    let wanted: Vec<u64> = file_heads.iter().map(|h| h.seq).collect();
    let mut entries = 0;
    let mut books = LedgerBooks::default();
    match db.get(KEY_FORMAT) {
        Ok(Some(v)) if v.as_ref() == FORMAT => {}
        Ok(Some(v)) => problems.push(format!(
            "unknown layout {:?} (this build reads {:?})",
            String::from_utf8_lossy(&v),
            String::from_utf8_lossy(FORMAT)
        )),
        Ok(None) if was_recovered => problems.push("the layout marker is missing".to_owned()),
        Ok(None) => {}
        Err(err) => problems.push(format!("reading the layout marker failed: {err}")),
    }
    for item in db.scan_prefix([PREFIX_LOG]) {
        let (key, value) = match item {
            Ok(kv) => kv,
            Err(err) => {
                problems.push(format!("reading the log failed after entry {}: {err}", head.seq));
                break;
            }
        };
        entries += 1;
        let record: Record = match decode(&value) {
            Ok(r) => r,
            Err(err) => {
                problems.push(format!("log entry after {} does not decode: {err}", head.seq));
                break;
            }
        };
        if key.as_ref() != log_key(record.entry.seq) {
            problems.push(format!("log entry {} is stored under the wrong key", record.entry.seq));
            break;
        }
        let chain = chain_next(&head.chain, &record.entry);
        if chain != record.chain {
            problems.push(format!(
                "log entry {} does not match its chain hash (altered or out of order)",
                record.entry.seq
            ));
            break;
        }
        if let Err(why) = state.replay(&record.entry) {
            problems.push(why);
            break;
        }
        books.add_entry(&record.entry);
        for l in &record.entry.legs {
            super::add_leg(&mut sums, l);
        }
        head = Head { seq: record.entry.seq, chain };
        if wanted.contains(&head.seq) {
            chains_at.insert(head.seq, chain);
        }
    }
    match db.get(KEY_HEAD).map(|v| v.map(|v| decode::<Head>(&v))) {
        Ok(Some(Ok(stored))) if stored == head => {}
        Ok(Some(Ok(stored))) => problems.push(format!(
            "the stored head says the log ends at entry {} but it ends at {}",
            stored.seq, head.seq
        )),
        Ok(Some(Err(err))) => problems.push(format!("the stored head does not decode: {err}")),
        Ok(None) if head.seq == 0 => {}
        Ok(None) => problems.push("the stored head is missing".to_owned()),
        Err(err) => problems.push(format!("reading the stored head failed: {err}")),
    }
    check_accounts(db, &state, &sums, &mut problems);
    problems.extend(state.violations());
    check_head_file(&file_heads, &chains_at, head, was_recovered, &mut problems);
    Scan { state, head, problems, entries, books }
}

fn check_accounts(
    db: &sled::Db,
    state: &LedgerState,
    sums: &BTreeMap<String, Account>,
    problems: &mut Vec<String>,
) {
    let mut stored: BTreeMap<String, Account> = BTreeMap::new();
    for item in db.scan_prefix([PREFIX_ACCOUNT]) {
        match item {
            Ok((k, v)) => {
                let name = String::from_utf8_lossy(&k[1..]).into_owned();
                match decode::<Account>(&v) {
                    Ok(a) => {
                        stored.insert(name, a);
                    }
                    Err(err) => problems.push(format!("account {name} does not decode: {err}")),
                }
            }
            Err(err) => {
                problems.push(format!("reading the accounts failed: {err}"));
                return;
            }
        }
    }
    for (name, replayed) in state.accounts() {
        let summed = sums.get(name).copied().unwrap_or_default();
        if summed != *replayed {
            problems
                .push(format!("account {name}: replay gives {replayed:?}, legs sum to {summed:?}"));
        }
        match stored.get(name) {
            Some(s) if s == replayed => {}
            Some(s) => problems
                .push(format!("account {name}: stored {s:?} but the log gives {replayed:?}")),
            None => problems.push(format!("account {name} is missing from the stored balances")),
        }
    }
    for name in stored.keys() {
        if !state.accounts().contains_key(name) {
            problems.push(format!("account {name} is stored but never appears in the log"));
        }
    }
    let mut totals = [0u128; 4];
    for a in stored.values() {
        totals[0] = totals[0].wrapping_add(a.debits_posted);
        totals[1] = totals[1].wrapping_add(a.credits_posted);
        totals[2] = totals[2].wrapping_add(a.debits_pending);
        totals[3] = totals[3].wrapping_add(a.credits_pending);
    }
    if totals[0] != totals[1] {
        problems
            .push(format!("stored posted debits {} != posted credits {}", totals[0], totals[1]));
    }
    if totals[2] != totals[3] {
        problems
            .push(format!("stored pending debits {} != pending credits {}", totals[2], totals[3]));
    }
}

fn check_head_file(
    file_heads: &[Head],
    chains_at: &BTreeMap<u64, Chain>,
    head: Head,
    was_recovered: bool,
    problems: &mut Vec<String>,
) {
    let Some(newest) = file_heads.iter().max_by_key(|h| h.seq) else {
        if head.seq > 0 {
            problems.push("the head file is missing or unreadable".to_owned());
        }
        return;
    };
    if !was_recovered && newest.seq > 0 {
        problems.push(format!(
            "the sled database is missing but the head file says the log reached entry {}",
            newest.seq
        ));
        return;
    }
    if newest.seq > head.seq {
        problems.push(format!(
            "the log ends at entry {} but entry {} was written before (truncated or rolled back)",
            head.seq, newest.seq
        ));
        return;
    }
    for h in file_heads {
        if h.seq == 0 {
            continue;
        }
        if chains_at.get(&h.seq).is_some_and(|c| *c != h.chain) {
            problems.push(format!("log entry {} differs from the one written before", h.seq));
        }
    }
}

/// Reads both head slots; returns the valid ones.
fn read_head_file(path: &Path) -> Vec<Head> {
    let mut bytes = Vec::new();
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    if file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    bytes.chunks_exact(HEAD_SLOT_LEN as usize).filter_map(parse_head_slot).collect()
}

fn parse_head_slot(slot: &[u8]) -> Option<Head> {
    if &slot[..8] != HEAD_MAGIC {
        return None;
    }
    let sum: [u8; 32] = Sha256::digest(&slot[..48]).into();
    if slot[48..64] != sum[..16] {
        return None;
    }
    let seq = u64::from_le_bytes(slot[8..16].try_into().ok()?);
    let chain: Chain = slot[16..48].try_into().ok()?;
    Some(Head { seq, chain })
}

fn head_slot(head: Head) -> [u8; 64] {
    let mut slot = [0u8; 64];
    slot[..8].copy_from_slice(HEAD_MAGIC);
    slot[8..16].copy_from_slice(&head.seq.to_le_bytes());
    slot[16..48].copy_from_slice(&head.chain);
    let sum: [u8; 32] = Sha256::digest(&slot[..48]).into();
    slot[48..64].copy_from_slice(&sum[..16]);
    slot
}

/// The writer's side of the storage.
pub(crate) struct Store {
    pub(crate) db: sled::Db,
    paths: Paths,
    head_file: File,
    pub(crate) head: Head,
}

impl Store {
    /// Prepares a verified database for writing.
    pub(crate) fn new(db: sled::Db, paths: &Paths, head: Head) -> Result<Self, LedgerError> {
        let storage = |what: &str, err: &dyn std::fmt::Display| {
            LedgerError::Storage(format!("{what} in {}: {err}", paths.dir.display()))
        };
        let head_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&paths.head)
            .map_err(|err| storage("opening the head file", &err))?;
        if db.get(KEY_FORMAT).map_err(|err| storage("reading", &err))?.is_none() {
            db.insert(KEY_FORMAT, FORMAT).map_err(|err| storage("writing", &err))?;
            db.flush().map_err(|err| storage("flushing", &err))?;
        }
        let store = Self { db, paths: paths.clone(), head_file, head };
        // Both slots start at the verified head, so an older slot never outlives a rollback check.
        store.write_head_slot(head, 0).map_err(|err| storage("writing the head file", &err))?;
        store.write_head_slot(head, 1).map_err(|err| storage("writing the head file", &err))?;
        Ok(store)
    }

    /// A full scan of the database as it is on disk now (between batches).
    pub(crate) fn audit(&self) -> super::AuditReport {
        super::AuditReport::from(scan(&self.db, &self.paths, true))
    }

    fn write_head_slot(&self, head: Head, slot: u64) -> std::io::Result<()> {
        self.head_file.write_all_at(&head_slot(head), slot * HEAD_SLOT_LEN)
    }

    /// Writes `entries` and the accounts they touched in one atomic batch, flushes once, then
    /// records the new head in the head file. Returns only when all of it is durable.
    pub(crate) fn commit(&mut self, entries: &[Entry], state: &LedgerState) -> Result<(), String> {
        let mut batch = sled::Batch::default();
        let mut head = self.head;
        let mut touched: Vec<&str> = Vec::new();
        for entry in entries {
            assert_eq!(entry.seq, head.seq + 1, "entries are committed in order, without gaps");
            let chain = chain_next(&head.chain, entry);
            batch.insert(&log_key(entry.seq), encode(&Record { entry: entry.clone(), chain }));
            head = Head { seq: entry.seq, chain };
            for l in &entry.legs {
                touched.push(&l.debit);
                touched.push(&l.credit);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for name in touched {
            batch.insert(account_key(name), encode(&state.account(name)));
        }
        batch.insert(KEY_HEAD, encode(&head));
        self.db.apply_batch(batch).map_err(|err| format!("writing a batch failed: {err}"))?;
        self.db.flush().map_err(|err| format!("flushing failed: {err}"))?;
        self.write_head_slot(head, head.seq % 2)
            .map_err(|err| format!("writing the head file failed: {err}"))?;
        self.head = head;
        Ok(())
    }
}

/// Reads one stored account.
pub(crate) fn read_account(db: &sled::Db, name: &str) -> Result<Option<Account>, String> {
    match db.get(account_key(name)).map_err(|err| err.to_string())? {
        Some(v) => decode(&v).map(Some),
        None => Ok(None),
    }
}

/// Iterates the log, oldest first or newest first.
pub(crate) fn log_entries(
    db: &sled::Db,
    newest_first: bool,
) -> Box<dyn Iterator<Item = Result<Entry, String>> + '_> {
    let iter = db.scan_prefix([PREFIX_LOG]);
    let map = |item: sled::Result<(sled::IVec, sled::IVec)>| {
        let (_, v) = item.map_err(|err| err.to_string())?;
        decode::<Record>(&v).map(|r| r.entry)
    };
    if newest_first {
        Box::new(iter.rev().map(map))
    } else {
        Box::new(iter.map(map))
    }
}
