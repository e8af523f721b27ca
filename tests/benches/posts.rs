//! The post bench (issue 22): how fast `studio-relay serve` takes posts, for this build and,
//! with `--before`, another build of the relay measured in the same run, as a table of ratios.
//! The relay runs alone (no nodes: the jobs stay open), as a release process on loopback.
//!
//! ```text
//! cargo bench -p aimatrix-tests --bench posts -- --before /path/to/old/studio-relay
//! ```
//!
//! Each round starts a fresh relay per build and measures, in order: `--sequential` posts one
//! at a time (post latency p50, p99), then `--posts` posts from `--clients` threads at once
//! (posts/s, latency p99 under load). This build is measured twice: without idempotency keys
//! (the same requests as the build before) and with a fresh key per post. Rounds alternate the
//! builds; each number is the median over `--rounds`. A bench, not a test: it prints, it does
//! not fail on a number.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/loopback.rs"]
mod loopback;

use aimatrix_protocol::job::JobSpec;
use anyhow::{bail, Context};
use loopback::{percentile, Network, Setup};
use studio_relay::api::types::{MintRequest, PostJobRequest};
use studio_relay::client::RelayClient;

/// The largest slowdown the issue allows, as a ratio to the build before.
const SLOWDOWN_MAX: f64 = 1.10;

#[derive(Debug)]
struct Opts {
    before: Option<PathBuf>,
    sequential: usize,
    posts: usize,
    clients: usize,
    rounds: usize,
}

fn parse_opts() -> anyhow::Result<Opts> {
    let mut opts = Opts { before: None, sequential: 300, posts: 2_000, clients: 4, rounds: 5 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--before" => opts.before = Some(PathBuf::from(value()?)),
            "--sequential" => opts.sequential = value()?.parse()?,
            "--posts" => opts.posts = value()?.parse()?,
            "--clients" => opts.clients = value()?.parse()?,
            "--rounds" => opts.rounds = value()?.parse()?,
            // cargo bench passes --bench to every harness=false target.
            "--bench" => {}
            other => bail!(
                "unknown flag {other}; flags: --before PATH --sequential N --posts N \
                 --clients N --rounds N"
            ),
        }
    }
    if opts.clients == 0 || opts.rounds == 0 || opts.sequential == 0 || opts.posts == 0 {
        bail!("--sequential, --posts, --clients and --rounds must be at least 1");
    }
    Ok(opts)
}

/// One build's numbers from one round.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    p50_ms: f64,
    p99_ms: f64,
    posts_per_s: f64,
    loaded_p99_ms: f64,
}

/// A trivial batch job (reward 1), its module already uploaded.
fn spec(module_sha256: &str) -> anyhow::Result<JobSpec> {
    let spec = serde_json::json!({
        "kind": "batch", "name": "post bench", "reward": 1, "replication": 1,
        "max_attempts": 3, "deadline_s": 900,
        "workload": { "runtime": "wasm", "module": format!("sha256:{module_sha256}") },
        "requirements": { "cpu_cores": 1, "memory_mb": 64 },
        "limits": { "timeout_s": 30, "memory_mb": 64 },
    });
    serde_json::from_value(spec).context("the bench job spec does not parse")
}

fn post_once(client: &RelayClient, spec: &JobSpec, key: Option<String>) -> anyhow::Result<f64> {
    let req = PostJobRequest { spec: spec.clone(), account: "bench".into(), idempotency_key: key };
    let start = Instant::now();
    client.post_job(&req).context("a post failed")?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// A fresh relay from `relay_bin`, measured once.
fn measure(relay_bin: &std::path::Path, opts: &Opts, keyed: bool) -> anyhow::Result<Sample> {
    let node_bin = aimatrix_tests::binary("aimatrix-node");
    let net = Network::start(&Setup {
        relay_bin,
        node_bin: &node_bin,
        nodes: 0,
        relays: 1,
        keep: false,
        prefix: "aimatrix-posts-bench-",
        relay_log: "warn".into(),
        node_log: "warn".into(),
        wait: Duration::from_secs(60),
    })?;
    let client = &net.client;
    client.mint(&MintRequest {
        account: "bench".into(),
        amount: 1_000_000_000,
        memo: String::new(),
        id: None,
    })?;
    let module = client.put_blob(b"\0asm\x01\0\0\0")?.sha256;
    let spec = spec(&module)?;
    let counter = Arc::new(AtomicUsize::new(0));
    let key = |n: usize| keyed.then(|| format!("bench-{n}"));
    for _ in 0..20 {
        post_once(client, &spec, key(counter.fetch_add(1, Ordering::Relaxed)))?;
    }
    let mut one_at_a_time = Vec::with_capacity(opts.sequential);
    for _ in 0..opts.sequential {
        one_at_a_time.push(post_once(client, &spec, key(counter.fetch_add(1, Ordering::Relaxed)))?);
    }
    let each = opts.posts.div_ceil(opts.clients);
    let start = Instant::now();
    let threads: Vec<_> = (0..opts.clients)
        .map(|_| {
            let (client, spec, counter) = (client.clone(), spec.clone(), counter.clone());
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut times = Vec::with_capacity(each);
                for _ in 0..each {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    times.push(post_once(&client, &spec, keyed.then(|| format!("bench-{n}")))?);
                }
                Ok(times)
            })
        })
        .collect();
    let mut loaded = Vec::new();
    for t in threads {
        loaded.extend(t.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Sample {
        p50_ms: percentile(&one_at_a_time, 0.50),
        p99_ms: percentile(&one_at_a_time, 0.99),
        posts_per_s: loaded.len() as f64 / seconds,
        loaded_p99_ms: percentile(&loaded, 0.99),
    })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.collect();
    percentile(&values, 0.5)
}

fn main() -> anyhow::Result<()> {
    let opts = parse_opts()?;
    let this = aimatrix_tests::binary("studio-relay");
    let mut builds: Vec<(&str, PathBuf, bool)> = Vec::new();
    if let Some(before) = &opts.before {
        builds.push(("before", before.clone(), false));
    }
    builds.push(("this build", this.clone(), false));
    builds.push(("this build, keyed", this, true));
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); builds.len()];
    for round in 0..opts.rounds {
        for (i, (name, bin, keyed)) in builds.iter().enumerate() {
            let sample = measure(bin, &opts, *keyed)
                .with_context(|| format!("{name} ({})", bin.display()))?;
            eprintln!("round {}: {name}: {sample:?}", round + 1);
            samples[i].push(sample);
        }
    }
    let med = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f));
    // (label, value, higher is better, held to the target)
    type Metric = (&'static str, fn(&Sample) -> f64, bool, bool);
    let metrics: [Metric; 4] = [
        ("post latency p50, one at a time (ms)", |s| s.p50_ms, false, false),
        ("post latency p99, one at a time (ms)", |s| s.p99_ms, false, true),
        ("posts/s", |s| s.posts_per_s, true, true),
        ("post latency p99 under load (ms)", |s| s.loaded_p99_ms, false, true),
    ];
    println!(
        "\npost bench: {} sequential posts, then {} posts from {} clients; median of {} round(s)",
        opts.sequential, opts.posts, opts.clients, opts.rounds
    );
    let mut header = format!("{:<40}", "metric");
    for (name, _, _) in &builds {
        header.push_str(&format!(" {name:>18}"));
    }
    if opts.before.is_some() {
        header.push_str(&format!(" {:>14} {:>14} {:>8}", "ratio", "ratio keyed", "target"));
    }
    println!("{header}");
    for (label, f, higher_is_better, held) in metrics {
        let mut row = format!("{label:<40}");
        for i in 0..builds.len() {
            row.push_str(&format!(" {:>18.2}", med(i, f)));
        }
        if opts.before.is_some() {
            let before = med(0, f);
            // A ratio above 1 is slower, whichever way the metric points.
            let slowdown =
                |after: f64| if higher_is_better { before / after } else { after / before };
            let (plain, keyed) = (slowdown(med(1, f)), slowdown(med(2, f)));
            let verdict = match (held, plain <= SLOWDOWN_MAX) {
                (false, _) => "info",
                (true, true) => "PASS",
                (true, false) => "MISS",
            };
            row.push_str(&format!(" {plain:>13.3}x {keyed:>13.3}x {verdict:>8}"));
        }
        println!("{row}");
    }
    if opts.before.is_some() {
        println!(
            "ratio: how much slower this build is than the one before (>1 slower); the target \
             (issue 22) holds posts/s and the p99 rows to at most {SLOWDOWN_MAX:.2}x, without \
             keys, the same requests as before"
        );
    }
    Ok(())
}
