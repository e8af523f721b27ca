//! A sandbox leaves no threads behind: the epoch ticker stops with its executor, also after a
//! guest was killed at its deadline. (Its own test binary, so no other test's executor is alive.)

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::Duration;

use aimatrix_sandbox::wasm::{ModuleSource, WasmConfig, WasmExecutor};
use aimatrix_sandbox::{ExecLimits, ExecStatus, Executor, JobWorkload, PreparedJob, RunControl};

fn epoch_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|name| name.trim() == "aimatrix-epoch")
        })
        .count()
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
    let outcome = executor.run(job, RunControl::default()).await.unwrap();
    assert_eq!(outcome.status, ExecStatus::TimedOut);
    drop(executor);
    assert_eq!(epoch_threads(), 0, "the ticker thread was joined");
}
