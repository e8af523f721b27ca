//! The wasmtime executor: WASI preview 1 core modules under hard limits.
//!
//! - **Filesystem**: the guest sees one job directory, `/job`, read-only (its `inputs/`), with
//!   `/job/outputs` writable; nothing else of the host. No network: no sockets are preopened and
//!   TCP, UDP and name lookup are refused.
//! - **Environment and arguments**: exactly what the job sets; `argv[0]` is the module name.
//! - **Memory**: a [`wasmtime::ResourceLimiter`] caps linear memory and records the peak.
//! - **Time**: an epoch ticker thread advances every engine's epoch every [`WasmConfig::tick`]
//!   while a guest runs (it sleeps, parked, while none does, so an idle node never wakes for it);
//!   guests yield to the async runtime at each tick, so the wall-time deadline and cancellation
//!   interrupt both busy guests and guests blocked in a host call (sleep).
//! - **Fuel**: an optional budget on engines with fuel metering.
//! - **Stack**: [`ExecLimits::stack_bytes`](crate::ExecLimits::stack_bytes).
//! - **Output**: stdout and stderr captured up to a cap; the outputs directory is watched against
//!   its quota while the guest runs and collected safely afterwards ([`crate::outputs`]).
//! - **Deterministic mode**: NaN canonicalization, relaxed SIMD's deterministic profile, and the
//!   clock and random imports replaced by deterministic ones, so replicas produce
//!   bitwise-identical outputs.
//! - **Compilation**: each module is compiled at most once per engine variant and kept
//!   pre-linked ([`wasmtime::InstancePre`]) in memory and, compiled, on disk ([`cache`]).

mod cache;
mod deterministic;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aimatrix_protocol::hash::Digest;
use tokio::sync::mpsc;
use wasmtime::{
    Caller, Config, Engine, InstancePre, Linker, ResourceLimiter, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::{
    outputs, ExecError, ExecLimits, ExecOutcome, ExecStatus, Executor, JobWorkload, PreparedJob,
    RunControl, RunFuture, Usage,
};

pub use cache::CacheStats;

/// Executor settings.
#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// Where compiled modules are kept; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Largest module accepted.
    pub max_module_bytes: u64,
    /// Epoch tick: the resolution of the wall-time deadline and of cancellation.
    pub tick: Duration,
}

impl WasmConfig {
    /// Compiled modules cached in `dir` (created owner-only if missing).
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Self { cache_dir: Some(dir.into()), ..Self::in_memory() }
    }

    /// Compiled modules kept in memory only.
    pub fn in_memory() -> Self {
        Self { cache_dir: None, max_module_bytes: 64 << 20, tick: Duration::from_millis(5) }
    }
}

/// A module's bytes with their digest (the cache key).
#[derive(Clone)]
pub struct ModuleSource {
    name: String,
    bytes: Arc<[u8]>,
    digest: Digest,
}

impl std::fmt::Debug for ModuleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleSource")
            .field("name", &self.name)
            .field("bytes", &self.bytes.len())
            .field("digest", &self.digest)
            .finish()
    }
}

impl ModuleSource {
    /// Wraps module bytes; `name` becomes `argv[0]` and appears in errors.
    pub fn new(name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> Self {
        let bytes = bytes.into();
        Self { name: name.into(), digest: Digest::of(&bytes), bytes }
    }

    /// Reads a module file, refusing files over `max_bytes` before reading them.
    pub fn from_file(path: &Path, max_bytes: u64) -> Result<Self, ExecError> {
        let name = path
            .file_name()
            .map_or_else(|| "module.wasm".into(), |n| n.to_string_lossy().into_owned());
        let internal =
            |e: std::io::Error| ExecError::Internal(format!("cannot read {}: {e}", path.display()));
        let len = std::fs::metadata(path).map_err(internal)?.len();
        if len > max_bytes {
            return Err(ExecError::ModuleTooLarge { name, bytes: len, max: max_bytes });
        }
        Ok(Self::new(name, std::fs::read(path).map_err(internal)?))
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The module's SHA-256.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The module's size.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the module is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Which engine a job needs: engines differ in fuel metering and NaN canonicalization, and
/// compiled code is specific to one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EngineKind {
    pub(crate) fuel: bool,
    pub(crate) deterministic: bool,
}

impl EngineKind {
    const ALL: [Self; 4] = [
        Self { fuel: false, deterministic: false },
        Self { fuel: true, deterministic: false },
        Self { fuel: false, deterministic: true },
        Self { fuel: true, deterministic: true },
    ];

    fn index(self) -> usize {
        usize::from(self.fuel) + 2 * usize::from(self.deterministic)
    }

    fn label(self) -> &'static str {
        match (self.fuel, self.deterministic) {
            (false, false) => "plain",
            (true, false) => "fuel",
            (false, true) => "det",
            (true, true) => "fuel-det",
        }
    }
}

/// Per-run state shared with the limiter and the epoch callback, readable after the store is
/// gone (a timed-out run drops its store).
#[derive(Debug, Default)]
struct RunShared {
    peak_memory: AtomicU64,
    out_of_memory: AtomicBool,
    output_quota_hit: AtomicBool,
    fuel_left: AtomicU64,
}

struct Limiter {
    memory_max: usize,
    shared: Arc<RunShared>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_max {
            self.shared.out_of_memory.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        self.shared.peak_memory.fetch_max(desired as u64, Ordering::Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// The store's data.
pub(crate) struct State {
    wasi: WasiP1Ctx,
    limiter: Limiter,
    progress: Option<mpsc::Sender<u8>>,
    pub(crate) det: deterministic::DetState,
}

/// Runs WASI preview 1 modules in wasmtime.
pub struct WasmExecutor {
    cfg: WasmConfig,
    engines: Vec<Engine>,
    linkers: Vec<Linker<State>>,
    cache: cache::ModuleCache,
    ticker: Ticker,
}

impl std::fmt::Debug for WasmExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmExecutor").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

fn engine_config(kind: EngineKind, stack_bytes: usize) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.consume_fuel(kind.fuel);
    // Deterministic mode: one NaN bit pattern, and relaxed SIMD's deterministic profile
    // (otherwise e.g. `relaxed_trunc` of NaN is 0 on AArch64 and i32::MIN on x86).
    config.cranelift_nan_canonicalization(kind.deterministic);
    config.relaxed_simd_deterministic(kind.deterministic);
    config.max_wasm_stack(stack_bytes);
    // Only what WASI preview 1 core modules need.
    config.wasm_threads(false);
    config.wasm_component_model(false);
    config
}

/// The stack limit all engines are built with (a per-job value would need an engine per job).
pub const STACK_BYTES: usize = 1 << 20;

impl WasmExecutor {
    /// Builds the engines (plain, fuel-metered, deterministic, both) and starts the epoch ticker.
    pub fn new(cfg: WasmConfig) -> Result<Self, ExecError> {
        let mut engines = Vec::new();
        let mut linkers = Vec::new();
        for kind in EngineKind::ALL {
            let engine = Engine::new(&engine_config(kind, STACK_BYTES)).map_err(|e| {
                ExecError::Internal(format!("cannot create the wasm engine: {e:#}"))
            })?;
            linkers.push(
                build_linker(&engine, kind).map_err(|e| ExecError::Internal(format!("{e:#}")))?,
            );
            engines.push(engine);
        }
        let cache = cache::ModuleCache::new(cfg.cache_dir.clone())?;
        let ticker = Ticker::start(engines.clone(), cfg.tick).map_err(|e| {
            ExecError::Internal(format!("cannot start the epoch ticker thread: {e}"))
        })?;
        Ok(Self { cfg, engines, linkers, cache, ticker })
    }

    /// Compile-cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Compiles (or loads from the cache) `module` for the engine a job with these settings
    /// would use, without running it: `exec --check` and warm-up.
    pub async fn prepare(
        &self,
        module: &ModuleSource,
        fuel: bool,
        deterministic: bool,
    ) -> Result<(), ExecError> {
        self.instance_pre(module, EngineKind { fuel, deterministic }).await.map(|_| ())
    }

    async fn instance_pre(
        &self,
        module: &ModuleSource,
        kind: EngineKind,
    ) -> Result<InstancePre<State>, ExecError> {
        if module.bytes.len() as u64 > self.cfg.max_module_bytes {
            return Err(ExecError::ModuleTooLarge {
                name: module.name.clone(),
                bytes: module.bytes.len() as u64,
                max: self.cfg.max_module_bytes,
            });
        }
        let i = kind.index();
        self.cache.get_or_compile(&self.engines[i], &self.linkers[i], kind, module).await
    }

    async fn run_wasm(
        &self,
        job: PreparedJob,
        control: RunControl,
    ) -> Result<ExecOutcome, ExecError> {
        let JobWorkload::Wasm(module) = &job.workload else {
            return Err(ExecError::Internal("the wasm executor runs wasm modules".into()));
        };
        let limits = job.limits;
        let kind = EngineKind { fuel: limits.fuel.is_some(), deterministic: job.deterministic };
        let pre = self.instance_pre(module, kind).await?;
        let outputs_dir = crate::prepare_work_dir(&job.work_dir)?;

        // One byte over the cap tells a guest that wrote exactly the cap from one that wrote more.
        let stdout = MemoryOutputPipe::new(limits.stdio_bytes.saturating_add(1));
        let stderr = MemoryOutputPipe::new(limits.stdio_bytes.saturating_add(1));
        let wasi = build_wasi(&job, module, &outputs_dir, &stdout, &stderr)?;
        let shared = Arc::new(RunShared::default());
        let memory_max = usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
        let state = State {
            wasi,
            limiter: Limiter { memory_max, shared: shared.clone() },
            progress: control.progress.clone(),
            det: deterministic::DetState::default(),
        };
        let mut store = Store::new(&self.engines[kind.index()], state);
        store.limiter(|s| &mut s.limiter);
        let fuel = limits.fuel.unwrap_or(0);
        if kind.fuel {
            store.set_fuel(fuel).map_err(|e| ExecError::Internal(format!("{e:#}")))?;
            shared.fuel_left.store(fuel, Ordering::Relaxed);
        }
        // Epochs advance while this guest runs (and only while some guest does).
        let _ticking = self.ticker.running();
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(epoch_callback(
            shared.clone(),
            outputs_dir.clone(),
            limits,
            kind.fuel,
        ));

        let started = Instant::now();
        let cpu_ns = Arc::new(AtomicU64::new(0));
        let ended = {
            let guest =
                CpuTimed { inner: Box::pin(run_guest(&mut store, &pre)), cpu_ns: cpu_ns.clone() };
            tokio::select! {
                biased;
                () = control.cancel.cancelled() => Ended::Cancelled,
                () = tokio::time::sleep(limits.timeout) => Ended::TimedOut,
                result = guest => Ended::Finished(result),
            }
        };
        if kind.fuel {
            if let Ok(left) = store.get_fuel() {
                shared.fuel_left.store(left, Ordering::Relaxed);
            }
        }
        drop(store);
        let wall_ms = started.elapsed().as_millis() as u64;

        let mut stdout = stdout.contents().to_vec();
        let mut stderr = stderr.contents().to_vec();
        let mut status = classify(ended, &shared, limits.stdio_bytes, stdout.len(), stderr.len());
        stdout.truncate(limits.stdio_bytes);
        stderr.truncate(limits.stdio_bytes);
        let outputs = outputs::collect_for_run(&outputs_dir, &limits, &mut status);
        let usage = Usage {
            wall_ms,
            cpu_ms: cpu_ns.load(Ordering::Relaxed) / 1_000_000,
            peak_memory_bytes: shared.peak_memory.load(Ordering::Relaxed),
            fuel_consumed: if kind.fuel {
                fuel.saturating_sub(shared.fuel_left.load(Ordering::Relaxed))
            } else {
                0
            },
        };
        Ok(ExecOutcome { status, stdout, stderr, outputs, usage })
    }
}

impl Executor for WasmExecutor {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn run(&self, job: PreparedJob, control: RunControl) -> RunFuture<'_> {
        Box::pin(self.run_wasm(job, control))
    }
}

enum Ended {
    Finished(wasmtime::Result<()>),
    TimedOut,
    Cancelled,
}

async fn run_guest(store: &mut Store<State>, pre: &InstancePre<State>) -> wasmtime::Result<()> {
    let instance = pre.instantiate_async(&mut *store).await?;
    let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
    start.call_async(&mut *store, ()).await
}

/// Every epoch tick: record fuel, check the outputs quota (every 16th tick), yield to the
/// runtime so the deadline and cancellation can fire.
fn epoch_callback(
    shared: Arc<RunShared>,
    outputs_dir: PathBuf,
    limits: ExecLimits,
    fuel: bool,
) -> impl FnMut(wasmtime::StoreContextMut<'_, State>) -> wasmtime::Result<UpdateDeadline>
       + Send
       + Sync
       + 'static {
    let mut ticks = 0u64;
    move |ctx| {
        ticks += 1;
        if fuel {
            if let Ok(left) = ctx.get_fuel() {
                shared.fuel_left.store(left, Ordering::Relaxed);
            }
        }
        if ticks.is_multiple_of(16)
            && outputs::usage(&outputs_dir, limits.output_quota_bytes) > limits.output_quota_bytes
        {
            shared.output_quota_hit.store(true, Ordering::Relaxed);
            return Err(wasmtime::format_err!("outputs directory passed its quota"));
        }
        Ok(UpdateDeadline::Yield(1))
    }
}

fn classify(
    ended: Ended,
    shared: &RunShared,
    stdio_cap: usize,
    stdout_len: usize,
    stderr_len: usize,
) -> ExecStatus {
    let error = match ended {
        Ended::Cancelled => return ExecStatus::Cancelled,
        Ended::TimedOut => return ExecStatus::TimedOut,
        Ended::Finished(result) => result.err(),
    };
    // Writing past the stdio cap fails the guest's write; whatever it did next, the job broke
    // its output limit.
    if let Some(overflow) = crate::stdio_overflow(stdout_len, stderr_len, stdio_cap) {
        return overflow;
    }
    let Some(error) = error else { return ExecStatus::Succeeded };
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        return if exit.0 == 0 {
            ExecStatus::Succeeded
        } else {
            ExecStatus::Failed { exit_code: exit.0 }
        };
    }
    if shared.output_quota_hit.load(Ordering::Relaxed) {
        return ExecStatus::OutputLimitExceeded {
            what: "outputs directory passed its quota".into(),
        };
    }
    if shared.out_of_memory.load(Ordering::Relaxed) {
        return ExecStatus::OutOfMemory;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => ExecStatus::OutOfFuel,
        Some(Trap::StackOverflow) => ExecStatus::Trapped { reason: "stack overflow".into() },
        Some(trap) => ExecStatus::Trapped { reason: trap.to_string() },
        None => ExecStatus::Trapped { reason: format!("{error:#}") },
    }
}

/// The guest's WASI context: one job directory, no network, only the job's args and env.
fn build_wasi(
    job: &PreparedJob,
    module: &ModuleSource,
    outputs_dir: &Path,
    stdout: &MemoryOutputPipe,
    stderr: &MemoryOutputPipe,
) -> Result<WasiP1Ctx, ExecError> {
    let err = |e: wasmtime::Error| ExecError::WorkDir {
        path: job.work_dir.display().to_string(),
        reason: format!("{e:#}"),
    };
    let mut b = WasiCtxBuilder::new();
    let mut argv = vec![module.name.clone()];
    argv.extend(job.args.iter().cloned());
    b.args(&argv);
    for (k, v) in &job.env {
        b.env(k, v);
    }
    b.stdout(stdout.clone()).stderr(stderr.clone());
    b.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
    b.preopened_dir(&job.work_dir, "/job", FsPerms::ReadOnly).map_err(err)?;
    b.preopened_dir(outputs_dir, "/job/outputs", FsPerms::ReadWrite).map_err(err)?;
    if job.deterministic {
        b.insecure_random_seed(0);
    }
    Ok(b.build_p1())
}

fn build_linker(engine: &Engine, kind: EngineKind) -> wasmtime::Result<Linker<State>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut State| &mut s.wasi)?;
    linker.func_wrap("aimatrix", "progress", |caller: Caller<'_, State>, percent: i32| {
        if let Some(tx) = &caller.data().progress {
            let _ = tx.try_send(percent.clamp(0, 100) as u8);
        }
    })?;
    if kind.deterministic {
        linker.allow_shadowing(true);
        deterministic::shadow_nondeterministic_imports(&mut linker)?;
        linker.allow_shadowing(false);
    }
    Ok(linker)
}

/// Measures the thread CPU time spent polling a future (the guest runs inside `poll`).
struct CpuTimed<F> {
    inner: Pin<Box<F>>,
    cpu_ns: Arc<AtomicU64>,
}

impl<F: Future> Future for CpuTimed<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let before = thread_cpu_ns();
        let result = self.inner.as_mut().poll(cx);
        self.cpu_ns.fetch_add(thread_cpu_ns().saturating_sub(before), Ordering::Relaxed);
        result
    }
}

fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// The thread that advances every engine's epoch while a guest runs, and sleeps (parked)
/// while none does: an idle node does not wake every tick. Stopped and joined on drop.
struct Ticker {
    stop: Arc<AtomicBool>,
    /// Guests running now.
    running: Arc<AtomicUsize>,
    handle: Mutex<Option<JoinHandle<()>>>,
    thread: std::thread::Thread,
}

/// A running guest: epochs advance until the last one is dropped.
struct Ticking<'a>(&'a Ticker);

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ticker {
    fn start(engines: Vec<Engine>, tick: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicUsize::new(0));
        let (flag, active) = (stop.clone(), running.clone());
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let handle =
            std::thread::Builder::new().name("aimatrix-epoch".into()).spawn(move || {
                let _ = started_tx.send(());
                while !flag.load(Ordering::Relaxed) {
                    if active.load(Ordering::Acquire) == 0 {
                        // A guest starting unparks this thread (an unpark that comes first
                        // makes this park return at once).
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(tick);
                    for engine in &engines {
                        engine.increment_epoch();
                    }
                }
            })?;
        // Return once the ticker runs (and carries its name).
        let _ = started_rx.recv();
        let thread = handle.thread().clone();
        Ok(Self { stop, running, handle: Mutex::new(Some(handle)), thread })
    }

    /// A guest starts running: epochs advance until the returned guard is dropped.
    fn running(&self) -> Ticking<'_> {
        if self.running.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        Ticking(self)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.unpark();
        if let Some(handle) = self.handle.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
    }
}
