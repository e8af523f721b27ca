//! `studio-relay serve`: the relay process. It owns one `RelayCore` and carries bytes (libp2p),
//! time, ledger writes, job records and blobs in and out of it. See docs/network.md.

mod driver;
mod training;
mod views;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aimatrix_net::{NetConfig, Role};
use aimatrix_protocol::identity::Keypair;
use aimatrix_protocol::messages::RosterEntry;
use aimatrix_protocol::relay::{RelayConfig, RelayCore};
use anyhow::Context;
use clap::Args;
use libp2p::Multiaddr;
use studio_relay::api::{self, ApiArg, ApiState};
use studio_relay::ledger::Ledger;
use studio_relay::store::{BlobStore, JobStore};
use tokio_util::sync::CancellationToken;

/// Run the relay: accept jobs over the HTTP API, offer them to nodes, verify and pay.
///
/// The first line on stdout is the relay's dialable address, ending in `/p2p/<peer id>`: give it
/// to nodes as `aimatrix-node join --relay ADDR`. The identity (`relay.key`), the ledger, the job
/// records and the blobs live in the data directory; jobs survive a restart.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The relay's data directory (default: `$XDG_DATA_HOME/aimatrix-relay`).
    #[arg(long, value_name = "DIR", env = "AIMATRIX_RELAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on for peers (repeatable). Default: TCP and QUIC on port 7700 of every
    /// interface.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<Multiaddr>,
    /// An address at which other hosts reach this one (a public IP, a forwarded port;
    /// repeatable). Needed behind a NAT or when listening on 0.0.0.0.
    #[arg(long = "external", value_name = "MULTIADDR")]
    external: Vec<Multiaddr>,
    /// Another relay to peer with, ending in `/p2p/<peer id>` (repeatable): the relays keep
    /// connections to each other, so the DHT and gossip span all of them, and this relay
    /// vouches for them in its signed roster, so the nodes that trust it work for them too.
    #[arg(long = "peer", value_name = "MULTIADDR")]
    peer: Vec<Multiaddr>,
    #[command(flatten)]
    api: ApiArg,
    /// The relay fee, in basis points of each payment (100 = 1%).
    #[arg(long, value_name = "BPS", default_value_t = 0)]
    fee_bps: u16,
    /// Time added to a job's timeout to form a lease deadline; a node that vanishes is replaced
    /// once it passes.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    lease_grace_s: u64,
    /// How often an open job with free slots is announced again.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    reannounce_s: u64,
    /// Start even if the job store and the ledger disagree on a job that has ended (each
    /// disagreement is logged). Without it such a relay refuses to start and lists them; use
    /// it once you have looked at them with `studio-relay ledger audit --data-dir DIR`
    #[arg(long)]
    accept_disagreements: bool,
}

pub(crate) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let data_dir = crate::commands::relay_data_dir(args.data_dir.as_deref())?;
    let roster = roster_of(&args.peer)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let key_path = data_dir.join("relay.key");
    let (key, created) = Keypair::load_or_create(&key_path)?;
    if created {
        tracing::info!("created relay identity {}", key_path.display());
    }
    let ledger = Arc::new(Ledger::open(&data_dir.join("ledger"))?);
    let blobs = Arc::new(BlobStore::open(&data_dir.join("blobs"))?);
    let jobs = JobStore::open(&data_dir.join("jobs"))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listen = if args.listen.is_empty() {
            vec!["/ip4/0.0.0.0/tcp/7700".parse()?, "/ip4/0.0.0.0/udp/7700/quic-v1".parse()?]
        } else {
            args.listen.clone()
        };
        let (net, events) = aimatrix_net::spawn(NetConfig {
            keypair: key.clone(),
            listen,
            external: args.external.clone(),
            bootstrap: args.peer.clone(),
            role: Role::Relay,
            mdns: false,
            request_timeout: Duration::from_secs(30),
            node_peers: aimatrix_protocol::mesh::NODE_PEERS_DEFAULT,
        })
        .await
        .context("cannot start the network")?;
        let api_listener = tokio::net::TcpListener::bind(args.api.addr)
            .await
            .with_context(|| format!("cannot listen for the HTTP API on {}", args.api.addr))?;

        let config = RelayConfig {
            fee_bps: args.fee_bps,
            lease_grace_ms: args.lease_grace_s.saturating_mul(1000),
            reannounce_interval_ms: args.reannounce_s.saturating_mul(1000),
            ..RelayConfig::default()
        };
        let mut core =
            RelayCore::new(key, config, rand_core::RngCore::next_u64(&mut rand_core::OsRng));
        core.set_roster(driver::now_ms(), roster).map_err(anyhow::Error::msg)?;

        let address = dialable_address(&net.listen_addrs().await, net.local_peer_id())
            .context("the network listens on no TCP or QUIC address")?;
        // The first line of stdout is the contract with scripts and the devnet.
        println!("{address}");
        tracing::info!("HTTP API on http://{}", args.api.addr);

        let shutdown = CancellationToken::new();
        let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(256);
        let api_state =
            ApiState { commands: commands_tx, ledger: ledger.clone(), blobs: blobs.clone() };
        let api_task = tokio::spawn(api::serve(api_listener, api_state, shutdown.clone()));

        let mut relay = driver::Relay::new(core, net.clone(), ledger, blobs, jobs, address);
        relay.restore(args.accept_disagreements)?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            aimatrix_cli_support::shutdown_signal().await;
            stop.cancel();
        });
        relay.run(events, commands_rx, shutdown.clone()).await;
        shutdown.cancel();
        net.shutdown().await;
        let _ = api_task.await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The roster entries of the `--peer` relays: each one's id and its address without `/p2p`.
fn roster_of(peers: &[Multiaddr]) -> anyhow::Result<Vec<RosterEntry>> {
    use libp2p::multiaddr::Protocol;
    let mut out: Vec<RosterEntry> = Vec::new();
    for addr in peers {
        let mut base = addr.clone();
        let Some(Protocol::P2p(peer)) = base.pop() else {
            anyhow::bail!("--peer {addr} must end in /p2p/<peer id>: copy the whole address the other relay printed");
        };
        let relay = aimatrix_net::node_id_of(&peer)
            .with_context(|| format!("--peer {addr}: the peer id is not an ed25519 key"))?;
        match out.iter_mut().find(|e| e.relay == relay) {
            Some(entry) => entry.addrs.push(base.to_string()),
            None => out.push(RosterEntry { relay, addrs: vec![base.to_string()] }),
        }
    }
    Ok(out)
}

/// The address to print: the first TCP address (a routable one before loopback), then QUIC,
/// with `/p2p/<peer id>` appended.
fn dialable_address(addrs: &[Multiaddr], peer: libp2p::PeerId) -> Option<Multiaddr> {
    use libp2p::multiaddr::Protocol;
    let is_loopback = |a: &Multiaddr| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback() || ip.is_unspecified(),
            Protocol::Ip6(ip) => ip.is_loopback() || ip.is_unspecified(),
            _ => false,
        })
    };
    let is_tcp = |a: &Multiaddr| a.iter().any(|p| matches!(p, Protocol::Tcp(_)));
    let best = addrs
        .iter()
        .filter(|a| is_tcp(a))
        .min_by_key(|a| is_loopback(a))
        .or_else(|| addrs.first())?;
    Some(best.clone().with(Protocol::P2p(peer)))
}
