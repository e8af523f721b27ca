//! `studio-relay status`: what the running relay knows about itself and the network.

use std::process::ExitCode;

use clap::Args;
use studio_relay::api::ApiArg;
use studio_relay::client::RelayClient;

/// Show the running relay: peer id, address, connected peers, known nodes, open jobs and the
/// counts of rejected messages.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    api: ApiArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let status = RelayClient::new(args.api.addr).status()?;
    if args.json {
        println!("{}", serde_json::to_string(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(why) = &status.halted {
        println!("HALTED       {why}: the relay takes no work until it is restarted");
    }
    println!("peer id      {}", status.peer_id);
    for addr in &status.listen_addrs {
        println!("address      {addr}");
    }
    println!("peers        {} connected", status.connected_peers.len());
    println!("known nodes  {}", status.known_nodes);
    println!("open jobs    {}", status.jobs_open);
    if status.ledger_expired > 0 {
        println!("expired      {} reservation(s) voided by the ledger", status.ledger_expired);
    }
    for (reason, n) in &status.reject_counts {
        println!("rejected     {n} × {reason}");
    }
    let peers = &status.network.peers;
    println!("peer kinds   {} relays, {} nodes", peers.relays.len(), peers.nodes.len());
    let dht = &status.network.dht;
    println!(
        "dht          {} records, {} providers of {} classes held",
        dht.records, dht.providers, dht.provider_keys
    );
    for (reason, n) in &dht.refused {
        println!("dht refused  {n} × {reason}");
    }
    Ok(ExitCode::SUCCESS)
}
