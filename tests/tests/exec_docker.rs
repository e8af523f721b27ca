//! `aimatrix-node exec` runs docker jobs too, against the real engine.
//!
//! The image is imported from a busybox rootfs (no registry is reachable). Without an engine or
//! `/bin/busybox` (Debian's `busybox-static`) the test fails in CI and is skipped with a printed
//! reason elsewhere.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::Path;
use std::process::Command;

use aimatrix_sandbox::docker::{DockerConfig, DockerExecutor, DockerStatus};

const IMAGE: &str = "aimatrix-test-busybox:1";

fn image_ready() -> bool {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let why = match aimatrix_sandbox::docker::probe().await {
            DockerStatus::Unavailable { reason } => Some(reason),
            DockerStatus::Available { .. } if !Path::new("/bin/busybox").exists() => {
                Some("/bin/busybox is missing (apt-get install busybox-static)".into())
            }
            DockerStatus::Available { .. } => None,
        };
        if let Some(why) = why {
            assert!(
                std::env::var_os("CI").is_none(),
                "the docker exec test cannot run in CI: {why}"
            );
            eprintln!("SKIPPED: needs a Docker engine and /bin/busybox: {why}");
            return false;
        }
        let executor = DockerExecutor::connect(DockerConfig::default()).await.unwrap();
        if !executor.has_image(IMAGE).await {
            let rootfs =
                aimatrix_sandbox::docker::busybox_rootfs(Path::new("/bin/busybox")).unwrap();
            executor.import_rootfs(IMAGE, rootfs).await.unwrap();
        }
        true
    })
}

#[test]
fn exec_runs_a_docker_job_file() {
    if !image_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("words.txt"), "one two three\n").unwrap();
    std::fs::write(
        dir.path().join("job.toml"),
        format!(
            r#"kind = "data_processing"
reward = 1
[workload]
runtime = "docker"
image = "{IMAGE}"
command = ["sh", "-c", "wc -w < /job/inputs/words.txt > /job/outputs/count.txt; echo counted"]
[limits]
timeout_s = 30
memory_mb = 64
[[inputs]]
name = "words.txt"
source = "words.txt"
"#
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let output = Command::new(aimatrix_tests::binary("aimatrix-node"))
        .args([
            "exec",
            dir.path().join("job.toml").to_str().unwrap(),
            "--json",
            "--out",
            out.to_str().unwrap(),
        ])
        .env("AIMATRIX_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["status"], "succeeded");
    assert_eq!(result["stdout"], "counted\n");
    assert_eq!(std::fs::read_to_string(out.join("count.txt")).unwrap().trim(), "3");
}

#[test]
fn a_killed_exec_leaves_no_container_after_the_next_run() {
    if !image_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let job = |script: &str| {
        format!(
            "kind = \"batch\"\nreward = 1\n[workload]\nruntime = \"docker\"\nimage = \"{IMAGE}\"\ncommand = [\"sh\", \"-c\", \"{script}\"]\n[limits]\ntimeout_s = 600\nmemory_mb = 64\n"
        )
    };
    std::fs::write(dir.path().join("sleep.toml"), job("sleep 3600")).unwrap();
    std::fs::write(dir.path().join("quick.toml"), job("true")).unwrap();
    let mut sleeper = Command::new(aimatrix_tests::binary("aimatrix-node"))
        .args(["exec", dir.path().join("sleep.toml").to_str().unwrap()])
        .env("AIMATRIX_DATA_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let owner = format!("aimatrix-exec-{}", sleeper.id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let executor = rt
        .block_on(DockerExecutor::connect(DockerConfig { owner, ..DockerConfig::default() }))
        .unwrap();
    let count = || rt.block_on(executor.owned_containers()).unwrap().len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count() == 0 {
        assert!(std::time::Instant::now() < deadline, "the exec run never started its container");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    sleeper.kill().unwrap(); // SIGKILL: no chance to clean up
    sleeper.wait().unwrap();
    assert_eq!(count(), 1, "the killed run left its container behind");
    let output = Command::new(aimatrix_tests::binary("aimatrix-node"))
        .args(["exec", dir.path().join("quick.toml").to_str().unwrap()])
        .env("AIMATRIX_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(count(), 0, "the next exec run removed the dead run's container");
}
