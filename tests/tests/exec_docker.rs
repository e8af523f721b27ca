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
