//! A ledger outage while a job is posted, end to end: `studio-relay serve` runs with its ledger
//! directory on a small tmpfs (mounted in a user and mount namespace of its own, so the test
//! needs no root), mints until the disk is full and the ledger writer stops, and then a post is
//! answered 503 with what to do, the CLI exits 2, and the requester's balance is unchanged.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::job::{ContentRef, JobSpec};
use studio_relay::api::types::{MintRequest, PostJobRequest};
use studio_relay::client::RelayClient;

/// The ledger's tmpfs: room for sled's files and a few mints, not for the filler.
const LEDGER_TMPFS: &str = "size=4m";
/// One filler mint's memo; sled writes a value this large to a file of its own.
const FILLER_MEMO_BYTES: usize = 200 * 1024;
/// Filler mints tried at most; 4 MiB is full after about 20.
const FILLER_MINTS_MAX: u128 = 100;

/// Mounts a tmpfs on `dir` in a new user and mount namespace and runs `program` there.
fn in_namespace_with_tmpfs(dir: &Path, program: &Path) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(format!("mount -t tmpfs -o {LEDGER_TMPFS} tmpfs \"$0\" && exec \"$@\""));
    command.arg(dir).arg(program);
    command
}

/// Whether this host lets the test mount a tmpfs in a namespace of its own.
fn can_mount_tmpfs() -> bool {
    let dir = tempfile::tempdir().unwrap();
    in_namespace_with_tmpfs(dir.path(), Path::new("true"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The relay process, killed when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_ledger_outage_at_post_is_a_503_and_charges_nothing() {
    if !can_mount_tmpfs() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs in a user and mount namespace (`unshare` from \
             util-linux, user namespaces enabled)"
        );
        eprintln!(
            "skipped: cannot mount a tmpfs in a user and mount namespace (`unshare` missing or \
             user namespaces disabled)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ledger_dir = data.join("ledger");
    std::fs::create_dir_all(&ledger_dir).unwrap();
    // A port that was just free, for the API.
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_studio-relay"));
    let log = dir.path().join("serve.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut child = in_namespace_with_tmpfs(&ledger_dir, binary)
        .args(["serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", &api.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let serve = Serve(child);
    // The first line is printed once the API listens.
    let mut address = String::new();
    BufReader::new(stdout).read_line(&mut address).unwrap();
    assert!(address.contains("/p2p/"), "serve printed no address; its log:\n{}", log_text());
    let client = RelayClient::new(api);

    let mint = |id: u128, account: &str, memo: String| MintRequest {
        account: account.into(),
        amount: 100,
        memo,
        id: Some(id.to_string()),
    };
    client.mint(&mint(1, "studio", "credits".into())).unwrap();
    let before = client.balance("studio").unwrap();
    assert_eq!(before.available, 100);
    let stopped = (2..FILLER_MINTS_MAX)
        .find_map(|id| client.mint(&mint(id, "filler", "x".repeat(FILLER_MEMO_BYTES))).err());
    let stopped =
        stopped.unwrap_or_else(|| panic!("the ledger's disk never filled:\n{}", log_text()));
    assert!(stopped.status().is_some_and(|s| s >= 500), "{stopped}");

    let module = client.put_blob(b"\0asm outage").unwrap().sha256;
    let mut spec = JobSpec::from_toml(
        "kind = \"batch\"\nreward = 10\n[workload]\nruntime = \"wasm\"\nmodule = \"m.wasm\"\n",
    )
    .unwrap();
    let digest: Digest = format!("sha256:{module}").parse().unwrap();
    spec.workload.module = Some(ContentRef::Digest(digest));
    let err = client
        .post_job(&PostJobRequest { spec, account: "studio".into(), idempotency_key: None })
        .unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    let message = err.to_string();
    assert!(message.starts_with("the relay's ledger cannot write right now"), "{message}");
    assert!(message.contains("nothing was charged. Retry later"), "{message}");
    assert_eq!(client.balance("studio").unwrap(), before, "nothing was reserved");

    // The relay has halted: it says why, and takes no more work until it is restarted.
    let status = client.status().unwrap();
    let halted = status.halted.unwrap_or_default();
    assert!(halted.starts_with("the ledger cannot write"), "{halted}");

    // The CLI is told so and exits 2.
    let job_dir = dir.path().join("job");
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::write(job_dir.join("m.wasm"), b"\0asm outage").unwrap();
    std::fs::write(
        job_dir.join("job.toml"),
        "kind = \"batch\"\nreward = 10\n[workload]\nruntime = \"wasm\"\nmodule = \"m.wasm\"\n",
    )
    .unwrap();
    let out = Command::new(binary)
        .args(["job", "post"])
        .arg(job_dir.join("job.toml"))
        .args(["--api", &api.to_string()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the relay is halted and takes no work"), "{stderr}");
    assert!(stderr.contains("Nothing was posted"), "{stderr}");
    assert_eq!(client.balance("studio").unwrap(), before, "nothing was reserved");

    // The first job is recorded as refused, with the ledger's reason; the second never reached
    // the core.
    let jobs = client.jobs().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    for job in &jobs {
        assert_eq!(job.state, "refused", "{job:?}");
        let reason = job.reason.as_deref().unwrap_or_default();
        assert!(reason.starts_with("the ledger is unavailable"), "{reason}");
    }
    drop(serve);
}
