//! The HTTP API in-process: `api::serve` on 127.0.0.1:0 over a real ledger and blob store, with
//! a fake relay driver answering the job commands, reached by `RelayClient` and by the
//! `studio-relay` binary's `job` and `ledger` subcommands.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::job::{ContentRef, JobSpec};
use aimatrix_protocol::messages::JobId;
use studio_relay::api::types::{
    AuditView, JobView, MintRequest, OutputView, PostJobRequest, RelayStatusView, TransferView,
};
use studio_relay::api::{self, ApiCommand, ApiError, ApiState};
use studio_relay::client::{ClientError, RelayClient};
use studio_relay::ledger::Ledger;
use studio_relay::store::BlobStore;
use tokio_util::sync::CancellationToken;

const JOB_ID: JobId = JobId([0xab; 16]);

/// What the fake driver saw, and the stdout blob its completed job reports.
#[derive(Default)]
struct Seen {
    posts: Vec<PostJobRequest>,
    stdout_sha256: String,
}

/// A running API over a temporary data dir.
struct Relay {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    seen: Arc<Mutex<Seen>>,
    blobs: Arc<BlobStore>,
    shutdown: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Relay {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(&dir.path().join("ledger")).unwrap());
        let blobs = Arc::new(BlobStore::open(&dir.path().join("blobs")).unwrap());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (commands, rx) = tokio::sync::mpsc::channel(16);
        runtime.spawn(fake_driver(rx, seen.clone(), ledger.clone()));
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let state = ApiState { commands, ledger, blobs: blobs.clone() };
        let server = runtime.spawn(api::serve(listener, state, shutdown.clone()));
        Self { addr, dir, seen, blobs, shutdown, runtime: Some(runtime), server: Some(server) }
    }

    fn client(&self) -> RelayClient {
        RelayClient::new(self.addr)
    }

    /// Stops the server and releases the ledger (so it can be opened offline).
    fn stop(&mut self) {
        self.shutdown.cancel();
        if let (Some(runtime), Some(server)) = (self.runtime.take(), self.server.take()) {
            runtime.block_on(server).unwrap().unwrap();
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_studio-relay"))
            .args(args)
            .env("AIMATRIX_RELAY_API", self.addr.to_string())
            .env_remove("AIMATRIX_RELAY_DATA_DIR")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

fn completed_view(stdout_sha256: &str) -> JobView {
    JobView {
        id: JOB_ID.to_string(),
        name: "hello".into(),
        kind: "batch".into(),
        state: "completed".into(),
        reason: None,
        requester: "studio".into(),
        reward: 10,
        replication: 1,
        escrow: 10,
        paid: 10,
        refunded: 0,
        posted_at_ms: 1,
        deadline_ms: 2,
        attempts: 1,
        leases: Vec::new(),
        unservable: Vec::new(),
        result_hash: Some(Digest::of(b"r").to_string()),
        outputs: vec![OutputView {
            name: "/stdout".into(),
            sha256: stdout_sha256.to_owned(),
            bytes: 12,
        }],
        training: None,
    }
}

/// Answers like the relay driver: account `poor` cannot pay; the one job is completed; the
/// audit is the ledger's own (there is no job store).
async fn fake_driver(
    mut rx: tokio::sync::mpsc::Receiver<ApiCommand>,
    seen: Arc<Mutex<Seen>>,
    ledger: Arc<Ledger>,
) {
    while let Some(command) = rx.recv().await {
        match command {
            ApiCommand::PostJob { req, reply } => {
                let answer = if req.account == "poor" {
                    Err(ApiError::InsufficientFunds(
                        "account \"poor\" has 0 credits available and this job needs 10; \
                         nothing was posted"
                            .into(),
                    ))
                } else {
                    Ok(JOB_ID)
                };
                seen.lock().unwrap().posts.push(*req);
                let _ = reply.send(answer);
            }
            ApiCommand::Job { id, reply } => {
                let sha = seen.lock().unwrap().stdout_sha256.clone();
                let _ = reply.send((id == JOB_ID).then(|| completed_view(&sha)));
            }
            ApiCommand::Jobs { reply } => {
                let sha = seen.lock().unwrap().stdout_sha256.clone();
                let _ = reply.send(vec![completed_view(&sha)]);
            }
            ApiCommand::CancelJob { id, reply } => {
                let _ = reply.send(Err(ApiError::NotFound(format!("no job {id} at this relay"))));
            }
            ApiCommand::Status { reply } => {
                let _ = reply.send(RelayStatusView {
                    peer_id: "12D3KooWfake".into(),
                    listen_addrs: vec!["/ip4/127.0.0.1/tcp/7700".into()],
                    connected_peers: Vec::new(),
                    known_nodes: 3,
                    jobs_open: 0,
                    reject_counts: Default::default(),
                    ledger_expired: 0,
                    network: Default::default(),
                    halted: None,
                });
            }
            ApiCommand::Audit { reply } => {
                let report = tokio::task::block_in_place(|| ledger.audit_open()).unwrap();
                let _ = reply.send(Ok(AuditView::new(report, None)));
            }
        }
    }
}

fn spec_with_module(module: Digest) -> JobSpec {
    let mut spec = JobSpec::from_toml(
        "kind = \"batch\"\nreward = 10\n[workload]\nruntime = \"wasm\"\nmodule = \"m.wasm\"\n",
    )
    .unwrap();
    spec.workload.module = Some(ContentRef::Digest(module));
    spec
}

fn api_status(err: &ClientError) -> Option<u16> {
    err.status()
}

#[test]
fn blobs_roundtrip_by_hash() {
    let relay = Relay::start();
    let client = relay.client();
    let stored = client.put_blob(b"module bytes").unwrap();
    assert_eq!(stored.sha256, Digest::of(b"module bytes").to_hex());
    assert_eq!(stored.bytes, 12);
    assert_eq!(client.get_blob(&stored.sha256).unwrap(), b"module bytes");
    assert_eq!(client.get_blob(&format!("sha256:{}", stored.sha256)).unwrap(), b"module bytes");
    assert!(relay.blobs.has(&Digest::of(b"module bytes")).unwrap(), "stored in the blob store");
    let missing = client.get_blob(&Digest::of(b"nope").to_hex()).unwrap_err();
    assert_eq!(api_status(&missing), Some(404), "{missing}");
    let bad = client.get_blob("not-a-hash").unwrap_err();
    assert_eq!(api_status(&bad), Some(400), "{bad}");
    assert!(bad.to_string().contains("64 hex digits"), "{bad}");
}

#[test]
fn ledger_over_http_mints_reads_and_audits_the_open_ledger() {
    let relay = Relay::start();
    let client = relay.client();
    let mint = |id: &str, amount| MintRequest {
        account: "alice".into(),
        amount,
        memo: "welcome".into(),
        id: Some(id.into()),
    };
    let minted = client.mint(&mint("7", 100)).unwrap();
    assert_eq!((minted.seq, minted.available, minted.already_recorded), (1, 100, false));
    let again = client.mint(&mint("7", 100)).unwrap();
    assert!(again.already_recorded, "same id, same fields: recorded once");
    let reused = client.mint(&mint("7", 5)).unwrap_err();
    assert_eq!(api_status(&reused), Some(400), "{reused}");
    assert!(reused.to_string().starts_with("mint refused"), "{reused}");
    let refused = client
        .mint(&MintRequest { account: "issuance".into(), amount: 1, memo: String::new(), id: None })
        .unwrap_err();
    assert_eq!(api_status(&refused), Some(400), "{refused}");

    let balance = client.balance("alice").unwrap();
    assert_eq!((balance.available, balance.posted_credits, balance.pending), (100, 100, 0));
    assert_eq!(client.balance("nobody").unwrap().available, 0);
    let history = client.history("alice", 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!((history[0].kind.as_str(), history[0].change), ("mint", Some(100)));
    assert_eq!(history[0].memo.as_deref(), Some("welcome"));

    let audit = client.audit().unwrap();
    assert!(audit.clean, "{:?}", audit.problems);
    assert_eq!((audit.entries, audit.accounts), (1, 2), "issuance and alice");
    let export: Vec<TransferView> = client.export().unwrap();
    assert_eq!(export.len(), 1);
    assert_eq!(export[0].legs[0].credit, "alice");
}

#[test]
fn posting_refuses_unresolved_specs_and_passes_on_the_drivers_402() {
    let relay = Relay::start();
    let client = relay.client();
    let module: Digest =
        format!("sha256:{}", client.put_blob(b"wasm").unwrap().sha256).parse().unwrap();

    let mut unresolved = spec_with_module(module);
    unresolved.workload.module = Some(ContentRef::Path("m.wasm".into()));
    let err = client
        .post_job(&PostJobRequest {
            spec: unresolved,
            account: "studio".into(),
            idempotency_key: None,
        })
        .unwrap_err();
    assert_eq!(api_status(&err), Some(400), "{err}");
    assert!(err.to_string().contains("PUT /v1/blobs"), "{err}");
    assert!(relay.seen.lock().unwrap().posts.is_empty(), "refused before reaching the driver");

    let poor = PostJobRequest {
        spec: spec_with_module(module),
        account: "poor".into(),
        idempotency_key: None,
    };
    let err = client.post_job(&poor).unwrap_err();
    assert_eq!(api_status(&err), Some(402), "{err}");
    assert!(err.to_string().contains("nothing was posted"), "{err}");

    let ok = PostJobRequest {
        spec: spec_with_module(module),
        account: "studio".into(),
        idempotency_key: None,
    };
    assert_eq!(client.post_job(&ok).unwrap().job_id, JOB_ID.to_string());
    assert_eq!(relay.seen.lock().unwrap().posts.len(), 2);

    let unknown = client.job(&JobId([1; 16]).to_string()).unwrap_err();
    assert_eq!(api_status(&unknown), Some(404), "{unknown}");
    let bad = client.job("xyz").unwrap_err();
    assert_eq!(api_status(&bad), Some(400), "{bad}");
    let cancel = client.cancel_job(&JobId([1; 16]).to_string()).unwrap_err();
    assert_eq!(api_status(&cancel), Some(404), "{cancel}");
    assert_eq!(client.status().unwrap().known_nodes, 3);
}

#[test]
fn an_absent_relay_is_reported_with_what_to_do() {
    // A port that was just free: nothing listens on it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err = RelayClient::new(addr).status().unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot reach the relay API at {addr}: is `studio-relay serve` running? (start it, \
             or pass --api)"
        )
    );
    // The CLI says the same and exits 2.
    let out = Command::new(env!("CARGO_BIN_EXE_studio-relay"))
        .args(["ledger", "balance", "studio", "--api", &addr.to_string()])
        .env_remove("AIMATRIX_RELAY_DATA_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `studio-relay serve` running?"));
}

fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn cli_job_post_uploads_paths_and_wait_prints_the_result() {
    let relay = Relay::start();
    let job_dir = relay.dir.path().join("job");
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::write(job_dir.join("hello.wasm"), b"\0asm fake module").unwrap();
    std::fs::write(job_dir.join("words.txt"), b"a b c").unwrap();
    let extra = relay.dir.path().join("extra.csv");
    std::fs::write(&extra, b"x,y").unwrap();
    std::fs::write(
        job_dir.join("job.toml"),
        "kind = \"batch\"\nname = \"hello\"\nreward = 10\n[workload]\nruntime = \"wasm\"\n\
         module = \"hello.wasm\"\n[[inputs]]\nname = \"words\"\nsource = \"words.txt\"\n",
    )
    .unwrap();
    let stdout_blob = relay.blobs.put(b"hello world\n").unwrap();
    relay.seen.lock().unwrap().stdout_sha256 = stdout_blob.to_hex();

    let toml = job_dir.join("job.toml");
    let out = relay.cli(&["job", "post", toml.to_str().unwrap()]);
    assert_eq!(stdout_of(&out), format!("{JOB_ID}\n"));
    {
        let seen = relay.seen.lock().unwrap();
        let spec = &seen.posts[0].spec;
        assert_eq!(seen.posts[0].account, "studio");
        let module = spec.workload.module.as_ref().and_then(ContentRef::digest).unwrap();
        assert_eq!(module, Digest::of(b"\0asm fake module"));
        assert!(relay.blobs.has(&module).unwrap(), "the module was uploaded");
        assert_eq!(spec.inputs[0].source.digest(), Some(Digest::of(b"a b c")));
        assert_eq!(spec.inputs[0].size_bytes, 5);
    }

    let out = relay.cli(&[
        "job",
        "post",
        toml.to_str().unwrap(),
        "--input",
        extra.to_str().unwrap(),
        "--wait",
    ]);
    let text = stdout_of(&out);
    assert!(text.starts_with("hello world\n"), "{text}");
    assert!(text.contains("completed"), "{text}");
    {
        let seen = relay.seen.lock().unwrap();
        let input = &seen.posts[1].spec.inputs[1];
        assert_eq!(
            (input.name.as_str(), input.source.digest()),
            ("extra.csv", Some(Digest::of(b"x,y")))
        );
    }
    let out = relay.cli(&["job", "post", toml.to_str().unwrap(), "--wait", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout_of(&out)).unwrap();
    assert_eq!(v["stdout"], "hello world\n");
    assert_eq!(v["job"]["state"], "completed");

    // Not enough credits: refused, exit 2.
    let out = relay.cli(&["job", "post", toml.to_str().unwrap(), "--account", "poor"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was posted"), "{out:?}");

    // A duplicate input name is refused before posting.
    let dup = relay.dir.path().join("words");
    std::fs::write(&dup, b"dup").unwrap();
    let posts = relay.seen.lock().unwrap().posts.len();
    let out = relay.cli(&["job", "post", toml.to_str().unwrap(), "--input", dup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(relay.seen.lock().unwrap().posts.len(), posts);

    // result --out writes stdout as DIR/stdout.
    let out_dir = relay.dir.path().join("result");
    let out =
        relay.cli(&["job", "result", &JOB_ID.to_string(), "--out", out_dir.to_str().unwrap()]);
    stdout_of(&out);
    assert_eq!(std::fs::read(out_dir.join("stdout")).unwrap(), b"hello world\n");
}

#[test]
fn cli_ledger_prints_the_same_json_through_the_api_and_offline() {
    let mut relay = Relay::start();
    let minted = stdout_of(&relay.cli(&["ledger", "mint", "studio", "50", "--id", "9", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&minted).unwrap();
    assert_eq!((v["available"].as_i64(), v["seq"].as_u64()), (Some(50), Some(1)));
    let online_balance = stdout_of(&relay.cli(&["ledger", "balance", "studio", "--json"]));
    let online_history = stdout_of(&relay.cli(&["ledger", "history", "studio", "--json"]));
    let online_audit = stdout_of(&relay.cli(&["ledger", "audit", "--json"]));
    let online_export = stdout_of(&relay.cli(&["ledger", "export", "--format", "csv"]));
    relay.stop();
    let dir = relay.dir.path().to_str().unwrap().to_owned();
    let offline = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--data-dir", &dir]);
        stdout_of(&relay.cli(&all))
    };
    assert_eq!(offline(&["ledger", "balance", "studio", "--json"]), online_balance);
    assert_eq!(offline(&["ledger", "history", "studio", "--json"]), online_history);
    assert_eq!(offline(&["ledger", "audit", "--json"]), online_audit);
    assert_eq!(offline(&["ledger", "export", "--format", "csv"]), online_export);
    assert!(online_audit.contains("\"clean\":true"), "{online_audit}");
}
