//! Hostile workloads: each case ends with the right status and leaves the host unharmed.
//!
//! Guests are written in WAT against WASI preview 1. In every run the guest's preopens are
//! fd 3 = `/job` (read-only) and fd 4 = `/job/outputs` (writable).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::Path;
use std::time::{Duration, Instant};

use aimatrix_sandbox::wasm::{ModuleSource, WasmConfig, WasmExecutor};
use aimatrix_sandbox::{
    ExecError, ExecLimits, ExecOutcome, ExecStatus, Executor, JobWorkload, PreparedJob, RunControl,
};

fn limits() -> ExecLimits {
    ExecLimits { timeout: Duration::from_secs(10), memory_bytes: 16 << 20, ..ExecLimits::default() }
}

fn wasm(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).unwrap()
}

async fn run_in(
    executor: &WasmExecutor,
    bytes: Vec<u8>,
    limits: ExecLimits,
    setup: impl FnOnce(&Path),
) -> (tempfile::TempDir, Result<ExecOutcome, ExecError>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("inputs")).unwrap();
    std::fs::create_dir_all(dir.path().join("outputs")).unwrap();
    setup(dir.path());
    let job = PreparedJob::new(
        JobWorkload::Wasm(ModuleSource::new("guest.wasm", bytes)),
        dir.path(),
        limits,
    );
    let result = executor.run(job, RunControl::default()).await;
    (dir, result)
}

async fn run(bytes: Vec<u8>, limits: ExecLimits) -> ExecOutcome {
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    run_in(&executor, bytes, limits, |_| {}).await.1.unwrap()
}

const SPIN: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))"#;

/// A guest that calls `path_open(dirfd, path, oflags)` and exits with the errno (0 = opened).
/// Creating (`oflags` 1) asks for read and write rights, anything else for read only.
fn open_and_exit(dirfd: u32, path: &str, oflags: u32) -> Vec<u8> {
    let rights = if oflags & 1 == 1 { 0x42 } else { 0x2 };
    wasm(&format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "{path}")
  (func (export "_start")
    (call $exit (call $open (i32.const {dirfd}) (i32.const 0) (i32.const 100) (i32.const {len})
      (i32.const {oflags}) (i64.const {rights}) (i64.const {rights}) (i32.const 0) (i32.const 0)))))"#,
        len = path.len()
    ))
}

fn exit_code(outcome: &ExecOutcome) -> i32 {
    match outcome.status {
        ExecStatus::Succeeded => 0,
        ExecStatus::Failed { exit_code } => exit_code,
        ref other => panic!("expected an exit, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn infinite_loop_runs_out_of_fuel() {
    let outcome = run(wasm(SPIN), ExecLimits { fuel: Some(5_000_000), ..limits() }).await;
    assert_eq!(outcome.status, ExecStatus::OutOfFuel);
    assert!(outcome.usage.fuel_consumed >= 5_000_000, "{:?}", outcome.usage);
}

#[tokio::test(flavor = "multi_thread")]
async fn infinite_loop_hits_the_wall_time_deadline() {
    let started = Instant::now();
    let outcome =
        run(wasm(SPIN), ExecLimits { timeout: Duration::from_millis(300), ..limits() }).await;
    assert_eq!(outcome.status, ExecStatus::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(5), "the guest was stopped near its deadline");
    assert!(
        outcome.usage.cpu_ms > 0,
        "the busy guest's CPU time is accounted: {:?}",
        outcome.usage
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_asleep_in_a_host_call_is_stopped_at_the_deadline() {
    // poll_oneoff with one relative clock subscription of one hour.
    let guest = wasm(
        r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; subscription at 0: userdata u64, tag u8 at 8 = 0 (clock), clock id u32 at 16 = 1
  ;; (monotonic), timeout u64 at 24, precision u64 at 32, flags u16 at 40 (0 = relative)
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 200)))))"#,
    );
    let started = Instant::now();
    let outcome = run(guest, ExecLimits { timeout: Duration::from_millis(300), ..limits() }).await;
    assert_eq!(outcome.status, ExecStatus::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_growth_past_the_limit_is_out_of_memory() {
    let guest = wasm(
        r#"(module (memory (export "memory") 1)
  (func (export "_start")
    (loop (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable)) (br 0))))"#,
    );
    let outcome = run(guest, ExecLimits { memory_bytes: 8 << 20, ..limits() }).await;
    assert_eq!(outcome.status, ExecStatus::OutOfMemory);
    assert!(outcome.usage.peak_memory_bytes <= 8 << 20, "{:?}", outcome.usage);
    assert!(outcome.usage.peak_memory_bytes >= 4 << 20, "{:?}", outcome.usage);
}

#[tokio::test(flavor = "multi_thread")]
async fn unbounded_recursion_traps_with_stack_overflow() {
    let guest = wasm(
        r#"(module (memory (export "memory") 1)
  (func $f (param i64) (result i64) (i64.add (call $f (local.get 0)) (i64.const 1)))
  (func (export "_start") (drop (call $f (i64.const 0)))))"#,
    );
    let outcome = run(guest, limits()).await;
    assert_eq!(outcome.status, ExecStatus::Trapped { reason: "stack overflow".into() });
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_sees_only_its_job_directory() {
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    let setup = |dir: &Path| std::fs::write(dir.join("inputs/data.txt"), b"input").unwrap();
    // Positive controls: inputs are readable, outputs are writable.
    let (_d, ok) = run_in(&executor, open_and_exit(3, "inputs/data.txt", 0), limits(), setup).await;
    assert_eq!(exit_code(&ok.unwrap()), 0);
    let (d, ok) = run_in(&executor, open_and_exit(4, "made.txt", 1), limits(), |_| {}).await;
    assert_eq!(exit_code(&ok.unwrap()), 0);
    assert!(d.path().join("outputs/made.txt").exists());
    // Everything else is refused.
    let refused = [
        (3, "/etc/passwd", 0),
        (3, "../../../../etc/passwd", 0),
        (3, "inputs/../../../etc/passwd", 0),
        (4, "../../../etc/passwd", 0),
        (4, "..", 0),
        (3, "inputs/new.txt", 1), // inputs are read-only
        (3, "data-overwrite", 1),
    ];
    for (fd, path, oflags) in refused {
        let (_d, outcome) =
            run_in(&executor, open_and_exit(fd, path, oflags), limits(), setup).await;
        let code = exit_code(&outcome.unwrap());
        assert_ne!(code, 0, "opening {path:?} from fd {fd} must fail");
    }
    // There is no fd for anything else of the host.
    let (_d, outcome) =
        run_in(&executor, open_and_exit(5, "etc/passwd", 0), limits(), |_| {}).await;
    assert_eq!(exit_code(&outcome.unwrap()), 8, "fd 5 is not open (EBADF)");
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinks_in_outputs_never_make_the_host_read_a_host_file() {
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    let guest = wasm(
        r#"(module
  (import "wasi_snapshot_preview1" "path_symlink" (func $ln (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "/etc/passwd")
  (data (i32.const 200) "../../../../../etc/passwd")
  (data (i32.const 300) "abs")
  (data (i32.const 400) "rel")
  (func (export "_start")
    (drop (call $ln (i32.const 100) (i32.const 11) (i32.const 4) (i32.const 300) (i32.const 3)))
    (drop (call $ln (i32.const 200) (i32.const 25) (i32.const 4) (i32.const 400) (i32.const 3)))))"#,
    );
    let plant = |dir: &Path| {
        // As if an earlier guest or a bug had left host symlinks behind.
        std::os::unix::fs::symlink("/etc/passwd", dir.join("outputs/planted")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("outputs/planted-dir")).unwrap();
        std::fs::write(dir.join("outputs/real.txt"), b"ok").unwrap();
    };
    let (_d, outcome) = run_in(&executor, guest, limits(), plant).await;
    let outcome = outcome.unwrap();
    assert_eq!(outcome.status, ExecStatus::Succeeded);
    let names: Vec<&str> = outcome.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["real.txt"], "only the regular file is collected");
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_are_unavailable() {
    // Preview 1 has no socket creation; accepting on the preopened directory fails.
    let guest = wasm(
        r#"(module
  (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (call $accept (i32.const 3) (i32.const 0) (i32.const 0)))))"#,
    );
    let outcome = run(guest, limits()).await;
    assert_ne!(exit_code(&outcome), 0);
    // A module asking for a socket-creating import is refused before it runs.
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    let open_socket = wasm(
        r#"(module (import "wasi_snapshot_preview1" "sock_open" (func (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1) (func (export "_start")))"#,
    );
    let (_d, result) = run_in(&executor, open_socket, limits(), |_| {}).await;
    assert!(matches!(result, Err(ExecError::Link { .. })), "{result:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn writing_a_gibibyte_to_stdout_is_stopped_at_the_cap() {
    // 1024 writes of 1 MiB from an iovec pointing at the start of memory.
    let guest = wasm(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 17)
  (func (export "_start") (local $i i32)
    (i32.store (i32.const 1048576) (i32.const 0))
    (i32.store (i32.const 1048580) (i32.const 1048576))
    (loop
      (drop (call $write (i32.const 1) (i32.const 1048576) (i32.const 1) (i32.const 1048584)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if 0 (i32.lt_u (local.get $i) (i32.const 1024))))))"#,
    );
    let outcome =
        run(guest, ExecLimits { stdio_bytes: 1 << 20, memory_bytes: 32 << 20, ..limits() }).await;
    assert!(
        matches!(outcome.status, ExecStatus::OutputLimitExceeded { ref what } if what.contains("stdout")),
        "{}",
        outcome.status
    );
    assert!(outcome.stdout.len() <= 1 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_file_past_the_quota_is_stopped() {
    // Create outputs/big and append 64 KiB forever.
    let guest = wasm(
        r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) "big")
  (func (export "_start")
    (drop (call $open (i32.const 4) (i32.const 0) (i32.const 100) (i32.const 3) (i32.const 9)
      (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0) (i32.const 200)))
    (i32.store (i32.const 300) (i32.const 1024))
    (i32.store (i32.const 304) (i32.const 65536))
    (loop (drop (call $write (i32.load (i32.const 200)) (i32.const 300) (i32.const 1) (i32.const 400))) (br 0))))"#,
    );
    let outcome = run(guest, ExecLimits { output_quota_bytes: 1 << 20, ..limits() }).await;
    assert!(matches!(outcome.status, ExecStatus::OutputLimitExceeded { .. }), "{}", outcome.status);
    assert!(outcome.outputs.is_empty(), "nothing past the quota is reported as output");
}

#[tokio::test(flavor = "multi_thread")]
async fn modules_that_cannot_run_are_refused_with_a_reason() {
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    let missing =
        wasm(r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#);
    let (_d, result) = run_in(&executor, missing, limits(), |_| {}).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, ExecError::Link { .. }) && err.to_string().contains("launch_missiles"),
        "{err}"
    );

    let (_d, result) = run_in(&executor, b"#!/bin/sh\nrm -rf /\n".to_vec(), limits(), |_| {}).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, ExecError::InvalidModule { .. }) && err.to_string().contains("\\0asm"),
        "{err}"
    );

    let mut truncated = wasm(SPIN);
    truncated.truncate(12);
    let (_d, result) = run_in(&executor, truncated, limits(), |_| {}).await;
    assert!(matches!(result, Err(ExecError::InvalidModule { .. })), "{result:?}");

    let mut huge = b"\0asm\x01\0\0\0".to_vec();
    huge.resize(100 << 20, 0);
    let (_d, result) = run_in(&executor, huge.clone(), limits(), |_| {}).await;
    assert!(
        matches!(result, Err(ExecError::ModuleTooLarge { bytes, .. }) if bytes == 100 << 20),
        "{result:?}"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &huge).unwrap();
    let refused = ModuleSource::from_file(file.path(), 64 << 20);
    assert!(matches!(refused, Err(ExecError::ModuleTooLarge { .. })));

    // The executor is unharmed: a normal module still runs.
    let (_d, ok) = run_in(&executor, open_and_exit(4, "x", 1), limits(), |_| {}).await;
    assert_eq!(exit_code(&ok.unwrap()), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancellation_stops_a_running_guest() {
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = PreparedJob::new(
        JobWorkload::Wasm(ModuleSource::new("spin", wasm(SPIN))),
        dir.path(),
        limits(),
    );
    let control = RunControl::default();
    let cancel = control.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
    });
    let outcome = executor.run(job, control).await.unwrap();
    assert_eq!(outcome.status, ExecStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_traps_and_progress_are_reported() {
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    let guest = wasm(
        r#"(module
  (import "aimatrix" "progress" (func $progress (param i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $progress (i32.const 50)) (call $progress (i32.const 100)) (call $exit (i32.const 3))))"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let control = RunControl { progress: Some(tx), ..RunControl::default() };
    let job =
        PreparedJob::new(JobWorkload::Wasm(ModuleSource::new("p", guest)), dir.path(), limits());
    let outcome = executor.run(job, control).await.unwrap();
    assert_eq!(outcome.status, ExecStatus::Failed { exit_code: 3 });
    assert_eq!((rx.recv().await, rx.recv().await), (Some(50), Some(100)));

    let trap =
        wasm(r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#);
    let (_d, outcome) = run_in(&executor, trap, limits(), |_| {}).await;
    assert!(
        matches!(outcome.unwrap().status, ExecStatus::Trapped { reason } if reason.contains("unreachable"))
    );
}

const NOISY: &str = r#"(module
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "noise")
  (func (export "_start")
    (drop (call $random (i32.const 1000) (i32.const 32)))
    (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 1032)))
    (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 1040)))
    (drop (call $open (i32.const 4) (i32.const 0) (i32.const 100) (i32.const 5) (i32.const 9)
      (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0) (i32.const 200)))
    (i32.store (i32.const 300) (i32.const 1000))
    (i32.store (i32.const 304) (i32.const 48))
    (drop (call $write (i32.load (i32.const 200)) (i32.const 300) (i32.const 1) (i32.const 400)))))"#;

/// Runs `bytes` in a fresh job directory, in deterministic mode or not.
async fn run_mode(executor: &WasmExecutor, bytes: Vec<u8>, deterministic: bool) -> ExecOutcome {
    let dir = tempfile::tempdir().unwrap();
    let mut job = PreparedJob::new(
        JobWorkload::Wasm(ModuleSource::new("guest", bytes)),
        dir.path(),
        limits(),
    );
    job.deterministic = deterministic;
    executor.run(job, RunControl::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn deterministic_mode_gives_bitwise_identical_outputs() {
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    let mut digests = Vec::new();
    for deterministic in [true, true, false, false] {
        let outcome = run_mode(&executor, wasm(NOISY), deterministic).await;
        assert_eq!(outcome.status, ExecStatus::Succeeded);
        assert_eq!(outcome.outputs.len(), 1);
        digests.push(outcome.outputs[0].sha256);
    }
    assert_eq!(digests[0], digests[1], "deterministic runs agree");
    assert_ne!(digests[2], digests[3], "ordinary runs see real clocks and randomness");
}

/// Relaxed SIMD lets a host pick its own answer for some inputs: `i32x4.relaxed_trunc_f32x4_s`
/// of NaN and of 3e9 is 0 and `i32::MAX` (saturating) on AArch64, `i32::MIN` for both on x86.
/// The guest exits 0 when it sees the saturating answers, 1 when it sees x86's.
const RELAXED_TRUNC: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $v v128)
    (local.set $v (i32x4.relaxed_trunc_f32x4_s (v128.const f32x4 nan 3e9 0 0)))
    (if (i32.and
          (i32.eqz (i32x4.extract_lane 0 (local.get $v)))
          (i32.eq (i32x4.extract_lane 1 (local.get $v)) (i32.const 0x7fffffff)))
      (then (call $exit (i32.const 0))))
    (call $exit (i32.const 1))))"#;

#[tokio::test(flavor = "multi_thread")]
async fn deterministic_mode_gives_relaxed_simd_one_answer_on_every_host() {
    let executor = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    let mut codes = Vec::new();
    for deterministic in [true, false] {
        codes.push(exit_code(&run_mode(&executor, wasm(RELAXED_TRUNC), deterministic).await));
    }
    assert_eq!(
        codes[0], 0,
        "deterministic mode saturates, as the specification's deterministic profile says"
    );
    if cfg!(target_arch = "x86_64") {
        // Without deterministic mode the host's own instruction answers: proof that the
        // deterministic answer is not simply what this host does anyway.
        assert_eq!(codes[1], 1, "x86 answers i32::MIN outside deterministic mode");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn modules_are_compiled_once_and_reloaded_from_the_disk_cache() {
    let cache = tempfile::tempdir().unwrap();
    let guest = open_and_exit(4, "x", 1);
    {
        let executor = WasmExecutor::new(WasmConfig::in_dir(cache.path())).unwrap();
        for _ in 0..3 {
            let (_d, outcome) = run_in(&executor, guest.clone(), limits(), |_| {}).await;
            assert_eq!(exit_code(&outcome.unwrap()), 0);
        }
        let stats = executor.cache_stats();
        assert_eq!((stats.compiled, stats.loaded_from_disk, stats.memory_hits), (1, 0, 2));
    }
    let executor = WasmExecutor::new(WasmConfig::in_dir(cache.path())).unwrap();
    let (_d, outcome) = run_in(&executor, guest, limits(), |_| {}).await;
    assert_eq!(exit_code(&outcome.unwrap()), 0);
    let stats = executor.cache_stats();
    assert_eq!((stats.compiled, stats.loaded_from_disk), (0, 1));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cache.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the cache is private to the node");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_cache_entry_is_recompiled_not_loaded() {
    let cache = tempfile::tempdir().unwrap();
    let guest = open_and_exit(4, "x", 1);
    {
        let executor = WasmExecutor::new(WasmConfig::in_dir(cache.path())).unwrap();
        let (_d, outcome) = run_in(&executor, guest.clone(), limits(), |_| {}).await;
        outcome.unwrap();
    }
    // Flip a byte in every stored artifact.
    for engine_dir in std::fs::read_dir(cache.path()).unwrap() {
        for file in std::fs::read_dir(engine_dir.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xFF;
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let executor = WasmExecutor::new(WasmConfig::in_dir(cache.path())).unwrap();
    let (_d, outcome) = run_in(&executor, guest, limits(), |_| {}).await;
    assert_eq!(exit_code(&outcome.unwrap()), 0);
    assert_eq!(executor.cache_stats().compiled, 1);
}
