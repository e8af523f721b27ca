//! `studio-relay ledger ...`: mint, balance, history, audit, export (and a hidden stress writer).
//!
//! With `--data-dir` (or `AIMATRIX_RELAY_DATA_DIR`) these work directly on the ledger files
//! while the relay is stopped (sled locks the database, so a running relay makes them fail with
//! a message saying so). Without it they go through the running relay's HTTP API (`--api`);
//! both print the same JSON (the views in `studio_relay::api::types`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use studio_relay::api::types::{AuditView, BalanceView, MintRequest, MintView, TransferView};
use studio_relay::api::ApiArg;
use studio_relay::client::RelayClient;
use studio_relay::ledger::{Ledger, LedgerError, Op, OpError};
use studio_relay::store::JobStore;

/// Work on the credit ledger.
///
/// By default these go through the running relay's HTTP API (--api). With --data-dir they open
/// the ledger files in that directory directly instead, so the relay must be stopped.
#[derive(Debug, Args)]
pub(crate) struct LedgerArgs {
    /// Work offline on the ledger in this relay data directory (its `ledger/` folder) instead
    /// of going through the running relay's API; the relay must be stopped
    #[arg(long, global = true, env = "AIMATRIX_RELAY_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    api: ApiArg,
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

/// Where the ledger is: its files (offline) or a running relay.
enum Target {
    Dir(PathBuf),
    Api(RelayClient),
}

pub(crate) fn run(args: LedgerArgs) -> anyhow::Result<ExitCode> {
    if let LedgerCommand::Stress { rounds, threads, seed } = args.command {
        // The crash-test writer always works on the files.
        return stress(&ledger_dir(args.data_dir.as_deref())?, rounds, threads, seed);
    }
    let target = match &args.data_dir {
        Some(dir) => Target::Dir(dir.join("ledger")),
        None => Target::Api(RelayClient::new(args.api.addr)),
    };
    match args.command {
        LedgerCommand::Mint { account, amount, memo, id, json } => {
            mint(&target, &account, amount, &memo, id, json)
        }
        LedgerCommand::Balance { account, json } => balance(&target, &account, json),
        LedgerCommand::History { account, limit, json } => history(&target, &account, limit, json),
        LedgerCommand::Audit { json } => audit(&target, json),
        LedgerCommand::Export { format } => export(&target, format),
        LedgerCommand::Stress { .. } => unreachable!("handled above"),
    }
}

/// `DIR/ledger`, with DIR from the flag, else the default relay data directory.
fn ledger_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(super::relay_data_dir(explicit)?.join("ledger"))
}

fn open(dir: &Path) -> anyhow::Result<Ledger> {
    Ok(Ledger::open(dir)?)
}

/// Opens for reading: refuses to create a ledger where there is none.
fn open_existing(dir: &Path) -> anyhow::Result<Ledger> {
    if !dir.join("db").exists() {
        bail!("no ledger in {} (mint credits first, or check --data-dir)", dir.display());
    }
    open(dir)
}

fn print_json<T: Serialize>(out: &mut impl Write, value: &T) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn mint(
    target: &Target,
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
    let out: MintView = match target {
        Target::Dir(dir) => {
            let ledger = open(dir)?;
            match studio_relay::api::mint_now(&ledger, id, account, amount, memo) {
                Ok(out) => out,
                Err(LedgerError::Rejected(err)) => bail!("mint refused: {err}"),
                Err(err) => return Err(err.into()),
            }
        }
        Target::Api(client) => client.mint(&MintRequest {
            account: account.to_owned(),
            amount,
            memo: memo.to_owned(),
            id: Some(id.to_string()),
        })?,
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

fn balance(target: &Target, account: &str, json: bool) -> anyhow::Result<ExitCode> {
    let out = match target {
        Target::Dir(dir) => BalanceView::new(account, &open_existing(dir)?.balance(account)?),
        Target::Api(client) => client.balance(account)?,
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

fn history(target: &Target, account: &str, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let transfers = match target {
        Target::Dir(dir) => open_existing(dir)?
            .history(account, limit)?
            .into_iter()
            .map(|entry| TransferView::new(entry, Some(account)))
            .collect(),
        Target::Api(client) => client.history(account, limit)?,
    };
    let mut stdout = std::io::stdout().lock();
    if !json {
        writeln!(
            stdout,
            "{:>8}  {:<8} {:>10}  {:<32}  transfer id",
            "entry", "kind", "change", "job"
        )?;
    }
    for t in transfers {
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

fn audit(target: &Target, json: bool) -> anyhow::Result<ExitCode> {
    let report = match target {
        Target::Dir(dir) => offline_audit(dir)?,
        Target::Api(client) => client.audit()?,
    };
    let clean = report.clean;
    let mut stdout = std::io::stdout().lock();
    if json {
        print_json(&mut stdout, &report)?;
    } else if clean {
        writeln!(
            stdout,
            "clean: {} transfers replayed, {} accounts match, {} reservations open, \
             debits equal credits{}",
            report.entries,
            report.accounts,
            report.open_reservations,
            report.jobs.map_or_else(String::new, |n| format!(", {n} job records agree"))
        )?;
    } else {
        if !report.problems.is_empty() {
            writeln!(stdout, "{} discrepancies in the ledger:", report.problems.len())?;
            for p in &report.problems {
                writeln!(stdout, "  {p}")?;
            }
        }
        if !report.disagreements.is_empty() {
            writeln!(
                stdout,
                "{} disagreements between the job store and the ledger:",
                report.disagreements.len()
            )?;
            for d in &report.disagreements {
                writeln!(stdout, "  {d}")?;
            }
        }
    }
    Ok(if clean { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The ledger's audit in `dir`, cross-checked with the job store beside it (`../jobs`) when
/// there is one.
fn offline_audit(dir: &Path) -> anyhow::Result<AuditView> {
    let report = Ledger::audit(dir)?;
    let jobs_dir = dir.parent().map(|d| d.join("jobs")).filter(|d| d.join("db").exists());
    let Some(jobs_dir) = jobs_dir else {
        eprintln!("no job store beside {}: the ledger is audited on its own", dir.display());
        return Ok(AuditView::new(report, None));
    };
    let check = JobStore::open(&jobs_dir)?.cross_check(&report.books)?;
    Ok(AuditView::new(report, Some(check)))
}

fn export(target: &Target, format: ExportFormat) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    if let ExportFormat::Csv = format {
        writeln!(stdout, "seq,kind,id,job_id,reserve_id,leg,debit,credit,amount,memo")?;
    }
    match target {
        Target::Dir(dir) => {
            for entry in open_existing(dir)?.entries() {
                write_transfer(&mut stdout, &TransferView::new(entry?, None), format)?;
            }
        }
        Target::Api(client) => {
            for t in client.export()? {
                write_transfer(&mut stdout, &t, format)?;
            }
        }
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn write_transfer(
    stdout: &mut impl Write,
    t: &TransferView,
    format: ExportFormat,
) -> anyhow::Result<()> {
    match format {
        ExportFormat::Json => print_json(stdout, t)?,
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
    Ok(())
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
