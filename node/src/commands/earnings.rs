//! `aimatrix-node earnings`: the credits this node's receipts say it earned and, with
//! `--check`, whether a relay's ledger holds every one of them.
//!
//! Receipts are the relay's signed word that a result was paid; the ledger is where the credits
//! are. A relay only signs a receipt once its ledger has the payment (docs/ledger.md, "One
//! order of effects"), so the two agree; this command lets a node operator see that for
//! themselves, and names each job where they do not: a receipt the ledger does not pay, or a
//! payment no receipt reports (a receipt still on its way, which the node asks for again).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use aimatrix_protocol::identity::Keypair;
use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::data_dir;
use crate::history::{self, ReceiptRecord};

/// Most ledger entries of one account the relay's API returns (its `HISTORY_LIMIT_MAX`).
const HISTORY_LIMIT: usize = 10_000;

/// Show the credits this node's receipts say it earned; with --check, compare them with what a
/// relay's ledger paid this node.
///
/// Reads the receipts in the node's data directory (the node may be running). --check asks the
/// relay's HTTP API (the address `studio-relay serve --api` listens on) for the ledger's
/// payments to this node and lists every job where the two disagree; it exits 1 if any does.
#[derive(Debug, Args)]
pub(crate) struct EarningsArgs {
    /// The node's data directory (default: $XDG_DATA_HOME/aimatrix or ~/.local/share/aimatrix)
    #[arg(long, env = "AIMATRIX_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Compare the receipts of the relay at this HTTP API address (IP:PORT) with its ledger
    #[arg(long, value_name = "RELAY_API")]
    check: Option<SocketAddr>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What `earnings` found.
#[derive(Debug, Serialize)]
struct EarningsView {
    /// This node's PeerId, its ledger account.
    node: String,
    /// Receipts kept, and credits they paid, by relay PeerId.
    receipts: BTreeMap<String, RelayReceipts>,
    /// The comparison with one relay's ledger, with --check.
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<CheckView>,
}

#[derive(Debug, Default, Serialize)]
struct RelayReceipts {
    receipts: u64,
    paid_receipts: u64,
    credits: u64,
}

/// Receipts of one relay against its ledger.
#[derive(Debug, Serialize)]
struct CheckView {
    relay: String,
    api: String,
    /// Credits the receipts of this relay say were paid.
    receipts_credits: u64,
    /// Credits the ledger's payments to this node add up to.
    ledger_credits: u128,
    /// Every job where the two differ.
    disagreements: Vec<JobDifference>,
    /// Whether the ledger had more payments than one request returns (then only the newest
    /// are compared job by job).
    ledger_history_truncated: bool,
    agrees: bool,
}

#[derive(Debug, Serialize)]
struct JobDifference {
    job_id: String,
    receipts: u64,
    ledger: u128,
}

pub(crate) fn run(args: EarningsArgs) -> anyhow::Result<ExitCode> {
    let dir = data_dir::resolve(args.data_dir.as_deref())?;
    let key_path = dir.join("node.key");
    if !key_path.exists() {
        bail!(
            "no node identity in {} (node.key): this node has not joined yet, or pass the \
             --data-dir it joins with",
            dir.display()
        );
    }
    let (key, _) = Keypair::load_or_create(&key_path)?;
    let node = key.public().account_name();
    let receipts = history::read_receipts(&dir)?;
    let mut by_relay: BTreeMap<String, RelayReceipts> = BTreeMap::new();
    for r in &receipts {
        let entry = by_relay.entry(r.relay.clone()).or_default();
        entry.receipts += 1;
        entry.credits = entry.credits.saturating_add(r.paid());
        if r.paid() > 0 {
            entry.paid_receipts += 1;
        }
    }
    let check = match args.check {
        Some(api) => Some(check(&RelayApi::new(api), &node, &receipts)?),
        None => None,
    };
    let agrees = check.as_ref().is_none_or(|c| c.agrees);
    let view = EarningsView { node, receipts: by_relay, check };
    if args.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print_human(&view)?;
    }
    Ok(if agrees { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Compares the receipts signed by the relay at `api` with its ledger's payments to `node`.
fn check(api: &RelayApi, node: &str, receipts: &[ReceiptRecord]) -> anyhow::Result<CheckView> {
    let relay = api.get("/v1/status")?;
    let relay = relay["peer_id"]
        .as_str()
        .ok_or_else(|| anyhow!("the relay at {} did not say its peer id", api.addr))?
        .to_owned();
    let mut from_receipts: BTreeMap<String, u64> = BTreeMap::new();
    for r in receipts.iter().filter(|r| r.relay == relay && r.paid() > 0) {
        let credits = from_receipts.entry(r.job_id.clone()).or_default();
        *credits = credits.saturating_add(r.paid());
    }
    let history = api.get(&format!("/v1/ledger/history/{node}?limit={HISTORY_LIMIT}"))?;
    let entries = history
        .as_array()
        .ok_or_else(|| anyhow!("the relay at {} answered its history with no list", api.addr))?;
    let mut from_ledger: BTreeMap<String, u128> = BTreeMap::new();
    for entry in entries.iter().filter(|e| e["kind"] == "pay") {
        let job = entry["job_id"].as_str().unwrap_or_default().to_owned();
        let legs = entry["legs"].as_array().map(Vec::as_slice).unwrap_or_default();
        let to_node = legs
            .iter()
            .filter(|l| l["credit"] == node)
            .filter_map(|l| l["amount"].as_u64())
            .map(u128::from)
            .sum::<u128>();
        *from_ledger.entry(job).or_default() += to_node;
    }
    let truncated = entries.len() >= HISTORY_LIMIT;
    let mut disagreements = Vec::new();
    let jobs: std::collections::BTreeSet<&String> =
        from_receipts.keys().chain(from_ledger.keys()).collect();
    for job in jobs {
        let (receipts, ledger) = (from_receipts.get(job).copied(), from_ledger.get(job).copied());
        // Past the history's reach, a receipt's payment is not listed: not a disagreement.
        if truncated && ledger.is_none() {
            continue;
        }
        if receipts.map(u128::from) != ledger {
            disagreements.push(JobDifference {
                job_id: job.clone(),
                receipts: receipts.unwrap_or(0),
                ledger: ledger.unwrap_or(0),
            });
        }
    }
    let receipts_credits = from_receipts.values().fold(0u64, |a, b| a.saturating_add(*b));
    let ledger_credits = from_ledger.values().sum();
    let agrees =
        disagreements.is_empty() && (truncated || u128::from(receipts_credits) == ledger_credits);
    Ok(CheckView {
        relay,
        api: api.addr.to_string(),
        receipts_credits,
        ledger_credits,
        disagreements,
        ledger_history_truncated: truncated,
        agrees,
    })
}

fn print_human(view: &EarningsView) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "node        {}", view.node)?;
    if view.receipts.is_empty() {
        writeln!(out, "receipts    none yet")?;
    }
    for (relay, r) in &view.receipts {
        writeln!(
            out,
            "receipts    {} from relay {relay} ({} paid): {} credits",
            r.receipts, r.paid_receipts, r.credits
        )?;
    }
    let Some(c) = &view.check else { return Ok(()) };
    writeln!(
        out,
        "ledger      {} credits paid to this node at relay {} ({})",
        c.ledger_credits, c.relay, c.api
    )?;
    if c.ledger_history_truncated {
        writeln!(
            out,
            "            (only the newest {HISTORY_LIMIT} payments compared job by job)"
        )?;
    }
    if c.agrees {
        writeln!(
            out,
            "agrees      every receipt of this relay is paid in its ledger, and nothing more"
        )?;
        return Ok(());
    }
    writeln!(out, "DISAGREES   {} job(s):", c.disagreements.len())?;
    for d in &c.disagreements {
        let what = if d.ledger == 0 {
            "a receipt the ledger does not pay: tell the relay's operator (`studio-relay ledger audit`)"
        } else if d.receipts == 0 {
            "paid with no receipt here yet: the node asks the relay for it while it runs"
        } else {
            "the amounts differ: tell the relay's operator"
        };
        writeln!(
            out,
            "  job {}: receipts {} credits, ledger {} credits ({what})",
            d.job_id, d.receipts, d.ledger
        )?;
    }
    Ok(())
}

/// A blocking client of a relay's HTTP API, for the two reads `--check` needs.
struct RelayApi {
    agent: ureq::Agent,
    addr: SocketAddr,
}

impl RelayApi {
    fn new(addr: SocketAddr) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .proxy(None)
            .build();
        Self { agent: config.into(), addr }
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("http://{}{path}", self.addr);
        let mut response = self.agent.get(&url).call().map_err(|e| {
            anyhow!(
                "cannot read {url} ({e}): is the relay's HTTP API at {}? `studio-relay serve` \
                 prints where it listens (--api)",
                self.addr
            )
        })?;
        response.body_mut().read_json().with_context(|| format!("{url} answered no JSON"))
    }
}
