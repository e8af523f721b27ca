//! The control API end to end: `api::serve` on loopback with a fake driver answering its
//! commands, and the real `aimatrix-node status` / `compute` binaries talking to it.
//!
//! The API module is compiled into this test from its source (`node` is a binary crate, so
//! there is no library to import); it uses nothing else from the crate, by design.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

#[allow(dead_code, unreachable_pub)]
#[path = "../src/api/mod.rs"]
mod api;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Output};

use aimatrix_protocol::job::{JobKind, Runtime};
use aimatrix_protocol::node::AcceptMode;
use api::views::{OfferView, RelayView, RequirementsView, RunningView, StatusView};
use api::NodeApiCommand;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SERVABLE: &str = "0123456789abcdef0123456789abcdef";
const TOO_BIG: &str = "fedcba9876543210fedcba9876543210";

fn offer(job_id: &str, reward: u64, reasons: &[&str]) -> OfferView {
    OfferView {
        job_id: job_id.to_owned(),
        name: format!("job {reward}"),
        kind: JobKind::Batch,
        reward,
        replication: 2,
        requirements: RequirementsView {
            cpu_cores: 1,
            memory_mb: 128,
            gpus: 0,
            vram_gb: 0,
            runtime: Runtime::Wasm,
        },
        deadline_ms: 4_000_000_000_000,
        open_slots: 1,
        claimed: false,
        can_serve: reasons.is_empty(),
        reasons: reasons.iter().map(|r| (*r).to_owned()).collect(),
    }
}

fn status() -> StatusView {
    StatusView {
        peer_id: "12D3KooWFakeNode".to_owned(),
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".to_owned()],
        connected_peers: vec!["12D3KooWFakeRelay".to_owned()],
        relays: vec![RelayView {
            peer_id: "12D3KooWFakeRelay".to_owned(),
            address: "/ip4/127.0.0.1/tcp/4000".to_owned(),
            connected: true,
            vouched_by: None,
        }],
        accept_mode: AcceptMode::Manual,
        draining: false,
        running: vec![RunningView {
            job_id: SERVABLE.to_owned(),
            lease: 3,
            name: "word count".to_owned(),
            kind: JobKind::Batch,
            percent: 42,
            started_ms: 1_000,
            deadline_ms: 4_000_000_000_000,
        }],
        earned: 120,
        jobs_run: 7,
        claims_sent: 4,
        reject_counts: BTreeMap::from([("refused".to_owned(), 2)]),
        network: aimatrix_net::NetStats::default(),
    }
}

/// The fake driver: a fixed status, two offers (one it cannot serve), and accept that claims
/// only the servable one.
async fn fake_driver(mut commands: mpsc::Receiver<NodeApiCommand>) {
    let servable = offer(SERVABLE, 9, &[]);
    let too_big = offer(TOO_BIG, 50, &["needs 4096 MiB memory, policy allows 1024 MiB per job"]);
    while let Some(command) = commands.recv().await {
        // A test that has already failed may have dropped its receiver.
        let _ = match command {
            NodeApiCommand::Status { reply } => reply.send(status()).map_err(drop),
            NodeApiCommand::Offers { all, reply } => {
                let offers = if all {
                    vec![servable.clone(), too_big.clone()]
                } else {
                    vec![servable.clone()]
                };
                reply.send(offers).map_err(drop)
            }
            NodeApiCommand::Accept { job_id, reply } => {
                let answer = if job_id.to_string() == SERVABLE {
                    Ok(())
                } else {
                    Err(format!("this node cannot serve job {job_id}: needs 4096 MiB memory"))
                };
                reply.send(answer).map_err(drop)
            }
        };
    }
}

/// A served API on a fresh loopback port, with the fake driver behind it.
struct Served {
    addr: SocketAddr,
    shutdown: CancellationToken,
    _runtime: tokio::runtime::Runtime,
}

impl Served {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(8);
        runtime.spawn(fake_driver(rx));
        runtime.spawn(api::serve(listener, tx, shutdown.clone()));
        Self { addr, shutdown, _runtime: runtime }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn node(api: &SocketAddr, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aimatrix-node"))
        .args(args)
        .args(["--api", &api.to_string()])
        .env_remove("RUST_LOG")
        .env_remove("AIMATRIX_NODE_API")
        .output()
        .unwrap()
}

fn json_lines(output: &Output) -> Vec<Value> {
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn status_json_is_the_nodes_status() {
    let served = Served::start();
    let out = node(&served.addr, &["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let s = &lines[0];
    assert_eq!(s["peer_id"], "12D3KooWFakeNode");
    assert_eq!(s["relays"][0]["connected"], true);
    assert_eq!(s["accept_mode"], "manual");
    assert_eq!(s["running"][0]["percent"], 42);
    assert_eq!(s["earned"], 120);
    assert_eq!(s["claims_sent"], 4);
    assert_eq!(s["reject_counts"]["refused"], 2);

    let human = node(&served.addr, &["status"]);
    assert!(human.status.success(), "{}", stderr(&human));
    let text = String::from_utf8(human.stdout).unwrap();
    assert!(text.contains("120 credits (7 jobs run)"), "{text}");
    assert!(text.contains("4 sent since the node started"), "{text}");
    assert!(text.contains(SERVABLE) && text.contains("42%"), "{text}");
}

#[test]
fn compute_available_lists_servable_offers_and_with_all_the_reasons() {
    let served = Served::start();
    let out = node(&served.addr, &["compute", "available", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let offers = json_lines(&out);
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0]["job_id"], SERVABLE);
    assert_eq!(offers[0]["can_serve"], true);
    assert_eq!(offers[0]["requirements"]["runtime"], "wasm");

    let out = node(&served.addr, &["compute", "available", "--all", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let offers = json_lines(&out);
    assert_eq!(offers.len(), 2, "one JSON object per offer, one per line");
    let big = offers.iter().find(|o| o["job_id"] == TOO_BIG).unwrap();
    assert_eq!(big["can_serve"], false);
    assert_eq!(big["reasons"][0], "needs 4096 MiB memory, policy allows 1024 MiB per job");

    let human = node(&served.addr, &["compute", "available", "--all"]);
    let text = String::from_utf8(human.stdout).unwrap();
    assert!(text.contains("cannot take: needs 4096 MiB memory"), "{text}");
    assert!(text.contains("1 core, 128 MiB, wasm"), "{text}");
}

#[test]
fn compute_accept_claims_or_says_why_not() {
    let served = Served::start();
    let out = node(&served.addr, &["compute", "accept", SERVABLE]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("claimed job {SERVABLE}")));

    let refused = node(&served.addr, &["compute", "accept", TOO_BIG]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let err = stderr(&refused);
    assert!(err.contains("needs 4096 MiB memory"), "{err}");

    let json = node(&served.addr, &["compute", "accept", TOO_BIG, "--json"]);
    assert_eq!(json.status.code(), Some(1));
    let answer = &json_lines(&json)[0];
    assert_eq!(answer["claimed"], false);
    assert!(answer["reason"].as_str().unwrap().contains(TOO_BIG));

    let bad = node(&served.addr, &["compute", "accept", "not-a-job"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("expected 32 hex digits"), "{}", stderr(&bad));
}

#[test]
fn a_node_that_is_not_running_is_reported_as_such() {
    // A port that was free a moment ago: nothing listens on it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for args in [&["status"][..], &["compute", "available"], &["compute", "accept", SERVABLE]] {
        let out = node(&addr, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        let expected = format!(
            "cannot reach the node's control API at {addr}: is `aimatrix-node join` running? \
             (start it, or pass --api)"
        );
        assert!(err.contains(&expected), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn a_public_api_address_needs_the_flag() {
    let addr: SocketAddr = "0.0.0.0:7781".parse().unwrap();
    let out = node(&addr, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--api-public"), "{}", stderr(&out));
}

#[test]
fn http_errors_are_json_and_browsers_are_refused() {
    let served = Served::start();
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).proxy(None).build().into();
    let base = format!("http://{}", served.addr);
    let read = |mut response: ureq::http::Response<ureq::Body>| {
        let status = response.status().as_u16();
        let body: Value = response.body_mut().read_json().unwrap();
        (status, body)
    };

    let (status, body) = read(agent.get(format!("{base}/v1/nothing")).call().unwrap());
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("GET /v1/status"), "{body}");

    let (status, body) =
        read(agent.post(format!("{base}/v1/offers/xyz/accept")).send_empty().unwrap());
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("32 hex digits"), "{body}");

    let (status, body) = read(agent.get(format!("{base}/v1/offers?all=maybe")).call().unwrap());
    assert_eq!(status, 400, "{body}");

    let (status, _) =
        read(agent.get(format!("{base}/v1/offers/{SERVABLE}/accept")).call().unwrap());
    assert_eq!(status, 405);

    let from_page = agent.get(format!("{base}/v1/status")).header("Origin", "https://evil.example");
    let (status, body) = read(from_page.call().unwrap());
    assert_eq!(status, 403, "{body}");
    let rebound = agent.get(format!("{base}/v1/status")).header("Host", "evil.example");
    let (status, _) = read(rebound.call().unwrap());
    assert_eq!(status, 403);

    let (status, body) = read(agent.get(format!("{base}/v1/offers?all=true")).call().unwrap());
    assert_eq!(status, 200);
    assert_eq!(body["offers"].as_array().unwrap().len(), 2);

    let accepted = format!("{base}/v1/offers/{SERVABLE}/accept");
    let (status, body) = read(agent.post(accepted).send_empty().unwrap());
    assert_eq!((status, &body["claimed"]), (200, &Value::Bool(true)));
    let refused = format!("{base}/v1/offers/{TOO_BIG}/accept");
    let (status, body) = read(agent.post(refused).send_empty().unwrap());
    assert_eq!(status, 409);
    assert!(body["error"].as_str().unwrap().contains("cannot serve"), "{body}");
}

#[test]
fn a_gone_driver_is_a_503_not_a_hang() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let shutdown = CancellationToken::new();
    let server = std::thread::spawn({
        let shutdown = shutdown.clone();
        move || runtime.block_on(api::serve(listener, tx, shutdown))
    });
    let out = node(&addr, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("503") && stderr(&out).contains("shutting down"),
        "{}",
        stderr(&out)
    );
    shutdown.cancel();
    server.join().unwrap().unwrap();
}
