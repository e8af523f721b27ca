//! The believability bench (issue 7): one scenario run twice, by the simulator and by the real
//! stack, side by side.
//!
//! - **Real**: one `studio-relay serve` and N `aimatrix-node join` processes (release builds) on
//!   loopback. Jobs are posted at the scenario's rate (Poisson arrivals from a SplitMix64 seeded
//!   with the scenario's seed), its class mix, replication, rewards and deadlines; each job runs a
//!   wasm guest that sleeps for the run time the simulator would draw (nominal × slowness ×
//!   uniform 0.5–1.5). Timings come from the processes' own log timestamps (one machine, one
//!   clock): offer propagation is the relay's `job … posted` line to each node's first
//!   `offer …: can serve` line; time to assign is that post line to the relay's first `lease`
//!   line.
//! - **Simulated**: `aimatrix_sim::Sim` on the same scenario and node count, twice: the scenario
//!   as written, and with its link latency replaced by the one-way latency measured between the
//!   real processes (claim → lease line, lease line → the node's `running` line).
//!
//! It prints one table (metric, sim, sim with the measured latency, real), then the measured
//! latency, where the real time went, and the machine's load. A bench, not a test.
//!
//! ```text
//! cargo bench -p aimatrix-tests --bench believability -- --nodes 50
//! ```
//!
//! Flags (after `--`): `--scenario FILE` (default `sim/scenarios/believability.toml`, relative
//! to the workspace), `--nodes N`, `--duration-s S`, `--arrivals-per-s R`, `--seed S` (each
//! overrides the scenario), `--keep` (keep the data directory and the logs).
//!
//! Like the simulator's summary, the real side counts what happened within the scenario's
//! duration: jobs still open at its end are pending, and later leases, completions, claims and
//! announcements are not counted.

#[path = "believability/logs.rs"]
mod logs;
#[path = "common/loopback.rs"]
mod loopback;
#[path = "believability/report.rs"]
mod report;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aimatrix_protocol::job::JobSpec;
use aimatrix_protocol::testkit;
use aimatrix_sim::scenario::JobClass;
use aimatrix_sim::{Scenario, Sim};
use anyhow::{bail, Context};
use logs::Micros;
use loopback::{percentile, Cpu, Network, Setup};
use report::{print_report, JobCounts, Real};
use studio_relay::api::types::{MintRequest, PostJobRequest};
use studio_relay::client::RelayClient;

/// A guest that sleeps for `argv[1]` milliseconds (WASI `poll_oneoff` on the monotonic clock,
/// so 50 sleeping guests cost no CPU), then writes `ok\n`. Memory: 0 the iovec, 16 the text,
/// 32 argc, 36 the argument bytes, 64 the clock subscription, 128 the event, 160 nevents,
/// 256 argv (at most 16 pointers), 1024 the argument bytes (at most 60,000).
const SLEEP_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ok\n")
  (func (export "_start")
    (local $p i32) (local $c i32) (local $ms i64)
    (drop (call $args_sizes (i32.const 32) (i32.const 36)))
    (if (i32.and
          (i32.and (i32.ge_u (i32.load (i32.const 32)) (i32.const 2))
                   (i32.le_u (i32.load (i32.const 32)) (i32.const 16)))
          (i32.le_u (i32.load (i32.const 36)) (i32.const 60000)))
      (then
        (drop (call $args_get (i32.const 256) (i32.const 1024)))
        (local.set $p (i32.load (i32.const 260)))
        (block $done
          (loop $digits
            (local.set $c (i32.load8_u (local.get $p)))
            (br_if $done (i32.lt_u (local.get $c) (i32.const 48)))
            (br_if $done (i32.gt_u (local.get $c) (i32.const 57)))
            (local.set $ms (i64.add (i64.mul (local.get $ms) (i64.const 10))
                                    (i64.extend_i32_u (i32.sub (local.get $c) (i32.const 48)))))
            (local.set $p (i32.add (local.get $p) (i32.const 1)))
            (br $digits)))))
    (if (i64.gt_u (local.get $ms) (i64.const 0))
      (then
        (i64.store (i32.const 64) (i64.const 0))
        (i32.store8 (i32.const 72) (i32.const 0))
        (i32.store (i32.const 80) (i32.const 1))
        (i64.store (i32.const 88) (i64.mul (local.get $ms) (i64.const 1000000)))
        (i64.store (i32.const 96) (i64.const 0))
        (i32.store16 (i32.const 104) (i32.const 0))
        (drop (call $poll (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 160)))))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 3))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// The account jobs are posted from.
const ACCOUNT: &str = "believability";

/// Command-line options.
#[derive(Clone, Debug)]
pub(crate) struct Opts {
    scenario: PathBuf,
    nodes: Option<u32>,
    duration_s: Option<u64>,
    arrivals_per_s: Option<f64>,
    seed: Option<u64>,
    keep: bool,
}

impl Opts {
    fn parse() -> anyhow::Result<Self> {
        let mut o = Self {
            scenario: PathBuf::from("sim/scenarios/believability.toml"),
            nodes: None,
            duration_s: None,
            arrivals_per_s: None,
            seed: None,
            keep: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--bench" => {} // added by `cargo bench`
                "--scenario" => o.scenario = value("--scenario")?.into(),
                "--nodes" => o.nodes = Some(value("--nodes")?.parse()?),
                "--duration-s" => o.duration_s = Some(value("--duration-s")?.parse()?),
                "--arrivals-per-s" => {
                    o.arrivals_per_s = Some(value("--arrivals-per-s")?.parse()?);
                }
                "--seed" => o.seed = Some(value("--seed")?.parse()?),
                "--keep" => o.keep = true,
                other => bail!(
                    "unknown argument {other:?}; flags: --scenario FILE --nodes N --duration-s S \
                     --arrivals-per-s R --seed S --keep"
                ),
            }
        }
        Ok(o)
    }

    /// The scenario file with the overrides applied, checked for what the real stack can run.
    fn scenario(&self) -> anyhow::Result<Scenario> {
        let path = if self.scenario.is_absolute() || self.scenario.exists() {
            self.scenario.clone()
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(&self.scenario)
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the scenario {}", path.display()))?;
        let mut sc = Scenario::from_toml(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        sc.nodes = self.nodes.unwrap_or(sc.nodes);
        sc.duration_s = self.duration_s.unwrap_or(sc.duration_s);
        sc.workload.arrivals_per_s = self.arrivals_per_s.unwrap_or(sc.workload.arrivals_per_s);
        sc.seed = self.seed.unwrap_or(sc.seed);
        sc.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        if sc.nodes == 0 || sc.relays != 1 {
            bail!("the real stack runs one relay and at least one node; the scenario has {} relays and {} nodes", sc.relays, sc.nodes);
        }
        if sc.hardware.len() != 1 || sc.hardware[0].gpus > 0 || sc.hardware[0].slots != 1 {
            bail!(
                "the real nodes are all this machine, so the scenario needs exactly one hardware \
                 class, without GPUs and with one slot (see sim/scenarios/believability.toml)"
            );
        }
        if let Some(c) = sc.workload.classes.iter().find(|c| c.kind != "batch" || c.gpus > 0) {
            bail!("job class {:?}: the real relay here runs CPU batch jobs only", c.name);
        }
        let f = &sc.faults;
        if f.byzantine_share + f.withholding_share > 0.0
            || f.crashes_per_node_hour > 0.0
            || !f.partitions.is_empty()
            || f.random_partitions_per_hour > 0.0
        {
            bail!("the bench injects no faults; use a scenario without [faults]");
        }
        Ok(sc)
    }

    pub(crate) fn command(&self, sc: &Scenario) -> String {
        format!(
            "cargo bench -p aimatrix-tests --bench believability -- --scenario {} --nodes {} \
             --duration-s {} --arrivals-per-s {} --seed {}",
            self.scenario.display(),
            sc.nodes,
            sc.duration_s,
            sc.workload.arrivals_per_s,
            sc.seed
        )
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("believability bench: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let opts = Opts::parse()?;
    let sc = opts.scenario()?;
    eprintln!("building release binaries (cargo build --release) ...");
    let relay_bin = aimatrix_tests::binary("studio-relay");
    let node_bin = aimatrix_tests::binary("aimatrix-node");
    let load_before = load_average();
    let started = Instant::now();
    let mut net = Network::start(&Setup {
        relay_bin: &relay_bin,
        node_bin: &node_bin,
        nodes: sc.nodes as usize,
        relays: 1,
        keep: opts.keep,
        prefix: "aimatrix-believability-",
        relay_log: "warn,studio_relay=info".into(),
        node_log: "warn,aimatrix_node::join::driver=debug".into(),
        wait: Duration::from_secs(60 + u64::from(sc.nodes)),
    })?;
    eprintln!(
        "network up after {:.1} s: 1 relay, {} nodes; logs in {}",
        started.elapsed().as_secs_f64(),
        sc.nodes,
        net.dir.display()
    );
    let module = wat::parse_str(SLEEP_WAT).context("the sleeping guest does not assemble")?;
    let digest = net.client.put_blob(&module)?.sha256;
    mint(&net.client, sc.workload.requester_funds)?;
    warm_up(&net, &sc, &digest)?;
    let cpu_before = Cpu::read(&net)?;
    let wall = Instant::now();
    eprintln!("posting for {} s at {} jobs/s ...", sc.duration_s, sc.workload.arrivals_per_s);
    let posting = post_workload(&net.client, &sc, &digest)?;
    let end = now_us();
    let at_end = net.client.jobs()?;
    let cpu = Cpu::read(&net)?.since(&cpu_before, wall.elapsed());
    let load_during = load_average();
    let ours: HashSet<&str> = posting.ids.iter().map(String::as_str).collect();
    let counts_at_end = JobCounts::of(at_end.iter().filter(|j| ours.contains(j.id.as_str())));
    let peers = node_peer_counts(&net);
    net.stop();
    let real = Real::measure(&net.dir, sc.nodes as usize, &posting, end, counts_at_end)?;

    eprintln!("simulating ...");
    let sim = Sim::new(sc.clone()).run();
    let calibrated_sc = calibrated(&sc, &real.one_way_ms);
    let calibrated = Sim::new(calibrated_sc.clone()).run();
    print_report(&opts, &sc, &calibrated_sc, [&sim, &calibrated], &real, &peers, &posting);
    println!("while posting, {cpu}");
    println!(
        "load average (1/5/15 min) before the network started: {load_before}; at the end of \
         posting: {load_during}"
    );
    if opts.keep {
        println!("data and logs kept in {}", net.dir.display());
    }
    Ok(())
}

/// The scenario with its link latency replaced by the measured one-way latency: a floor at the
/// 10th percentile and uniform jitter up to the 90th (the simulator counts whole ms).
fn calibrated(sc: &Scenario, one_way_ms: &[f64]) -> Scenario {
    let mut sc = sc.clone();
    if one_way_ms.is_empty() {
        return sc;
    }
    let p10 = percentile(one_way_ms, 0.10);
    let p90 = percentile(one_way_ms, 0.90);
    sc.network.base_ms = p10.floor() as u64;
    sc.network.access_ms_max = 0;
    sc.network.jitter_ms = (p90.ceil() as u64).saturating_sub(sc.network.base_ms);
    sc
}

/// How many other nodes each node is connected to (its node API's `network.peers.nodes`).
fn node_peer_counts(net: &Network) -> Vec<usize> {
    net.node_apis
        .iter()
        .filter_map(|api| http_get_json(api, "/v1/status").ok())
        .filter_map(|status| Some(status["network"]["peers"]["nodes"].as_array()?.len()))
        .collect()
}

/// The spec the simulator builds for `class` (`aimatrix-sim`'s `spec_of`: the testkit batch
/// spec, the class's name, reward, replication, attempts and deadline, a timeout of 2.5 × the
/// nominal run time), running the sleeping guest for `run_ms`.
fn spec_for(class: &JobClass, module_sha256: &str, run_ms: u64) -> anyhow::Result<JobSpec> {
    let mut spec = testkit::batch_spec(class.reward);
    spec.name = class.name.clone();
    spec.replication = class.replication;
    spec.max_attempts = class.max_attempts;
    spec.deadline_s = class.deadline_s;
    spec.limits.timeout_s = (class.duration_s * 5).div_ceil(2).max(1);
    spec.workload.args = vec![run_ms.to_string()];
    let mut json = serde_json::to_value(&spec)?;
    json["workload"]["module"] = format!("sha256:{module_sha256}").into();
    serde_json::from_value(json).context("the bench's job spec does not parse")
}

/// Runs 2 × N jobs first, so most nodes have fetched and compiled the guest before anything is
/// timed.
fn warm_up(net: &Network, sc: &Scenario, digest: &str) -> anyhow::Result<()> {
    let class = JobClass {
        name: "warm-up".into(),
        reward: 1,
        replication: 1,
        duration_s: 1,
        ..sc.workload.classes[0].clone()
    };
    let spec = spec_for(&class, digest, 0)?;
    let ids: Vec<String> =
        (0..net.nodes.len() * 2).map(|_| post(&net.client, &spec)).collect::<Result<_, _>>()?;
    drain(&net.client, &ids, Duration::from_secs(120))
}

/// The jobs posted, and how late the posting loop was against its schedule.
pub(crate) struct Posting {
    pub(crate) ids: Vec<String>,
    /// Run time each job's guest was given, by job id.
    pub(crate) run_ms: HashMap<String, u64>,
    /// Largest delay of a post behind its scheduled instant, ms.
    pub(crate) lag_ms_max: f64,
    /// POST round trips, ms.
    pub(crate) post_ms: Vec<f64>,
}

/// Posts the scenario's workload for its duration: Poisson arrivals, classes by weight, run
/// times nominal × slowness × uniform 0.5–1.5, as the simulator draws them.
fn post_workload(client: &RelayClient, sc: &Scenario, digest: &str) -> anyhow::Result<Posting> {
    let mut rng = SplitMix64(sc.seed);
    let classes = &sc.workload.classes;
    let total_weight: u64 = classes.iter().map(|c| u64::from(c.weight)).sum();
    let slowness = sc.hardware[0].slowness;
    let rate = sc.workload.arrivals_per_s;
    let end = Duration::from_secs(sc.duration_s);
    let start = Instant::now();
    let mut posting =
        Posting { ids: Vec::new(), run_ms: HashMap::new(), lag_ms_max: 0.0, post_ms: Vec::new() };
    if rate <= 0.0 {
        std::thread::sleep(end);
        return Ok(posting);
    }
    let mut at = Duration::ZERO;
    loop {
        at += Duration::from_secs_f64(-(1.0 - rng.unit()).ln() / rate);
        if at >= end {
            break;
        }
        let mut pick = rng.next_u64() % total_weight;
        let class = classes
            .iter()
            .find(|c| {
                let hit = pick < u64::from(c.weight);
                pick = pick.saturating_sub(u64::from(c.weight));
                hit
            })
            .context("no job class")?;
        let run_ms = (class.duration_s as f64 * 1000.0 * slowness * (0.5 + rng.unit())) as u64;
        let spec = spec_for(class, digest, run_ms)?;
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let lag = start.elapsed().saturating_sub(at);
        posting.lag_ms_max = posting.lag_ms_max.max(lag.as_secs_f64() * 1000.0);
        let before = Instant::now();
        let id = post(client, &spec)?;
        posting.post_ms.push(before.elapsed().as_secs_f64() * 1000.0);
        posting.run_ms.insert(id.clone(), run_ms);
        posting.ids.push(id);
    }
    if let Some(rest) = end.checked_sub(start.elapsed()) {
        std::thread::sleep(rest);
    }
    Ok(posting)
}

fn post(client: &RelayClient, spec: &JobSpec) -> anyhow::Result<String> {
    let req =
        PostJobRequest { spec: spec.clone(), account: ACCOUNT.to_owned(), idempotency_key: None };
    Ok(client.post_job(&req)?.job_id)
}

fn mint(client: &RelayClient, amount: u64) -> anyhow::Result<()> {
    let memo = "believability bench".to_owned();
    client.mint(&MintRequest { account: ACCOUNT.to_owned(), amount, memo, id: None })?;
    Ok(())
}

/// Microseconds since the Unix epoch, now.
fn now_us() -> Micros {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Micros::try_from(since.as_micros()).unwrap_or(Micros::MAX)
}

/// Waits until every job in `ids` has ended, or `limit` passed (then the rest count as pending).
fn drain(client: &RelayClient, ids: &[String], limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let open = client.status()?.jobs_open;
        let views = client.jobs()?;
        let ours_open = views.iter().filter(|v| !v.is_final() && ids.contains(&v.id)).count();
        if ours_open == 0 || open == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            eprintln!("{ours_open} jobs still open after {limit:?}; they count as pending");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A tiny HTTP/1.1 GET for a node's local API (JSON body, `Content-Length`).
fn http_get_json(addr: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (_, body) = answer.split_once("\r\n\r\n").context("no HTTP body")?;
    Ok(serde_json::from_str(body)?)
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// SplitMix64: the posting schedule's random numbers, from the scenario's seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        aimatrix_protocol::messages::mix64(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
