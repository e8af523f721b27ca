//! A sandbox leaves no threads behind: the epoch ticker stops with its executor, also after a
//! guest was killed at its deadline; and the ticker sleeps while no guest runs. (Its own test
//! binary, so no other test's executor is alive.)

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::Duration;

use aimatrix_sandbox::wasm::{ModuleSource, WasmConfig, WasmExecutor};
use aimatrix_sandbox::{ExecLimits, ExecStatus, Executor, JobWorkload, PreparedJob, RunControl};

fn epoch_thread_dirs() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|t| t.unwrap().path())
        .filter(|t| {
            std::fs::read_to_string(t.join("comm"))
                .is_ok_and(|name| name.trim() == "aimatrix-epoch")
        })
        .collect()
}

fn epoch_threads() -> usize {
    epoch_thread_dirs().len()
}

/// How many times the ticker thread was switched out (it sleeps a tick, or parks).
fn ticker_switches() -> u64 {
    let dir = &epoch_thread_dirs()[0];
    let status = std::fs::read_to_string(dir.join("status")).unwrap();
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches"))
        .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_threads_outlive_the_executor() {
    assert_eq!(epoch_threads(), 0);
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    assert_eq!(epoch_threads(), 1);
    let spin = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let limits = ExecLimits { timeout: Duration::from_millis(200), ..ExecLimits::default() };
    let job =
        PreparedJob::new(JobWorkload::Wasm(ModuleSource::new("spin", spin)), dir.path(), limits);
    let before = ticker_switches();
    let outcome = executor.run(job, RunControl::default()).await.unwrap();
    assert_eq!(outcome.status, ExecStatus::TimedOut);
    let ran = ticker_switches() - before;
    assert!(ran >= 10, "200 ms of a running guest took {ran} ticks of 5 ms");
    // Idle, the ticker is parked: 300 ms (60 ticks) pass with (almost) no wake-up.
    let idle = ticker_switches();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let woke = ticker_switches() - idle;
    assert!(woke <= 2, "the idle ticker woke {woke} times in 300 ms");
    drop(executor);
    assert_eq!(epoch_threads(), 0, "the ticker thread was joined");
}
