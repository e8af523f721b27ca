//! `aimatrix-node status`: what the running node is doing, from its control API.

use std::io::Write;
use std::process::ExitCode;

use aimatrix_protocol::node::AcceptMode;
use clap::Args;

use super::{now_ms, relative};
use crate::api::args::ApiArgs;
use crate::api::views::StatusView;
use crate::client::Client;

/// Show the running node's peer id, addresses, connections, relay, running jobs and the
/// credits it has earned.
///
/// Asks the local control API of `aimatrix-node join`, which must be running (see --api).
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let addr = args.api.addr(None).map_err(anyhow::Error::msg)?;
    let status = Client::new(addr).status()?;
    if args.json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print_human(&status, now_ms())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Label column width.
const LABEL: usize = 12;

fn print_human(s: &StatusView, now_ms: u64) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let mut line = |label: &str, text: &str| writeln!(out, "{label:<LABEL$}{text}");
    line("peer id", &s.peer_id)?;
    if s.listen_addrs.is_empty() {
        line("listening", "on no address yet")?;
    }
    for (i, addr) in s.listen_addrs.iter().enumerate() {
        line(if i == 0 { "listening" } else { "" }, addr)?;
    }
    for (i, relay) in s.relays.iter().enumerate() {
        let link = if relay.connected { "connected" } else { "not connected" };
        let why = match &relay.vouched_by {
            Some(by) => format!(", vouched for by {by}"),
            None => String::new(),
        };
        let label = if i == 0 { "relays" } else { "" };
        line(label, &format!("{} at {} ({link}{why})", relay.peer_id, relay.address))?;
    }
    let peers = &s.network.peers;
    line(
        "peers",
        &format!("{} relays and {} nodes connected", peers.relays.len(), peers.nodes.len()),
    )?;
    let reachable = match s.network.nat {
        aimatrix_net::NatStatus::Unknown => "not tested yet".to_owned(),
        aimatrix_net::NatStatus::Public => {
            format!("yes, at {}", s.network.external_addrs.join(", "))
        }
        aimatrix_net::NatStatus::Private => {
            "no: behind a NAT or firewall; reached through a relay".to_owned()
        }
    };
    line("reachable", &reachable)?;
    let dht = &s.network.dht;
    let mode = match dht.mode {
        aimatrix_net::DhtMode::Server => "server",
        aimatrix_net::DhtMode::Client => "client",
    };
    let refused: u64 = dht.refused.values().sum();
    line(
        "dht",
        &format!(
            "{mode}; {} records, {} providers of {} classes held; {refused} entries refused",
            dht.records, dht.providers, dht.provider_keys
        ),
    )?;
    let accepting = match (s.draining, s.accept_mode) {
        (true, _) => "nothing new: the node is shutting down",
        (false, AcceptMode::Auto) => "auto: claims matching offers by itself",
        (false, AcceptMode::Manual) => "manual: `aimatrix-node compute accept <job_id>` claims",
    };
    line("accepting", accepting)?;
    line("claims", &format!("{} sent since the node started", s.claims_sent))?;
    line("earned", &format!("{} credits ({} jobs run)", s.earned, s.jobs_run))?;
    if s.running.is_empty() {
        line("running", "none")?;
    } else {
        let head = format!(
            "{:<32}  {:>5}  {:<15}  {:>8}  {:<12}  NAME",
            "JOB", "LEASE", "KIND", "PROGRESS", "DEADLINE"
        );
        line("running", &head)?;
        for r in &s.running {
            let row = format!(
                "{:<32}  {:>5}  {:<15}  {:>7}%  {:<12}  {}",
                r.job_id,
                r.lease,
                r.kind.name(),
                r.percent,
                relative(r.deadline_ms, now_ms),
                r.name
            );
            line("", &row)?;
        }
    }
    if !s.reject_counts.is_empty() {
        let counts: Vec<String> =
            s.reject_counts.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        line("rejected", &counts.join(", "))?;
    }
    Ok(())
}
