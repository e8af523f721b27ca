//! The Docker executor against the real engine.
//!
//! No registry is reachable, so the test image is imported from a rootfs built here: a static
//! busybox (Debian's `busybox-static`, installed by `.ci/run`) and its applet links. Without an
//! engine or busybox the tests fail in CI and are skipped with a printed reason elsewhere.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::Path;
use std::time::{Duration, Instant};

use aimatrix_sandbox::docker::{ContainerWorkload, DockerConfig, DockerExecutor};
use aimatrix_sandbox::{
    ExecError, ExecLimits, ExecOutcome, ExecStatus, Executor, JobWorkload, PreparedJob, RunControl,
};

const IMAGE: &str = "aimatrix-test-busybox:1";
const BUSYBOX: &str = "/bin/busybox";

/// Connects and imports the test image, or explains why the tests cannot run.
async fn setup(owner: &str) -> Option<DockerExecutor> {
    let why = if !Path::new(BUSYBOX).exists() {
        Some(format!("{BUSYBOX} is missing (apt-get install busybox-static)"))
    } else {
        match aimatrix_sandbox::docker::probe().await {
            aimatrix_sandbox::docker::DockerStatus::Available { .. } => None,
            aimatrix_sandbox::docker::DockerStatus::Unavailable { reason } => Some(reason),
        }
    };
    if let Some(why) = why {
        assert!(std::env::var_os("CI").is_none(), "Docker tests cannot run in CI: {why}");
        eprintln!("SKIPPED: Docker tests need an engine and {BUSYBOX}: {why}");
        return None;
    }
    let cfg = DockerConfig { owner: owner.into(), pids_limit: 64, ..DockerConfig::default() };
    let executor = DockerExecutor::connect(cfg).await.unwrap();
    import_image(&executor).await;
    Some(executor)
}

async fn import_image(executor: &DockerExecutor) {
    if !executor.has_image(IMAGE).await {
        let rootfs = aimatrix_sandbox::docker::busybox_rootfs(Path::new(BUSYBOX)).unwrap();
        executor.import_rootfs(IMAGE, rootfs).await.unwrap();
    }
}

fn job(dir: &Path, script: &str, limits: ExecLimits) -> PreparedJob {
    let workload = ContainerWorkload {
        image: IMAGE.into(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        gpus: 0,
    };
    PreparedJob::new(JobWorkload::Container(workload), dir, limits)
}

fn limits() -> ExecLimits {
    ExecLimits { timeout: Duration::from_secs(30), memory_bytes: 64 << 20, ..ExecLimits::default() }
}

async fn run(
    executor: &DockerExecutor,
    script: &str,
    limits: ExecLimits,
) -> (tempfile::TempDir, ExecOutcome) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("inputs")).unwrap();
    std::fs::write(dir.path().join("inputs/in.txt"), "hello from the host\n").unwrap();
    let outcome =
        executor.run(job(dir.path(), script, limits), RunControl::default()).await.unwrap();
    (dir, outcome)
}

async fn assert_no_containers(executor: &DockerExecutor) {
    // Removal after a kill is asynchronous in the engine; give it a moment.
    for _ in 0..50 {
        if executor.owned_containers().await.unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("containers left behind: {:?}", executor.owned_containers().await.unwrap());
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_succeeds_and_writes_outputs_with_no_network() {
    let Some(executor) = setup("test-success").await else { return };
    let script =
        "cat /job/inputs/in.txt > /job/outputs/copy.txt && echo made > /tmp/t && cat /tmp/t \
                  && ls /sys/class/net && id -u";
    let (_dir, outcome) = run(&executor, script, limits()).await;
    assert_eq!(outcome.status, ExecStatus::Succeeded, "{}", text(&outcome.stderr));
    let stdout = text(&outcome.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("made"), "/tmp is writable");
    assert_eq!(lines.next(), Some("lo"), "loopback is the only network interface: {stdout}");
    assert_ne!(lines.next(), Some("0"), "the job does not run as root");
    assert_eq!(outcome.outputs.len(), 1);
    assert_eq!(outcome.outputs[0].name, "copy.txt");
    assert_eq!(
        outcome.outputs[0].sha256,
        aimatrix_protocol::hash::Digest::of(b"hello from the host\n")
    );
    assert_no_containers(&executor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writing_outside_the_job_directory_fails() {
    let Some(executor) = setup("test-readonly").await else { return };
    let script = "for p in /etc/x /bin/x /x /job/inputs/x /job/x; do \
                    if touch $p 2>/dev/null; then echo WROTE $p; else echo refused $p; fi; done; \
                  touch /job/outputs/ok && echo outputs-ok";
    let (_dir, outcome) = run(&executor, script, limits()).await;
    assert_eq!(outcome.status, ExecStatus::Succeeded, "{}", text(&outcome.stderr));
    let stdout = text(&outcome.stdout);
    assert!(!stdout.contains("WROTE"), "{stdout}");
    assert_eq!(stdout.matches("refused").count(), 5, "{stdout}");
    assert!(stdout.contains("outputs-ok"));
    assert_no_containers(&executor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_bomb_is_contained_by_the_pids_limit() {
    let Some(executor) = setup("test-forkbomb").await else { return };
    // Starts sleepers until fork fails: the pids limit (64) stops it, not the host.
    let script = "while true; do sleep 60 & done";
    let limits = ExecLimits { timeout: Duration::from_secs(20), ..limits() };
    let started = Instant::now();
    let (_dir, outcome) = run(&executor, script, limits).await;
    assert!(!outcome.status.is_success());
    assert!(
        text(&outcome.stderr).contains("can't fork"),
        "{:?} {}",
        outcome.status,
        text(&outcome.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(40));
    assert_no_containers(&executor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_hog_is_out_of_memory() {
    let Some(executor) = setup("test-oom").await else { return };
    // dd allocates its 256 MiB block buffer: past the 32 MiB limit (swap included).
    let limits = ExecLimits { memory_bytes: 32 << 20, ..limits() };
    let (_dir, outcome) =
        run(&executor, "dd if=/dev/zero of=/dev/null bs=256M count=4", limits).await;
    assert_eq!(outcome.status, ExecStatus::OutOfMemory, "{}", text(&outcome.stderr));
    assert_no_containers(&executor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sleeper_is_killed_at_its_deadline() {
    let Some(executor) = setup("test-sleeper").await else { return };
    let started = Instant::now();
    let limits = ExecLimits { timeout: Duration::from_secs(2), ..limits() };
    let (_dir, outcome) = run(&executor, "sleep 3600", limits).await;
    assert_eq!(outcome.status, ExecStatus::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert_no_containers(&executor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn output_past_the_cap_ends_the_job() {
    let Some(executor) = setup("test-stdout").await else { return };
    let limits = ExecLimits { stdio_bytes: 64 << 10, ..limits() };
    let (_dir, outcome) = run(&executor, "dd if=/dev/zero bs=1M count=64", limits).await;
    assert!(matches!(outcome.status, ExecStatus::OutputLimitExceeded { .. }), "{}", outcome.status);
    assert!(outcome.stdout.len() <= 64 << 10);
    assert_no_containers(&executor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_mid_run_removes_the_container() {
    let Some(executor) = setup("test-cancel").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let control = RunControl::default();
    let cancel = control.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cancel.cancel();
    });
    let outcome = executor.run(job(dir.path(), "sleep 3600", limits()), control).await.unwrap();
    assert_eq!(outcome.status, ExecStatus::Cancelled);
    assert_no_containers(&executor).await;

    // A run whose future is dropped (the node is interrupted) is cleaned up too.
    let dir = tempfile::tempdir().unwrap();
    let run = executor.run(job(dir.path(), "sleep 3600", limits()), RunControl::default());
    let _ = tokio::time::timeout(Duration::from_millis(1500), run).await;
    assert_no_containers(&executor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_is_a_clear_failure_and_nothing_is_pulled() {
    let Some(executor) = setup("test-missing").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let workload =
        ContainerWorkload { image: "aimatrix-does-not-exist:9".into(), command: vec![], gpus: 0 };
    let job = PreparedJob::new(JobWorkload::Container(workload), dir.path(), limits());
    let err = executor.run(job, RunControl::default()).await.unwrap_err();
    assert!(matches!(err, ExecError::ImageMissing { .. }), "{err}");
    assert!(err.to_string().contains("never pull"), "{err}");
    assert_no_containers(&executor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_of_an_interrupted_node_are_removed_at_start() {
    let Some(executor) = setup("test-leftovers").await else { return };
    // Simulate an interrupted node: a container with our label that nobody removed.
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let body = bollard::models::ContainerCreateBody {
        image: Some(IMAGE.into()),
        cmd: Some(vec!["sleep".into(), "3600".into()]),
        labels: Some(
            [(aimatrix_sandbox::docker::OWNER_LABEL.to_owned(), "test-leftovers".to_owned())]
                .into(),
        ),
        ..Default::default()
    };
    docker
        .create_container(None::<bollard::query_parameters::CreateContainerOptions>, body)
        .await
        .unwrap();
    assert_eq!(executor.owned_containers().await.unwrap().len(), 1);
    assert_eq!(executor.remove_leftovers().await.unwrap(), 1);
    assert_no_containers(&executor).await;
}
