//! `aimatrix-node join`: the node process. It owns one `NodeCore` and carries bytes (libp2p),
//! time and sandbox runs in and out of it. See docs/network.md.

mod driver;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aimatrix_net::{NetConfig, Role};
use aimatrix_protocol::identity::{Keypair, NodeId};
use aimatrix_protocol::node::NodeCore;
use aimatrix_sandbox::docker::{DockerConfig, DockerExecutor};
use aimatrix_sandbox::wasm::{WasmConfig, WasmExecutor};
use aimatrix_sandbox::Executor;
use anyhow::Context;
use clap::Args;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio_util::sync::CancellationToken;

use crate::api::args::ApiArgs;
use crate::history::History;
use crate::policy::PolicyArgs;
use crate::{data_dir, hardware};

/// Join the network: advertise this machine, claim jobs it can serve, run them in the sandbox.
///
/// Runs until SIGINT or SIGTERM; then it stops claiming, lets running jobs finish within the
/// grace period (`grace_period_s` in the config file), hands back the rest and exits 0.
#[derive(Debug, Args)]
pub(crate) struct JoinArgs {
    /// A relay's address, ending in `/p2p/<peer id>` (the first line `studio-relay serve`
    /// prints); repeatable: the node works for every relay given and, unless `pin_relays` is
    /// set in the config file, for the relays their rosters vouch for. Default: `relay` and
    /// `relays` in the config file.
    #[arg(long, value_name = "MULTIADDR")]
    relay: Vec<Multiaddr>,
    /// The node's data directory (identity, module cache, receipts, job history).
    #[arg(long, value_name = "DIR", env = "AIMATRIX_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on for peers (repeatable). Default: TCP and QUIC on a free port of every
    /// interface.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<Multiaddr>,
    /// An address at which other hosts reach this one (a public IP, a forwarded port;
    /// repeatable). Needed behind a NAT or when listening on 0.0.0.0.
    #[arg(long = "external", value_name = "MULTIADDR")]
    external: Vec<Multiaddr>,
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Find peers on the local network with mDNS.
    #[arg(long)]
    mdns: bool,
}

pub(crate) fn run(args: JoinArgs) -> anyhow::Result<ExitCode> {
    let data_dir = data_dir::resolve(args.data_dir.as_deref())?;
    let policy = args.policy.load(&data_dir)?;
    let api_addr = args.api.addr(policy.api).map_err(anyhow::Error::msg)?;
    let relay_addrs = policy.relays_to_join(&args.relay);
    if relay_addrs.is_empty() {
        anyhow::bail!(
            "no relay to join: pass --relay ADDR (the first line `studio-relay serve` prints)"
        );
    }
    let mut relays: Vec<(PeerId, Multiaddr)> = Vec::new();
    let mut relay_ids: Vec<NodeId> = Vec::new();
    for relay_addr in &relay_addrs {
        let relay_peer = relay_addr
            .iter()
            .find_map(|p| match p {
                Protocol::P2p(peer) => Some(peer),
                _ => None,
            })
            .with_context(|| {
                format!("--relay {relay_addr} does not end in /p2p/<peer id>; copy the whole address the relay printed")
            })?;
        let relay_id = aimatrix_net::node_id_of(&relay_peer)
            .with_context(|| format!("--relay {relay_addr}: the peer id is not an ed25519 key"))?;
        relays.push((relay_peer, relay_addr.clone()));
        relay_ids.push(relay_id);
    }
    let key_path = data_dir.join("node.key");
    let (key, created) = Keypair::load_or_create(&key_path)?;
    if created {
        tracing::info!("created node identity {}", key_path.display());
    }
    let history = History::open(&data_dir)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let detected = hardware::detect(Ok(data_dir.clone())).await;
        let profile = policy.apply(hardware::to_profile(&detected));
        if profile.policy.allowed_kinds == aimatrix_protocol::job::JobKindSet::EMPTY {
            tracing::warn!(
                "this node runs none of the job kinds its policy allows (allowed_kinds), so it \
                 will claim nothing; `aimatrix-node detect` lists the kinds it runs"
            );
        }
        let config = policy.node_config(relay_ids);
        let wasm: Arc<dyn Executor> =
            Arc::new(WasmExecutor::new(WasmConfig::in_dir(data_dir.join("wasm-cache")))?);
        let docker = if profile.has_runtime(aimatrix_protocol::job::Runtime::Docker) {
            connect_docker(&key).await
        } else {
            None
        };
        let listen = if !args.listen.is_empty() {
            args.listen.clone()
        } else if !policy.listen.is_empty() {
            policy.listen.clone()
        } else {
            vec!["/ip4/0.0.0.0/tcp/0".parse()?, "/ip4/0.0.0.0/udp/0/quic-v1".parse()?]
        };
        let (net, events) = aimatrix_net::spawn(NetConfig {
            keypair: key.clone(),
            listen,
            external: args.external.clone(),
            bootstrap: relay_addrs.clone(),
            role: Role::Node,
            mdns: args.mdns,
            request_timeout: Duration::from_secs(30),
            node_peers: policy.node_peers,
        })
        .await
        .context("cannot start the network")?;
        let api_listener = tokio::net::TcpListener::bind(api_addr)
            .await
            .with_context(|| format!("cannot listen for the control API on {api_addr}"))?;
        let shutdown = CancellationToken::new();
        let (api_tx, api_rx) = tokio::sync::mpsc::channel(64);
        let api_task = tokio::spawn(crate::api::serve(api_listener, api_tx, shutdown.clone()));
        tracing::info!(
            "node {} joined via {}; control API on http://{}",
            net.local_peer_id(),
            relay_addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            api_addr
        );
        let grace = policy.grace_period();
        let core = NodeCore::new(
            key,
            config,
            profile,
            rand_core::RngCore::next_u64(&mut rand_core::OsRng),
        );
        let ctx = run::RunContext {
            net: net.clone(),
            relay_peer: relays[0].0,
            blob_dir: data_dir.join("blobs"),
            work_root: data_dir.join("work"),
            training_dir: data_dir.join("training"),
            wasm,
            docker,
        };
        let mut node = driver::Node::new(core, ctx, history, relays);
        node.run(events, api_rx, grace).await;
        shutdown.cancel();
        net.shutdown().await;
        let _ = api_task.await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The Docker executor, with the containers of an earlier run of this node removed; `None`
/// (Docker jobs refused) when the engine cannot be reached.
async fn connect_docker(key: &Keypair) -> Option<Arc<dyn Executor>> {
    let cfg = DockerConfig { owner: key.public().to_peer_id(), ..DockerConfig::default() };
    match DockerExecutor::connect(cfg).await {
        Ok(docker) => {
            match docker.remove_leftovers().await {
                Ok(0) => {}
                Ok(n) => tracing::info!("removed {n} container(s) left by an earlier run"),
                Err(e) => tracing::warn!("cannot remove leftover containers: {e}"),
            }
            Some(Arc::new(docker))
        }
        Err(e) => {
            tracing::warn!("Docker jobs are off: {e}");
            None
        }
    }
}

/// Longest a direct request is retried while the peer is unreachable (a message lives 120 s).
pub(crate) const RETRY_FOR: Duration = Duration::from_secs(100);
