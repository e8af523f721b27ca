//! Many relays, end to end (issue 17): three `studio-relay serve` processes peered with each
//! other (`--peer`), twelve `aimatrix-node join` processes each given only one of them, all on
//! loopback. A node works for the relays its relay vouches for, so a job posted at one relay
//! runs on a node that never dialed it, nodes keep connections to each other, and when a relay
//! dies the others keep their work going on its former nodes; its own unfinished jobs complete
//! once it is back, paid once.
//!
//! Relay A's nodes are the only ones whose policy allows `data_processing` jobs, so such a job
//! posted at B or C can only run on a node that dialed A alone.
//!
//! Bad input: a fourth relay that only dials A (no relay vouches for it) offers work through the
//! mesh, and every node refuses it (`untrusted_relay`, in `aimatrix-node status --json`); a
//! hostile peer in this process stores a forged advert and another node's advert under a node's
//! DHT key, and the DHT servers it reaches refuse both (`network.dht.refused` in
//! `studio-relay status --json` and `aimatrix-node status --json`) and still answer the genuine
//! one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use aimatrix_net::{NetConfig, Role};
use aimatrix_protocol::capability::advert_record_key;
use aimatrix_protocol::identity::Keypair;
use aimatrix_tests::{
    binary, first_stdout_line, parse_json, print_log_tails, show, without_aimatrix_env,
};
use serde_json::Value;

/// The longest wait for any one condition. Generous: fifteen processes share two cores.
const WAIT: Duration = Duration::from_secs(240);
const POLL: Duration = Duration::from_millis(500);
const RELAYS: usize = 3;
const NODES: usize = 12;
const MINTED: i64 = 1_000;
const REWARD: i64 = 10;
/// Lines of each log printed when the test fails.
const LOG_TAIL_LINES: usize = 40;

struct Relay {
    api: String,
    listen: String,
    /// Its multiaddr with `/p2p/<peer id>`.
    addr: String,
    peer_id: String,
    data_dir: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// The relays it is started with `--peer` to.
    peers: Vec<usize>,
}

struct Node {
    api: String,
    data_dir: PathBuf,
    /// The relay it was given.
    relay: usize,
    peer_id: String,
    child: Child,
}

struct Mesh {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    relays: Vec<Relay>,
    nodes: Vec<Node>,
    logs: Vec<(String, PathBuf)>,
}

impl Mesh {
    fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("aimatrix-mesh-test-").tempdir().unwrap();
        let root = dir.path().to_owned();
        std::fs::create_dir_all(root.join("logs")).unwrap();
        let mut mesh =
            Self { dir: Some(dir), root, relays: Vec::new(), nodes: Vec::new(), logs: Vec::new() };
        // Each relay's key is made before any starts, so each can be told the others' addresses.
        for i in 0..RELAYS {
            mesh.add_relay((0..RELAYS).filter(|j| *j != i).collect());
        }
        for i in 0..RELAYS {
            mesh.start_relay(i);
        }
        for i in 0..NODES {
            mesh.start_node(i);
        }
        for i in 0..NODES {
            let status = wait_for(&format!("node-{i} to answer"), || mesh.node_status(i));
            mesh.nodes[i].peer_id = status["peer_id"].as_str().unwrap().to_owned();
        }
        for r in 0..RELAYS {
            let minted =
                mesh.relay_json(r, &["ledger", "mint", "studio", &MINTED.to_string(), "--json"]);
            assert_eq!(minted["available"], MINTED, "{minted}");
        }
        mesh
    }

    /// Makes the key and data directory of another relay, to be peered with `peers`.
    fn add_relay(&mut self, peers: Vec<usize>) -> usize {
        let i = self.relays.len();
        let data_dir = self.root.join(format!("relay-{i}"));
        std::fs::create_dir_all(&data_dir).unwrap();
        let (key, _) = Keypair::load_or_create(&data_dir.join("relay.key")).unwrap();
        let peer_id = key.public().to_peer_id();
        let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
        self.relays.push(Relay {
            api: format!("127.0.0.1:{}", free_port()),
            addr: format!("{listen}/p2p/{peer_id}"),
            listen,
            peer_id,
            data_dir,
            child: None,
            starts: 0,
            peers,
        });
        i
    }

    fn logged(&mut self, name: &str, program: &str) -> Command {
        let log_path = self.root.join("logs").join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        self.logs.push((name.to_owned(), log_path));
        let mut cmd = Command::new(binary(program));
        without_aimatrix_env(&mut cmd)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stderr(log);
        cmd
    }

    /// Starts relay `i` (again after a kill: same key, data, address), peered with the others.
    fn start_relay(&mut self, i: usize) {
        let name = match self.relays[i].starts {
            0 => format!("relay-{i}"),
            n => format!("relay-{i}-restart-{n}"),
        };
        self.relays[i].starts += 1;
        let peers: Vec<String> =
            self.relays[i].peers.iter().map(|j| self.relays[*j].addr.clone()).collect();
        let mut cmd = self.logged(&name, "studio-relay");
        let relay = &self.relays[i];
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&relay.data_dir)
            .args(["--listen", &relay.listen, "--api", &relay.api, "--reannounce-s", "2"])
            .stdout(Stdio::piped());
        for peer in &peers {
            cmd.args(["--peer", peer]);
        }
        let mut child = cmd.spawn().unwrap();
        let line = first_stdout_line(&mut child, WAIT).expect("the relay printed no address");
        assert_eq!(line.trim(), self.relays[i].addr, "relay-{i} printed another address");
        self.relays[i].child = Some(child);
    }

    fn kill_relay(&mut self, i: usize) {
        let mut child = self.relays[i].child.take().expect("relay is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Node `i` joins relay `i % RELAYS` only; relay 0's nodes also allow `data_processing`.
    fn start_node(&mut self, i: usize) {
        let relay = i % RELAYS;
        let data_dir = self.root.join(format!("node-{i}"));
        std::fs::create_dir_all(&data_dir).unwrap();
        let kinds = if relay == 0 { r#"["batch", "data_processing"]"# } else { r#"["batch"]"# };
        std::fs::write(
            data_dir.join("node.toml"),
            format!("allowed_kinds = {kinds}\nnode_peers = 4\n"),
        )
        .unwrap();
        let api = format!("127.0.0.1:{}", free_port());
        let addr = self.relays[relay].addr.clone();
        let mut cmd = self.logged(&format!("node-{i}"), "aimatrix-node");
        cmd.args(["join", "--relay", &addr, "--listen", "/ip4/127.0.0.1/tcp/0", "--api", &api])
            .arg("--data-dir")
            .arg(&data_dir)
            .stdout(Stdio::null());
        let child = cmd.spawn().unwrap();
        self.nodes.push(Node { api, data_dir, relay, peer_id: String::new(), child });
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.run_at(program, args, "")
    }

    /// Runs `program` with `AIMATRIX_RELAY_API` set to `relay_api` (when not empty).
    fn run_at(&self, program: &str, args: &[&str], relay_api: &str) -> Output {
        let mut cmd = Command::new(binary(program));
        if relay_api.is_empty() {
            cmd.env_remove("AIMATRIX_RELAY_API");
        } else {
            cmd.env("AIMATRIX_RELAY_API", relay_api);
        }
        cmd.args(args)
            .env_remove("AIMATRIX_RELAY_DATA_DIR")
            .env_remove("AIMATRIX_NODE_API")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn try_relay_json(&self, r: usize, args: &[&str]) -> Option<Value> {
        let output = self.run_at("studio-relay", args, &self.relays[r].api);
        output.status.success().then(|| parse_json(&String::from_utf8_lossy(&output.stdout)))
    }

    fn relay_json(&self, r: usize, args: &[&str]) -> Value {
        let output = self.run_at("studio-relay", args, &self.relays[r].api);
        assert!(
            output.status.success(),
            "`studio-relay {}` failed: {}",
            args.join(" "),
            show(&output)
        );
        parse_json(&String::from_utf8_lossy(&output.stdout))
    }

    fn node_status(&self, i: usize) -> Option<Value> {
        let output = self.run("aimatrix-node", &["status", "--json", "--api", &self.nodes[i].api]);
        output.status.success().then(|| parse_json(&String::from_utf8_lossy(&output.stdout)))
    }

    /// Posts the word-statistics job of `kind` at relay `r`.
    fn post(&self, r: usize, name: &str, kind: &str) -> String {
        let dir = self.root.join("jobs").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("batch-stats.wasm"), aimatrix_workloads::BATCH_STATS_WASM).unwrap();
        std::fs::write(dir.join("doc.txt"), "the mesh carries the work the mesh carries").unwrap();
        let toml = format!(
            "kind = \"{kind}\"\nname = \"{name}\"\nreward = {REWARD}\nreplication = 1\n\
             max_attempts = 5\ndeadline_s = 900\n\n[workload]\nruntime = \"wasm\"\n\
             module = \"batch-stats.wasm\"\nargs = [\"--top\", \"3\"]\n\n[requirements]\n\
             cpu_cores = 1\nmemory_mb = 64\n\n[limits]\ntimeout_s = 30\nmemory_mb = 64\n\n\
             [[inputs]]\nname = \"doc.txt\"\nsource = \"doc.txt\"\n"
        );
        let path = dir.join("job.toml");
        std::fs::write(&path, toml).unwrap();
        let posted = self.relay_json(r, &["job", "post", path.to_str().unwrap(), "--json"]);
        posted["job_id"].as_str().unwrap().to_owned()
    }

    fn wait_for_end(&self, r: usize, id: &str) -> Value {
        wait_for(&format!("job {id} at relay-{r} to end"), || {
            let view = self.try_relay_json(r, &["job", "status", id, "--json"])?;
            matches!(view["state"].as_str(), Some("completed" | "failed" | "refused"))
                .then_some(view)
        })
    }

    /// The index of the node with `peer_id`.
    fn node_index(&self, peer_id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.peer_id == peer_id)
            .unwrap_or_else(|| panic!("no node {peer_id}"))
    }

    /// The one node paid for job `id` at relay `r`, which must have completed.
    fn paid_once(&self, r: usize, id: &str) -> usize {
        let view = self.wait_for_end(r, id);
        assert_eq!(view["state"], "completed", "{view}");
        let paid: Vec<&str> = view["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["paid"] == true)
            .map(|l| l["node"].as_str().unwrap())
            .collect();
        assert_eq!(paid.len(), 1, "paid once: {view}");
        self.node_index(paid[0])
    }

    /// A hostile peer in this process joins through relay A and stores, under node `victim`'s
    /// advert key, a forged copy of its advert and then node `other`'s advert. Returns the
    /// genuine advert record it found first.
    fn forge_dht_records(&self, victim: usize, other: usize) -> Vec<u8> {
        let (victim_key, other_key) = (self.advert_key(victim), self.advert_key(other));
        self.with_dht_peer(|net| async move {
            let mut found = None;
            for _ in 0..240 {
                let genuine = net.get_record(victim_key.clone()).await.ok().flatten();
                let others = net.get_record(other_key.clone()).await.ok().flatten();
                if let (Some(genuine), Some(others)) = (genuine, others) {
                    found = Some((genuine, others));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let (genuine, others) = found.expect("the hostile peer found both adverts");
            let mut forged = genuine.clone();
            let last = forged.len() - 1;
            forged[last] ^= 1;
            let _ = net.put_record(victim_key.clone(), forged).await;
            let _ = net.put_record(victim_key, others).await;
            genuine
        })
    }

    /// Node `i`'s advert record as a fresh peer (not the forger, whose own store keeps what it
    /// put) finds it in the DHT.
    fn dht_advert(&self, i: usize) -> Option<Vec<u8>> {
        let key = self.advert_key(i);
        self.with_dht_peer(|net| async move { net.get_record(key).await.ok().flatten() })
    }

    fn advert_key(&self, i: usize) -> Vec<u8> {
        let peer: aimatrix_net::PeerId = self.nodes[i].peer_id.parse().unwrap();
        advert_record_key(&aimatrix_net::node_id_of(&peer).unwrap())
    }

    /// Runs `act` with a new peer of this process that joined the network through relay A.
    fn with_dht_peer<T, F, Fut>(&self, act: F) -> T
    where
        F: FnOnce(aimatrix_net::NetHandle) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let relay = self.relays[0].addr.parse().unwrap();
        runtime.block_on(async move {
            let mut cfg = NetConfig::new(Keypair::generate_os(), Role::Node);
            cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
            cfg.bootstrap = vec![relay];
            let (net, _events) = aimatrix_net::spawn(cfg).await.unwrap();
            let out = act(net.clone()).await;
            net.shutdown().await;
            out
        })
    }

    fn assert_audit_clean(&self, r: usize) {
        let audit = self.relay_json(r, &["ledger", "audit", "--json"]);
        assert_eq!(audit["clean"], true, "relay-{r}: {audit}");
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for relay in &mut self.relays {
            if let Some(child) = relay.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        if std::thread::panicking() {
            print_log_tails(&self.logs, LOG_TAIL_LINES);
            let kept = self.dir.take().unwrap().keep();
            eprintln!("test files kept in {}", kept.display());
        }
    }
}

#[test]
fn three_peered_relays_share_their_nodes_and_survive_one_going_down() {
    let mut mesh = Mesh::start();
    let a_nodes: Vec<usize> = (0..NODES).filter(|i| mesh.nodes[*i].relay == 0).collect();

    // Every relay learns of all twelve nodes, though each was dialed by four.
    for r in 0..RELAYS {
        wait_for(&format!("relay-{r} to know every node"), || {
            let status = mesh.try_relay_json(r, &["status", "--json"])?;
            (status["known_nodes"].as_u64()? >= NODES as u64).then_some(())
        });
    }
    // A's nodes work for B and C, vouched for by A; nodes keep connections to other nodes.
    for &i in &a_nodes {
        wait_for(&format!("node-{i} to work for all three relays"), || {
            let status = mesh.node_status(i)?;
            let relays = status["relays"].as_array()?;
            let vouched =
                relays.iter().filter(|r| r["vouched_by"] == mesh.relays[0].peer_id.as_str());
            (relays.len() == RELAYS && vouched.count() == RELAYS - 1).then_some(())
        });
    }
    for i in 0..NODES {
        wait_for(&format!("node-{i} to keep a connection to another node"), || {
            let status = mesh.node_status(i)?;
            (!status["network"]["peers"]["nodes"].as_array()?.is_empty()).then_some(())
        });
    }

    // A data_processing job posted at B runs on a node that dialed only A.
    let at_b = mesh.post(1, "at-b", "data_processing");
    let ran = mesh.paid_once(1, &at_b);
    assert!(
        a_nodes.contains(&ran),
        "node-{ran} ran B's job but dialed relay-{}",
        mesh.nodes[ran].relay
    );
    let earnings = parse_json(&String::from_utf8_lossy(
        &mesh
            .run(
                "aimatrix-node",
                &["earnings", "--json", "--data-dir", mesh.nodes[ran].data_dir.to_str().unwrap()],
            )
            .stdout,
    ));
    assert_eq!(earnings["receipts"][&mesh.relays[1].peer_id]["credits"], REWARD, "{earnings}");

    // A relay nobody vouches for dials A and offers work: its offers reach the nodes through
    // the mesh, and every node refuses them; none of its work runs.
    let rogue = mesh.add_relay(vec![0]);
    mesh.start_relay(rogue);
    let minted =
        mesh.relay_json(rogue, &["ledger", "mint", "studio", &MINTED.to_string(), "--json"]);
    assert_eq!(minted["available"], MINTED, "{minted}");
    let at_rogue = mesh.post(rogue, "at-rogue", "batch");
    wait_for("a node to refuse the rogue relay's offer", || {
        (0..NODES).find_map(|i| {
            let status = mesh.node_status(i)?;
            (status["reject_counts"]["untrusted_relay"].as_u64()? >= 1).then_some(())
        })
    });
    let view = mesh.relay_json(rogue, &["job", "status", &at_rogue, "--json"]);
    assert_eq!(view["leases"].as_array().map(Vec::len), Some(0), "nobody works for it: {view}");

    // A hostile peer stores a forged advert and another node's advert under node 0's DHT key.
    // Kademlia sends them to the DHT servers closest to the key (relays and reachable nodes):
    // those refuse both and count them by reason in `status --json`, and the DHT still answers
    // the genuine record.
    let genuine = mesh.forge_dht_records(0, 1);
    let refused = wait_for("the DHT servers to refuse the forged records", || {
        let mut totals = std::collections::BTreeMap::<String, u64>::new();
        let relays = (0..RELAYS).filter_map(|r| mesh.try_relay_json(r, &["status", "--json"]));
        let nodes = (0..NODES).filter_map(|i| mesh.node_status(i));
        for status in relays.chain(nodes) {
            if let Some(refused) = status["network"]["dht"]["refused"].as_object() {
                for (label, count) in refused {
                    *totals.entry(label.clone()).or_default() += count.as_u64().unwrap_or(0);
                }
            }
        }
        let counted = |label: &str| totals.get(label).copied().unwrap_or(0) >= 1;
        (counted("bad_signature_record") && counted("foreign_key_record")).then_some(totals)
    });
    eprintln!("the DHT servers refused: {refused:?}");
    let found = wait_for("a fresh peer to find node 0's advert", || mesh.dht_advert(0));
    assert_eq!(found, genuine, "the genuine advert record is what the DHT still answers");

    // A job at A, then A dies before it can finish.
    let at_a = mesh.post(0, "at-a", "batch");
    mesh.kill_relay(0);

    // B and C keep working, also on A's former nodes.
    let at_b2 = mesh.post(1, "at-b-while-a-is-down", "data_processing");
    let at_c = mesh.post(2, "at-c-while-a-is-down", "data_processing");
    for (r, id) in [(1, &at_b2), (2, &at_c)] {
        let ran = mesh.paid_once(r, id);
        assert!(a_nodes.contains(&ran), "node-{ran} is not one of A's nodes");
    }

    // A comes back: its unfinished job completes, paid once, and every ledger agrees.
    mesh.start_relay(0);
    mesh.paid_once(0, &at_a);
    for r in 0..RELAYS {
        mesh.assert_audit_clean(r);
    }
    // Each node's earnings are kept apart by relay.
    let mut credited = 0;
    for i in 0..NODES {
        let dir = mesh.nodes[i].data_dir.clone();
        let output =
            mesh.run("aimatrix-node", &["earnings", "--json", "--data-dir", dir.to_str().unwrap()]);
        let view = parse_json(&String::from_utf8_lossy(&output.stdout));
        for relay in &mesh.relays {
            credited += view["receipts"][&relay.peer_id]["credits"].as_i64().unwrap_or(0);
        }
    }
    assert_eq!(credited, 4 * REWARD, "four jobs, each paid once, at the relay that posted it");
}

fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    aimatrix_tests::wait_for(what, WAIT, POLL, check)
}

fn free_port() -> u16 {
    aimatrix_cli_support::free_loopback_port().unwrap()
}
