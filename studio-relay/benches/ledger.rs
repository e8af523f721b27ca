//! Ledger benchmark: durable transfers per second with group commit, and the time to
//! acknowledge at a fixed offered rate.
//!
//! `cargo bench -p studio-relay --bench ledger` prints a table. Every acknowledged transfer is
//! flushed to disk (sled `flush`, i.e. fsync) before its acknowledgement. The database lives in
//! `target/tmp` (a real disk, not tmpfs) unless `LEDGER_BENCH_DIR` says otherwise.
//! `LEDGER_BENCH_RATE` sets the offered rate (default 20000/s), `LEDGER_BENCH_SECS` its length.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use studio_relay::ledger::{Ledger, Op, Ticket};

const REQUESTERS: u64 = 1000;
const NODES: u64 = 100;

/// The n-th transfer of an endless stream of jobs: reserve, pay the node (with fee), release.
fn job_op(n: u64) -> Op {
    let job = n / 3;
    let reserve_id = u128::from(job) * 4 + 1_000_000_000;
    let job_id = reserve_id.to_le_bytes();
    match n % 3 {
        0 => Op::Reserve {
            id: reserve_id,
            job_id,
            requester: format!("requester-{}", job % REQUESTERS),
            amount: 60,
            timeout_at_ms: u64::MAX,
        },
        1 => Op::Pay {
            id: reserve_id + 1,
            reserve_id,
            job_id,
            node: format!("12D3KooWnode{}", job % NODES),
            amount: 30,
            fee: 3,
        },
        _ => Op::Release { id: reserve_id + 2, reserve_id, job_id, amount: 27 },
    }
}

fn open() -> (tempfile::TempDir, Ledger) {
    let base = std::env::var_os("LEDGER_BENCH_DIR")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")), Into::into);
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    for r in 0..REQUESTERS {
        ledger.mint(u128::from(r) + 1, &format!("requester-{r}"), u64::MAX / 4, "bench").unwrap();
    }
    (dir, ledger)
}

/// Waits for tickets in a second thread; returns each op's time to acknowledge.
fn waiter() -> (mpsc::Sender<(Instant, Ticket)>, std::thread::JoinHandle<Vec<Duration>>) {
    let (tx, rx) = mpsc::channel::<(Instant, Ticket)>();
    let handle = std::thread::spawn(move || {
        let mut latencies = Vec::new();
        for (sent, ticket) in rx {
            ticket.wait().expect("benchmark ops are valid");
            latencies.push(sent.elapsed());
        }
        latencies
    });
    (tx, handle)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One op at a time: every op pays for its own flush.
fn one_at_a_time(ops: u64) -> f64 {
    let (_dir, ledger) = open();
    let start = Instant::now();
    for n in 0..ops {
        ledger.submit(job_op(n)).unwrap();
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

/// As fast as possible, with up to `in_flight` ops queued.
fn saturated(ops: u64, in_flight: usize) -> (f64, Vec<Duration>) {
    let (_dir, ledger) = open();
    let (tx, handle) = waiter();
    let mut window: VecDeque<mpsc::Receiver<()>> = VecDeque::new();
    let start = Instant::now();
    // Bound what is in flight by waiting on a small echo of every 1024th op.
    for n in 0..ops {
        let ticket = ledger.submit_async(job_op(n)).unwrap();
        tx.send((Instant::now(), ticket)).unwrap();
        if n % 1024 == 1023 {
            let (done_tx, done_rx) = mpsc::channel();
            let marker = ledger.expire_async(0).unwrap();
            std::thread::spawn(move || {
                let _ = marker.wait();
                let _ = done_tx.send(());
            });
            window.push_back(done_rx);
            while window.len() * 1024 > in_flight {
                window.pop_front().unwrap().recv().unwrap();
            }
        }
    }
    drop(tx);
    let latencies = handle.join().unwrap();
    let elapsed = start.elapsed();
    (ops as f64 / elapsed.as_secs_f64(), latencies)
}

/// Offered at `rate` ops/s for `secs` seconds (open loop).
fn at_rate(rate: u64, secs: u64) -> (f64, Vec<Duration>) {
    let (_dir, ledger) = open();
    let (tx, handle) = waiter();
    let total = rate * secs;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let ticket = ledger.submit_async(job_op(sent)).unwrap();
            tx.send((Instant::now(), ticket)).unwrap();
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    drop(tx);
    let latencies = handle.join().unwrap();
    (total as f64 / start.elapsed().as_secs_f64(), latencies)
}

fn row(name: &str, per_s: f64, latencies: &mut [Duration]) {
    latencies.sort_unstable();
    println!(
        "{name:<34} {per_s:>12.0} {:>9.2} {:>9.2} {:>9.2}",
        ms(percentile(latencies, 0.5)),
        ms(percentile(latencies, 0.99)),
        ms(*latencies.last().unwrap())
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run a smoke pass.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rate: u64 =
        std::env::var("LEDGER_BENCH_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let secs: u64 =
        std::env::var("LEDGER_BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let (single_ops, sat_ops, secs) = if quick { (20, 3000, 1) } else { (300, 300_000, secs) };

    println!("durable ledger transfers (reserve / pay+fee / release), every ack after its flush");
    println!(
        "{:<34} {:>12} {:>9} {:>9} {:>9}",
        "mode", "transfers/s", "p50 ms", "p99 ms", "max ms"
    );
    let single = one_at_a_time(single_ops);
    println!(
        "{:<34} {single:>12.0} {:>9} {:>9} {:>9}",
        "one at a time (1 flush per op)", "-", "-", "-"
    );
    let (per_s, mut lat) = saturated(sat_ops, 16_384);
    row("group commit, saturated", per_s, &mut lat);
    let (per_s, mut lat) = at_rate(rate, secs);
    row(&format!("group commit, offered {rate}/s"), per_s, &mut lat);
}
