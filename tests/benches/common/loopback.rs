//! Relays and N nodes as release processes on loopback, for the benches (`network`,
//! `believability`, `posts`), which include this file with `#[path]`. With several relays,
//! each is started with `--peer` naming the others, and node `i` is given relay `i % relays`
//! only.

// Each bench is its own crate and uses part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use studio_relay::client::RelayClient;

/// How to start a [`Network`].
pub(crate) struct Setup<'a> {
    pub(crate) relay_bin: &'a Path,
    pub(crate) node_bin: &'a Path,
    pub(crate) nodes: usize,
    /// Relays, peered with each other (at least 1).
    pub(crate) relays: usize,
    /// Keep the data and logs directory after the run.
    pub(crate) keep: bool,
    /// Prefix of the temporary directory's name.
    pub(crate) prefix: &'a str,
    /// `RUST_LOG` of the relay and of each node.
    pub(crate) relay_log: String,
    pub(crate) node_log: String,
    /// How long every node may take to reach the relay.
    pub(crate) wait: Duration,
}

/// The processes, killed when dropped.
pub(crate) struct Network {
    /// The first relay.
    pub(crate) relay: Child,
    /// The other relays.
    pub(crate) other_relays: Vec<Child>,
    /// Kept open: a relay's stdout is a pipe it may write to again.
    _relay_stdouts: Vec<BufReader<ChildStdout>>,
    /// The first relay's peer id, from the address it printed.
    pub(crate) relay_peer_id: String,
    pub(crate) nodes: Vec<Child>,
    /// Each node's control API address.
    pub(crate) node_apis: Vec<String>,
    pub(crate) dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// The first relay's HTTP API.
    pub(crate) client: RelayClient,
    /// Every relay's HTTP API, the first relay's first.
    pub(crate) clients: Vec<RelayClient>,
}

impl Network {
    /// Starts the relay, then the nodes, and waits until the relay holds every node's advert.
    pub(crate) fn start(setup: &Setup<'_>) -> anyhow::Result<Self> {
        let temp = tempfile::Builder::new().prefix(setup.prefix).tempdir()?;
        let (dir, temp) =
            if setup.keep { (temp.keep(), None) } else { (temp.path().to_owned(), Some(temp)) };
        // Each relay's key and port are chosen first, so each can be told the others.
        let mut planned = Vec::new();
        for r in 0..setup.relays.max(1) {
            let data_dir = dir.join(if r == 0 { "relay".to_owned() } else { format!("relay-{r}") });
            std::fs::create_dir_all(&data_dir)?;
            let (key, _) =
                aimatrix_protocol::identity::Keypair::load_or_create(&data_dir.join("relay.key"))?;
            let listen = format!("/ip4/{}", free_loopback_addr()?.replace(':', "/tcp/"));
            let addr = format!("{listen}/p2p/{}", key.public().to_peer_id());
            planned.push((data_dir, listen, addr, free_loopback_addr()?));
        }
        let mut children = Vec::new();
        let mut stdouts = Vec::new();
        for (r, (data_dir, listen, addr, api)) in planned.iter().enumerate() {
            let log = if r == 0 { "relay.log".to_owned() } else { format!("relay-{r}.log") };
            let mut cmd = Command::new(setup.relay_bin);
            cmd.args(["serve", "--listen", listen, "--api", api])
                .arg("--data-dir")
                .arg(data_dir)
                .env("RUST_LOG", &setup.relay_log)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log_file(&dir, &log)?);
            for (other, (_, _, peer, _)) in planned.iter().enumerate() {
                if other != r {
                    cmd.args(["--peer", peer]);
                }
            }
            let mut relay = cmd
                .spawn()
                .with_context(|| format!("cannot start {}", setup.relay_bin.display()))?;
            let mut stdout = BufReader::new(relay.stdout.take().context("no relay stdout")?);
            let mut printed = String::new();
            stdout.read_line(&mut printed)?;
            children.push(relay);
            stdouts.push(stdout);
            if printed.trim() != addr {
                bail!(
                    "relay {r} printed {printed:?}, not {addr}; see {}",
                    dir.join(&log).display()
                );
            }
        }
        let relay_peer_id = planned[0].2.rsplit_once("/p2p/").map(|(_, id)| id.to_owned());
        let clients: Vec<RelayClient> =
            planned.iter().map(|(_, _, _, api)| RelayClient::new(api)).collect();
        let mut children = children.into_iter();
        let mut net = Self {
            relay: children.next().context("no relay")?,
            other_relays: children.collect(),
            _relay_stdouts: stdouts,
            relay_peer_id: relay_peer_id.unwrap_or_default(),
            nodes: Vec::new(),
            node_apis: Vec::new(),
            dir,
            _temp: temp,
            client: clients[0].clone(),
            clients,
        };
        for i in 0..setup.nodes {
            let node_api = free_loopback_addr()?;
            let addr = &planned[i % planned.len()].2;
            let child = Command::new(setup.node_bin)
                .args(["join", "--relay", addr, "--listen", "/ip4/127.0.0.1/tcp/0"])
                .args(["--api", &node_api])
                .arg("--data-dir")
                .arg(net.dir.join(format!("node-{i}")))
                .env("RUST_LOG", &setup.node_log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&net.dir, &format!("node-{i}.log"))?)
                .spawn()
                .with_context(|| format!("cannot start {}", setup.node_bin.display()))?;
            net.nodes.push(child);
            net.node_apis.push(node_api);
        }
        net.wait_for_nodes(setup.wait)?;
        Ok(net)
    }

    /// Waits until every relay holds every node's advert.
    fn wait_for_nodes(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let known = self
                .clients
                .iter()
                .map(|c| c.status().map(|s| s.known_nodes).unwrap_or(0))
                .min()
                .unwrap_or(0);
            if known >= self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {known} of {} nodes reached every relay within {limit:?}; logs in {}",
                    self.nodes.len(),
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The nodes' process ids.
    pub(crate) fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Child::id).collect()
    }

    /// Every relay's process id, the first relay's first.
    pub(crate) fn relay_pids(&self) -> Vec<u32> {
        std::iter::once(&self.relay).chain(&self.other_relays).map(Child::id).collect()
    }

    /// Kills every process (also done on drop).
    pub(crate) fn stop(&mut self) {
        let relays = std::iter::once(&mut self.relay).chain(self.other_relays.iter_mut());
        for child in self.nodes.iter_mut().chain(relays) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU time used by the relays, the nodes and this process, in seconds.
pub(crate) struct Cpu {
    relay_s: f64,
    nodes_s: f64,
    bench_s: f64,
}

impl Cpu {
    pub(crate) fn read(net: &Network) -> anyhow::Result<Self> {
        let nodes_s =
            net.node_pids().iter().map(|p| cpu_s(&p.to_string())).sum::<Result<f64, _>>()?;
        let relay_s =
            net.relay_pids().iter().map(|p| cpu_s(&p.to_string())).sum::<Result<f64, _>>()?;
        Ok(Self { relay_s, nodes_s, bench_s: cpu_s("self")? })
    }

    /// Relay CPU seconds used since `before` (every relay together).
    pub(crate) fn relay_s_since(&self, before: &Self) -> f64 {
        self.relay_s - before.relay_s
    }

    /// What was used since `before`, over `wall`, as a sentence.
    pub(crate) fn since(&self, before: &Self, wall: Duration) -> String {
        let cores = |now: f64, then: f64| (now - then) / wall.as_secs_f64();
        let machine = std::thread::available_parallelism().map_or(0, usize::from);
        format!(
            "CPU in cores busy over {:.1} s: relays {:.2}, all nodes {:.2}, bench client {:.2} \
             (machine has {machine})",
            wall.as_secs_f64(),
            cores(self.relay_s, before.relay_s),
            cores(self.nodes_s, before.nodes_s),
            cores(self.bench_s, before.bench_s),
        )
    }
}

/// utime + stime of `/proc/<pid>/stat`, in seconds (at the usual 100 ticks per second).
fn cpu_s(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // After the command name: state is field 3, utime 14 and stime 15.
    Ok((ticks(11) + ticks(12)) as f64 / 100.0)
}

/// The nearest-rank percentile `q` of `values` (NaN for none).
pub(crate) fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))
}

/// A free port on 127.0.0.1, outside the range other nodes' `tcp/0` listeners draw from (at
/// 100 nodes, 2 of them failed to start before the ports moved there).
fn free_loopback_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", aimatrix_cli_support::free_loopback_port()?))
}
