//! The Docker executor: jobs that need a whole Linux userland, run hardened by default.
//!
//! Every container gets: no network (`network_mode = none`: loopback only); a read-only root
//! filesystem; the job's `inputs/` bind-mounted read-only at `/job/inputs` and `outputs/`
//! read-write at `/job/outputs` as the only writable paths besides a size-capped `/tmp` tmpfs;
//! all capabilities dropped; `no-new-privileges`; a non-root user; a pids limit; memory equal to
//! memory+swap; a CPU share of the node's cores; ulimits; an init process; logging disabled
//! (output is captured through an attach stream, capped like the wasm executor's). The executor
//! enforces the wall-time deadline itself (kill, then remove). Containers are always removed:
//! after a normal exit, at the deadline, on cancellation, and — if the future is dropped or the
//! node was interrupted — by a removal task or by [`DockerExecutor::remove_leftovers`] at the
//! next start. A node never pulls images: a job names a local image by tag or digest, and a
//! missing one is a clear failure.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, DeviceRequest, HostConfig, HostConfigLogConfig, Mount,
    MountType, ResourcesUlimits,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StatsOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::Mutex;

use crate::{
    outputs, stdio_overflow, ExecError, ExecLimits, ExecOutcome, ExecStatus, Executor, JobWorkload,
    PreparedJob, RunControl, RunFuture, Usage, INPUTS_DIR,
};

/// The label every aimatrix job container carries (value: the executor's owner tag).
pub const OWNER_LABEL: &str = "org.aimatrix.owner";

/// How long a container that died of an unexplained SIGKILL is watched for the engine's
/// out-of-memory report, which can arrive after its exit.
const OOM_REPORT_WAIT: Duration = Duration::from_secs(2);

/// A container image workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerWorkload {
    /// Image by tag or digest; must already be present on the node.
    pub image: String,
    /// Command (replaces the image's entrypoint when non-empty); the job's args follow it.
    pub command: Vec<String>,
    /// NVIDIA GPUs to request.
    pub gpus: u32,
}

/// Whether a Docker engine can run jobs here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DockerStatus {
    /// The engine answered.
    Available {
        /// Engine version.
        version: String,
        /// Whether the engine has the NVIDIA runtime (GPU jobs).
        nvidia_runtime: bool,
    },
    /// No usable engine, and why.
    Unavailable {
        /// The reason, for `detect` and logs.
        reason: String,
    },
}

/// Finds the engine through `DOCKER_HOST` or the default socket and asks its version.
pub async fn probe() -> DockerStatus {
    let docker = match Docker::connect_with_defaults() {
        Ok(d) => d,
        Err(e) => return DockerStatus::Unavailable { reason: format!("cannot connect: {e}") },
    };
    let version = match tokio::time::timeout(Duration::from_secs(3), docker.version()).await {
        Ok(Ok(v)) => v.version.unwrap_or_else(|| "unknown".into()),
        Ok(Err(e)) => return DockerStatus::Unavailable { reason: unreachable_reason(&e) },
        Err(_) => {
            return DockerStatus::Unavailable {
                reason: "the engine did not answer within 3 s".into(),
            }
        }
    };
    let nvidia_runtime = match docker.info().await {
        Ok(info) => info.runtimes.is_some_and(|r| r.contains_key("nvidia")),
        Err(_) => false,
    };
    DockerStatus::Available { version, nvidia_runtime }
}

fn unreachable_reason(e: &bollard::errors::Error) -> String {
    let host =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    format!("the engine at {host} is unreachable: {e}")
}

/// Executor settings.
#[derive(Clone, Debug)]
pub struct DockerConfig {
    /// Share of the node's cores a container may use, in (0, 1].
    pub cpu_share: f64,
    /// Size of the `/tmp` tmpfs.
    pub tmp_bytes: u64,
    /// Most processes in one container.
    pub pids_limit: i64,
    /// Most open files in one container.
    pub nofile: i64,
    /// Tag in the [`OWNER_LABEL`] of this executor's containers (e.g. the node's peer id), so
    /// leftovers of an interrupted run can be found and removed.
    pub owner: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            cpu_share: 0.8,
            tmp_bytes: 64 << 20,
            pids_limit: 256,
            nofile: 1024,
            owner: "aimatrix-node".into(),
        }
    }
}

/// Runs container jobs through the Docker engine.
#[derive(Debug, Clone)]
pub struct DockerExecutor {
    docker: Docker,
    cfg: DockerConfig,
    cpus: usize,
}

impl DockerExecutor {
    /// Connects to the engine (`DOCKER_HOST` or the default socket) and checks it answers.
    pub async fn connect(cfg: DockerConfig) -> Result<Self, ExecError> {
        let docker = Docker::connect_with_defaults().map_err(|e| {
            ExecError::Internal(format!("cannot connect to the Docker engine: {e}"))
        })?;
        docker.ping().await.map_err(|e| ExecError::Internal(unreachable_reason(&e)))?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self { docker, cfg, cpus })
    }

    /// Removes containers this executor's owner left behind (an interrupted node); returns how
    /// many.
    pub async fn remove_leftovers(&self) -> Result<usize, ExecError> {
        let ids = self.owned_containers().await?;
        for id in &ids {
            remove(&self.docker, id).await;
        }
        Ok(ids.len())
    }

    /// Imports a root filesystem tarball as image `image` (`name:tag`) — the engine's
    /// create-image from source, no registry involved; how tests and the demo get images.
    pub async fn import_rootfs(&self, image: &str, rootfs_tar: Vec<u8>) -> Result<(), ExecError> {
        let (repo, tag) = image.split_once(':').unwrap_or((image, "latest"));
        let options =
            CreateImageOptionsBuilder::default().from_src("-").repo(repo).tag(tag).build();
        let mut progress = self.docker.create_image(
            Some(options),
            Some(bollard::body_full(rootfs_tar.into())),
            None,
        );
        while let Some(step) = progress.next().await {
            step.map_err(|e| ExecError::Internal(format!("cannot import image {image}: {e}")))?;
        }
        Ok(())
    }

    /// Whether `image` is present on this node.
    pub async fn has_image(&self, image: &str) -> bool {
        self.docker.inspect_image(image).await.is_ok()
    }

    /// Removes every aimatrix job container (of any owner) whose owner tag satisfies `stale`,
    /// e.g. containers of `aimatrix-node exec` runs whose process is gone; returns how many.
    pub async fn remove_stale_owners(
        &self,
        stale: impl Fn(&str) -> bool,
    ) -> Result<usize, ExecError> {
        let mut removed = 0;
        for container in self.list_labelled(OWNER_LABEL.to_owned()).await? {
            let owner = container.labels.as_ref().and_then(|l| l.get(OWNER_LABEL));
            if let (Some(id), Some(owner)) = (&container.id, owner) {
                if stale(owner) {
                    remove(&self.docker, id).await;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Ids of the containers (running or not) carrying this executor's owner label.
    pub async fn owned_containers(&self) -> Result<Vec<String>, ExecError> {
        let owned = self.list_labelled(format!("{OWNER_LABEL}={}", self.cfg.owner)).await?;
        Ok(owned.into_iter().filter_map(|c| c.id).collect())
    }

    /// Containers, running or not, matching a `label` filter (`key` or `key=value`).
    async fn list_labelled(&self, label: String) -> Result<Vec<ContainerSummary>, ExecError> {
        let filters = HashMap::from([("label", vec![label])]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(|e| ExecError::Internal(format!("cannot list containers: {e}")))
    }

    async fn run_container(
        &self,
        job: PreparedJob,
        control: RunControl,
    ) -> Result<ExecOutcome, ExecError> {
        let JobWorkload::Container(workload) = &job.workload else {
            return Err(ExecError::Internal("the Docker executor runs container workloads".into()));
        };
        let limits = job.limits;
        let outputs_dir = crate::prepare_work_dir(&job.work_dir)?;
        self.check_image(&workload.image).await?;
        let name = format!("aimatrix-job-{:016x}", rand_u64());
        let body = self.container_body(&job, workload, &outputs_dir)?;
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| create_error(&workload.image, &e))?;
        // From here on the container exists: the guard removes it however this future ends.
        let guard = RemoveGuard { docker: self.docker.clone(), name: name.clone(), armed: true };
        let outcome = self.supervise(&name, &outputs_dir, limits, control).await;
        remove(&self.docker, &name).await;
        guard.disarm();
        outcome
    }

    async fn check_image(&self, image: &str) -> Result<(), ExecError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                Err(ExecError::ImageMissing { image: image.to_owned() })
            }
            Err(e) => Err(ExecError::Internal(format!("cannot inspect image {image}: {e}"))),
        }
    }

    fn container_body(
        &self,
        job: &PreparedJob,
        workload: &ContainerWorkload,
        outputs_dir: &Path,
    ) -> Result<ContainerCreateBody, ExecError> {
        let limits = job.limits;
        let memory = i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX);
        let nano_cpus = (self.cfg.cpu_share.clamp(0.01, 1.0) * self.cpus as f64 * 1e9) as i64;
        let bind = |source: &Path, target: &str, read_only: bool| Mount {
            target: Some(target.into()),
            source: Some(source.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(read_only),
            ..Default::default()
        };
        let work = job.work_dir.canonicalize().map_err(|e| ExecError::WorkDir {
            path: job.work_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let device_requests = (workload.gpus > 0).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count: Some(i64::from(workload.gpus)),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        });
        let (uid, gid) = container_user(outputs_dir)?;
        let ulimit = |name: &str, n: i64| ResourcesUlimits {
            name: Some(name.into()),
            soft: Some(n),
            hard: Some(n),
        };
        let host_config = HostConfig {
            network_mode: Some("none".into()),
            readonly_rootfs: Some(true),
            mounts: Some(vec![
                bind(&work.join(INPUTS_DIR), "/job/inputs", true),
                bind(
                    &outputs_dir.canonicalize().unwrap_or_else(|_| outputs_dir.to_owned()),
                    "/job/outputs",
                    false,
                ),
            ]),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                format!("rw,noexec,nosuid,nodev,uid={uid},gid={gid},size={}", self.cfg.tmp_bytes),
            )])),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            pids_limit: Some(self.cfg.pids_limit),
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some(nano_cpus.max(10_000_000)),
            ulimits: Some(vec![ulimit("nofile", self.cfg.nofile), ulimit("core", 0)]),
            init: Some(true),
            log_config: Some(HostConfigLogConfig { typ: Some("none".into()), config: None }),
            device_requests,
            ..Default::default()
        };
        let mut cmd: Vec<String> = workload.command.clone();
        cmd.extend(job.args.iter().cloned());
        Ok(ContainerCreateBody {
            image: Some(workload.image.clone()),
            cmd: (!cmd.is_empty()).then_some(cmd),
            entrypoint: (!workload.command.is_empty()).then(Vec::new),
            env: Some(job.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            user: Some(format!("{uid}:{gid}")),
            working_dir: Some("/job".into()),
            network_disabled: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            labels: Some(HashMap::from([(OWNER_LABEL.to_owned(), self.cfg.owner.clone())])),
            host_config: Some(host_config),
            ..Default::default()
        })
    }

    /// Starts the container and waits for exit, the deadline, cancellation or an output limit.
    async fn supervise(
        &self,
        name: &str,
        outputs_dir: &Path,
        limits: ExecLimits,
        control: RunControl,
    ) -> Result<ExecOutcome, ExecError> {
        let attach =
            AttachContainerOptionsBuilder::default().stream(true).stdout(true).stderr(true).build();
        let mut attached = self
            .docker
            .attach_container(name, Some(attach))
            .await
            .map_err(|e| ExecError::Internal(format!("cannot attach to the container: {e}")))?;
        let started = Instant::now();
        self.docker
            .start_container(name, None)
            .await
            .map_err(|e| ExecError::Internal(format!("cannot start the container: {e}")))?;
        let stats = Arc::new(Mutex::new(StatsSample::default()));
        let stats_task =
            tokio::spawn(collect_stats(self.docker.clone(), name.to_owned(), stats.clone()));
        let wait_options = WaitContainerOptionsBuilder::default().condition("not-running").build();
        let mut wait = Box::pin(self.docker.wait_container(name, Some(wait_options)));
        let deadline = tokio::time::sleep(limits.timeout);
        tokio::pin!(deadline);
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut output_closed = false;
        let mut exit: Option<i64> = None;
        let mut status: Option<ExecStatus> = None;
        while exit.is_none() && status.is_none() {
            tokio::select! {
                biased;
                () = control.cancel.cancelled() => status = Some(ExecStatus::Cancelled),
                () = &mut deadline => status = Some(ExecStatus::TimedOut),
                chunk = attached.output.next(), if !output_closed => match chunk {
                    Some(Ok(LogOutput::StdOut { message })) => stdout.extend_from_slice(&message),
                    Some(Ok(LogOutput::StdErr { message })) => stderr.extend_from_slice(&message),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => output_closed = true,
                },
                waited = wait.next() => exit = Some(match waited {
                    Some(Ok(r)) => r.status_code,
                    Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
                    Some(Err(e)) => return Err(ExecError::Internal(format!("waiting for the container failed: {e}"))),
                    None => -1,
                }),
            }
            if let Some(overflow) = stdio_overflow(stdout.len(), stderr.len(), limits.stdio_bytes) {
                status = Some(overflow);
            }
        }
        if status.is_some() {
            // Close the attach stream first: the engine would otherwise wait for us to read
            // what the container is still writing before it lets the container die.
            drop(attached);
            let kill = KillContainerOptionsBuilder::default().signal("SIGKILL").build();
            let _ = self.docker.kill_container(name, Some(kill)).await;
        } else {
            // Drain what the container wrote before it exited.
            let drain = async {
                while let Some(Ok(chunk)) = attached.output.next().await {
                    match chunk {
                        LogOutput::StdOut { message } => stdout.extend_from_slice(&message),
                        LogOutput::StdErr { message } => stderr.extend_from_slice(&message),
                        _ => {}
                    }
                    if stdio_overflow(stdout.len(), stderr.len(), limits.stdio_bytes).is_some() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        }
        let wall_ms = started.elapsed().as_millis() as u64;
        let mut oom = self.oom_killed(name).await;
        // The runtime may report the exit before the kernel's OOM kill (containerd's shim sent
        // the two events in either order): a container that died of SIGKILL we did not send is
        // asked about again for a moment before it is called a plain failure.
        let oom_wait = Instant::now();
        while !oom && status.is_none() && exit == Some(137) && oom_wait.elapsed() < OOM_REPORT_WAIT
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            oom = self.oom_killed(name).await;
        }
        stats_task.abort();
        let sample = *stats.lock().await;
        let mut status = status.unwrap_or_else(|| match exit {
            _ if oom => ExecStatus::OutOfMemory,
            Some(0) => ExecStatus::Succeeded,
            Some(code) => ExecStatus::Failed { exit_code: i32::try_from(code).unwrap_or(i32::MAX) },
            None => {
                ExecStatus::Trapped { reason: "the container ended without an exit code".into() }
            }
        });
        // Output drained after the exit can still pass the cap.
        if let Some(overflow) = stdio_overflow(stdout.len(), stderr.len(), limits.stdio_bytes) {
            status = overflow;
        }
        stdout.truncate(limits.stdio_bytes);
        stderr.truncate(limits.stdio_bytes);
        let outputs = outputs::collect_for_run(outputs_dir, &limits, &mut status);
        let usage = Usage {
            wall_ms,
            cpu_ms: sample.cpu_ns / 1_000_000,
            peak_memory_bytes: sample.peak_memory,
            fuel_consumed: 0,
        };
        Ok(ExecOutcome { status, stdout, stderr, outputs, usage })
    }

    /// Whether the engine says the container was killed for want of memory.
    async fn oom_killed(&self, name: &str) -> bool {
        self.docker
            .inspect_container(name, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    }
}

impl Executor for DockerExecutor {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn run(&self, job: PreparedJob, control: RunControl) -> RunFuture<'_> {
        Box::pin(self.run_container(job, control))
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct StatsSample {
    cpu_ns: u64,
    peak_memory: u64,
}

/// Follows the engine's stats stream: total CPU time and the highest memory use seen.
async fn collect_stats(docker: Docker, name: String, into: Arc<Mutex<StatsSample>>) {
    let options = StatsOptionsBuilder::default().stream(true).build();
    let mut stream = docker.stats(&name, Some(options));
    while let Some(Ok(s)) = stream.next().await {
        let mut sample = into.lock().await;
        if let Some(cpu) = s.cpu_stats.and_then(|c| c.cpu_usage).and_then(|u| u.total_usage) {
            sample.cpu_ns = sample.cpu_ns.max(cpu);
        }
        if let Some(m) = s.memory_stats {
            let seen = m.max_usage.unwrap_or(0).max(m.usage.unwrap_or(0));
            sample.peak_memory = sample.peak_memory.max(seen);
        }
    }
}

/// Removes the container when the run's future is dropped before it could.
struct RemoveGuard {
    docker: Docker,
    name: String,
    armed: bool,
}

impl RemoveGuard {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveGuard {
    fn drop(&mut self) {
        if self.armed {
            let (docker, name) = (self.docker.clone(), self.name.clone());
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { remove(&docker, &name).await });
            }
        }
    }
}

async fn remove(docker: &Docker, name: &str) {
    let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
    if let Err(e) = docker.remove_container(name, Some(options)).await {
        if !matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
        {
            tracing::warn!(container = name, "cannot remove the job container: {e}");
        }
    }
}

fn create_error(image: &str, e: &bollard::errors::Error) -> ExecError {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code: 404, .. } => {
            ExecError::ImageMissing { image: image.to_owned() }
        }
        other => ExecError::Internal(format!("cannot create the container: {other}")),
    }
}

/// The non-root user the container runs as: the node's own uid and gid when it is not root
/// (outputs then belong to the node), otherwise `nobody`, who is given the outputs directory.
/// The `/tmp` tmpfs is given to the same user.
fn container_user(outputs_dir: &Path) -> Result<(u32, u32), ExecError> {
    let (uid, gid) = (rustix::process::geteuid(), rustix::process::getegid());
    if !uid.is_root() {
        return Ok((uid.as_raw(), gid.as_raw()));
    }
    const NOBODY: u32 = 65_534;
    let owner = (Some(rustix::fs::Uid::from_raw(NOBODY)), Some(rustix::fs::Gid::from_raw(NOBODY)));
    rustix::fs::chown(outputs_dir, owner.0, owner.1).map_err(|e| ExecError::WorkDir {
        path: outputs_dir.display().to_string(),
        reason: format!("cannot give the outputs directory to the container user: {e}"),
    })?;
    Ok((NOBODY, NOBODY))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Applets linked in a [`busybox_rootfs`].
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "ls",
    "sleep",
    "dd",
    "head",
    "touch",
    "true",
    "id",
    "seq",
    "wc",
    "sha256sum",
];

/// A minimal root filesystem tarball: a static busybox (e.g. Debian's `busybox-static`) at
/// `/bin/busybox` with [`BUSYBOX_APPLETS`] linked to it, and empty `/tmp`, `/job`, `/etc`.
pub fn busybox_rootfs(busybox: &Path) -> std::io::Result<Vec<u8>> {
    let bytes = std::fs::read(busybox)?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o755);
    header.set_cksum();
    tar.append_data(&mut header, "bin/busybox", bytes.as_slice())?;
    for applet in BUSYBOX_APPLETS {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_mode(0o777);
        tar.append_link(&mut link, format!("bin/{applet}"), "busybox")?;
    }
    for dir in ["tmp", "job", "etc"] {
        let mut d = tar::Header::new_gnu();
        d.set_entry_type(tar::EntryType::Directory);
        d.set_size(0);
        d.set_mode(0o755);
        tar.append_data(&mut d, dir, std::io::empty())?;
    }
    tar.into_inner()
}
