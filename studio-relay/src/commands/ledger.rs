//! `studio-relay ledger ...`: mint, balance, history, audit, export (and a hidden stress writer).
//!
//! Today these work directly on the ledger files in `--data-dir` while the relay is stopped
//! (sled locks the database, so a running relay makes them fail with a message saying so).
//! Going through the running relay's HTTP API arrives with the relay itself (issue 6).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use studio_relay::ledger::{Account, Applied, Entry, Ledger, LedgerError, LegKind, Op, OpError};

/// Work on the credit ledger.
///
/// These commands open the ledger files in the data directory directly, so the relay must be
/// stopped. Going through a running relay's HTTP API arrives with the relay (issue 6).
#[derive(Debug, Args)]
pub(crate) struct LedgerArgs {
    /// The relay's data directory; the ledger lives in its `ledger/` folder
    /// [default: $XDG_DATA_HOME/aimatrix-relay, else ~/.local/share/aimatrix-relay]
    #[arg(long, global = true, env = "AIMATRIX_RELAY_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: LedgerCommand,
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Create credits: a posted transfer from the issuance account, recorded and audited like
    /// any other.
    Mint {
        /// The account credited (a requester name or a node's PeerId).
        account: String,
        /// Whole credits to mint.
        amount: u64,
        /// Free text kept with the transfer.
        #[arg(long, default_value = "")]
        memo: String,
        /// Transfer id (decimal u128); repeating a mint with the same id and fields does
        /// nothing. Default: a new id from the clock.
        #[arg(long)]
        id: Option<u128>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show an account's balance: available, pending (held in reservations), posted credits
    /// and debits.
    Balance {
        /// The account.
        account: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the transfers that moved an account's credits, newest first, with their job ids.
    History {
        /// The account.
        account: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print one JSON object per transfer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Recompute every balance from the transfer log and check the invariants: debits equal
    /// credits (posted and pending), no negative available balance, every reservation resolved
    /// at most once, the log's hash chain intact. Exit 0 when clean, 1 listing each discrepancy.
    Audit {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write every transfer, oldest first, to stdout.
    Export {
        /// `csv` (one row per leg) or `json` (one object per transfer, per line).
        #[arg(long, value_enum)]
        format: ExportFormat,
    },
    /// Test tool: apply deterministic operations from many threads and print each acknowledged
    /// id (`ack ID`) once it is durable.
    #[command(hide = true)]
    Stress {
        /// Operation rounds per thread (4 transfers each).
        #[arg(long, default_value_t = 1000)]
        rounds: u64,
        /// Submitting threads.
        #[arg(long, default_value_t = 16)]
        threads: u64,
        /// Selects the ids; the same seed repeats the same operations.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Output formats of `ledger export`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ExportFormat {
    /// Comma-separated values with a header row, one row per leg.
    Csv,
    /// JSON lines, one object per transfer.
    Json,
}

pub(crate) fn run(args: LedgerArgs) -> anyhow::Result<ExitCode> {
    let dir = ledger_dir(args.data_dir.as_deref())?;
    match args.command {
        LedgerCommand::Mint { account, amount, memo, id, json } => {
            mint(&dir, &account, amount, &memo, id, json)
        }
        LedgerCommand::Balance { account, json } => balance(&dir, &account, json),
        LedgerCommand::History { account, limit, json } => history(&dir, &account, limit, json),
        LedgerCommand::Audit { json } => audit(&dir, json),
        LedgerCommand::Export { format } => export(&dir, format),
        LedgerCommand::Stress { rounds, threads, seed } => stress(&dir, rounds, threads, seed),
    }
}

/// `DIR/ledger`, with DIR from the flag, else the default relay data directory.
fn ledger_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match explicit {
        Some(dir) => dir.to_owned(),
        None => aimatrix_cli_support::default_data_dir("aimatrix-relay")
            .context("cannot find a data directory: set --data-dir, XDG_DATA_HOME or HOME")?,
    };
    Ok(dir.join("ledger"))
}

fn open(dir: &Path) -> anyhow::Result<Ledger> {
    Ok(Ledger::open(dir)?)
}

/// Opens for reading: refuses to create a ledger where there is none.
fn open_existing(dir: &Path) -> anyhow::Result<Ledger> {
    if !dir.join("db").exists() {
        bail!("no ledger in {} (mint credits first, or pass --data-dir)", dir.display());
    }
    open(dir)
}

fn print_json<T: Serialize>(out: &mut impl Write, value: &T) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn mint(
    dir: &Path,
    account: &str,
    amount: u64,
    memo: &str,
    id: Option<u128>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let id = match id {
        Some(id) => id,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_nanos(),
    };
    let ledger = open(dir)?;
    let applied = match ledger.mint(id, account, amount, memo) {
        Ok(applied) => applied,
        Err(LedgerError::Rejected(err)) => bail!("mint refused: {err}"),
        Err(err) => return Err(err.into()),
    };
    let balance = ledger.balance(account)?;
    #[derive(Serialize)]
    struct Minted<'a> {
        id: String,
        seq: u64,
        already_recorded: bool,
        account: &'a str,
        amount: u64,
        available: i128,
    }
    let out = Minted {
        id: id.to_string(),
        seq: applied.seq(),
        already_recorded: matches!(applied, Applied::Existing(_)),
        account,
        amount,
        available: balance.available(),
    };
    let mut stdout = std::io::stdout().lock();
    if json {
        print_json(&mut stdout, &out)?;
    } else {
        let again = if out.already_recorded { " (already recorded)" } else { "" };
        writeln!(
            stdout,
            "minted {amount} to {account}{again}: transfer {id}, log entry {}; available {}",
            out.seq, out.available
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct BalanceOut<'a> {
    account: &'a str,
    available: i128,
    pending: u128,
    posted_credits: u128,
    posted_debits: u128,
    pending_credits: u128,
}

fn balance(dir: &Path, account: &str, json: bool) -> anyhow::Result<ExitCode> {
    let ledger = open_existing(dir)?;
    let a: Account = ledger.balance(account)?;
    let out = BalanceOut {
        account,
        available: a.available(),
        pending: a.debits_pending,
        posted_credits: a.credits_posted,
        posted_debits: a.debits_posted,
        pending_credits: a.credits_pending,
    };
    let mut stdout = std::io::stdout().lock();
    if json {
        print_json(&mut stdout, &out)?;
    } else {
        writeln!(stdout, "account         {account}")?;
        writeln!(stdout, "available       {}", out.available)?;
        writeln!(stdout, "pending         {}", out.pending)?;
        writeln!(stdout, "posted_credits  {}", out.posted_credits)?;
        writeln!(stdout, "posted_debits   {}", out.posted_debits)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One transfer as the CLI shows it.
#[derive(Serialize)]
struct TransferOut {
    seq: u64,
    kind: &'static str,
    id: Option<String>,
    job_id: Option<String>,
    reserve_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memo: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    change: Option<i128>,
    legs: Vec<LegOut>,
}

#[derive(Serialize)]
struct LegOut {
    kind: &'static str,
    debit: String,
    credit: String,
    amount: u128,
}

impl TransferOut {
    fn new(entry: Entry, account: Option<&str>) -> Self {
        let change = account.map(|a| available_change(&entry, a));
        let memo = match &entry.op {
            Op::Mint { memo, .. } => Some(memo.clone()),
            _ => None,
        };
        Self {
            seq: entry.seq,
            kind: entry.op.kind(),
            id: entry.op.id().map(|id| id.to_string()),
            job_id: entry.op.job_id().map(hex::encode),
            reserve_id: match entry.op {
                Op::Reserve { .. } | Op::Mint { .. } => None,
                _ => entry.op.reserve_id().map(|id| id.to_string()),
            },
            memo,
            change,
            legs: entry
                .legs
                .into_iter()
                .map(|l| LegOut {
                    kind: l.kind.name(),
                    debit: l.debit,
                    credit: l.credit,
                    amount: l.amount,
                })
                .collect(),
        }
    }
}

/// How the entry changed `account`'s available balance.
fn available_change(entry: &Entry, account: &str) -> i128 {
    let mut change: i128 = 0;
    for l in &entry.legs {
        let a = i128::try_from(l.amount).unwrap_or(i128::MAX);
        if l.debit == account {
            change -= match l.kind {
                LegKind::Posted | LegKind::Pending => a,
                LegKind::PostPending => 0,
                LegKind::VoidPending => -a,
            };
        }
        if l.credit == account {
            change += match l.kind {
                LegKind::Posted | LegKind::PostPending => a,
                LegKind::Pending | LegKind::VoidPending => 0,
            };
        }
    }
    change
}

fn history(dir: &Path, account: &str, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let ledger = open_existing(dir)?;
    let entries = ledger.history(account, limit)?;
    let mut stdout = std::io::stdout().lock();
    if !json {
        writeln!(
            stdout,
            "{:>8}  {:<8} {:>10}  {:<32}  transfer id",
            "entry", "kind", "change", "job"
        )?;
    }
    for entry in entries {
        let t = TransferOut::new(entry, Some(account));
        if json {
            print_json(&mut stdout, &t)?;
        } else {
            writeln!(
                stdout,
                "{:>8}  {:<8} {:>+10}  {:<32}  {}",
                t.seq,
                t.kind,
                t.change.unwrap_or(0),
                t.job_id.as_deref().unwrap_or("-"),
                t.id.as_deref().unwrap_or("(expiry)")
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn audit(dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let report = Ledger::audit(dir)?;
    let clean = report.problems.is_empty();
    let mut stdout = std::io::stdout().lock();
    if json {
        #[derive(Serialize)]
        struct AuditOut<'a> {
            clean: bool,
            entries: u64,
            accounts: usize,
            open_reservations: usize,
            problems: &'a [String],
        }
        print_json(
            &mut stdout,
            &AuditOut {
                clean,
                entries: report.entries,
                accounts: report.accounts,
                open_reservations: report.open_reservations,
                problems: &report.problems,
            },
        )?;
    } else if clean {
        writeln!(
            stdout,
            "clean: {} transfers replayed, {} accounts match, {} reservations open, \
             debits equal credits",
            report.entries, report.accounts, report.open_reservations
        )?;
    } else {
        writeln!(stdout, "{} discrepancies:", report.problems.len())?;
        for p in &report.problems {
            writeln!(stdout, "  {p}")?;
        }
    }
    Ok(if clean { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn export(dir: &Path, format: ExportFormat) -> anyhow::Result<ExitCode> {
    let ledger = open_existing(dir)?;
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    if let ExportFormat::Csv = format {
        writeln!(stdout, "seq,kind,id,job_id,reserve_id,leg,debit,credit,amount,memo")?;
    }
    for entry in ledger.entries() {
        let t = TransferOut::new(entry?, None);
        match format {
            ExportFormat::Json => print_json(&mut stdout, &t)?,
            ExportFormat::Csv => {
                for l in &t.legs {
                    writeln!(
                        stdout,
                        "{},{},{},{},{},{},{},{},{},{}",
                        t.seq,
                        t.kind,
                        t.id.as_deref().unwrap_or(""),
                        t.job_id.as_deref().unwrap_or(""),
                        t.reserve_id.as_deref().unwrap_or(""),
                        l.kind,
                        csv_field(&l.debit),
                        csv_field(&l.credit),
                        l.amount,
                        csv_field(t.memo.as_deref().unwrap_or(""))
                    )?;
                }
            }
        }
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// The hidden crash-test writer: `threads` threads each run `rounds` of mint, reserve, pay,
/// release (every fifth reservation already timed out, and every thread expires now and then),
/// printing `ack ID` for each op once durable.
fn stress(dir: &Path, rounds: u64, threads: u64, seed: u64) -> anyhow::Result<ExitCode> {
    let ledger = open(dir)?;
    let stdout = std::sync::Mutex::new(std::io::stdout());
    let ack = |what: String| -> anyhow::Result<()> {
        let mut out = stdout.lock().map_err(|_| anyhow::anyhow!("stdout lock poisoned"))?;
        writeln!(out, "{what}")?;
        out.flush()?;
        Ok(())
    };
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut workers = Vec::new();
        for t in 0..threads {
            let (ledger, ack) = (&ledger, &ack);
            workers.push(scope.spawn(move || -> anyhow::Result<()> {
                let requester = format!("stress-{seed}-{t}");
                let node = format!("node-{}", t % 3);
                for round in 0..rounds {
                    let base =
                        (u128::from(seed) << 96) | (u128::from(t) << 64) | (u128::from(round) << 8);
                    let job_id = base.to_le_bytes();
                    let timeout_at_ms = if round % 5 == 0 { 0 } else { u64::MAX };
                    let ops = [
                        Op::Mint {
                            id: base,
                            account: requester.clone(),
                            amount: 100,
                            memo: "stress".into(),
                        },
                        Op::Reserve {
                            id: base + 1,
                            job_id,
                            requester: requester.clone(),
                            amount: 60,
                            timeout_at_ms,
                        },
                        Op::Pay {
                            id: base + 2,
                            reserve_id: base + 1,
                            job_id,
                            node: node.clone(),
                            amount: 30,
                            fee: 3,
                        },
                        Op::Release { id: base + 3, reserve_id: base + 1, job_id, amount: 27 },
                    ];
                    for op in ops {
                        let id = op.id().unwrap_or_default();
                        match ledger.submit(op) {
                            Ok(_) => ack(format!("ack {id}"))?,
                            // An expiry from another thread may have closed the reservation.
                            Err(LedgerError::Rejected(OpError::NotOpen { .. })) => {
                                ack(format!("refused {id}"))?;
                            }
                            Err(err) => return Err(err.into()),
                        }
                    }
                    if round % 16 == 15 {
                        let voided = ledger.expire(1)?;
                        ack(format!("expired {}", voided.len()))?;
                    }
                }
                Ok(())
            }));
        }
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("a stress thread panicked"))??;
        }
        Ok(())
    })?;
    ledger.close();
    Ok(ExitCode::SUCCESS)
}
