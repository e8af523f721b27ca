//! `aimatrix-node devnet`: a whole network on one machine — a relay and N nodes on loopback as
//! separate processes — with sample jobs posted, run, verified and paid.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

/// The sample documents the devnet's batch jobs count words in.
const SAMPLE_DOCS: &[(&str, &str)] = &[
    ("rights.txt", include_str!("../../../examples/batch-stats/docs/rights.txt")),
    ("sonnet.txt", include_str!("../../../examples/batch-stats/docs/sonnet.txt")),
    ("notes.md", include_str!("../../../examples/batch-stats/docs/notes.md")),
];

/// Run a local network: a relay and N nodes on loopback, with sample jobs.
///
/// Starts `studio-relay serve` and N `aimatrix-node join` processes (found next to this
/// program) with their own data directories, funds the `studio` account, posts the batch
/// workload on sample documents, shows progress, then prints the results, what each node earned
/// and the ledger balances. Ctrl-C stops everything cleanly.
#[derive(Debug, Args)]
pub(crate) struct DevnetArgs {
    /// How many nodes to start.
    #[arg(long, value_name = "N", default_value_t = 3)]
    nodes: u32,
    /// How many sample jobs to post.
    #[arg(long, value_name = "N", default_value_t = 3)]
    jobs: u32,
    /// Rounds of the sample training job (digits, one participant per node, up to 4); 0 posts
    /// none.
    #[arg(long, value_name = "N", default_value_t = 5)]
    training_rounds: u32,
    /// Where the processes keep their data and logs (default: a new temporary directory,
    /// removed at the end).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the network running after the sample jobs, until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
}

/// The children, stopped (SIGTERM, then SIGKILL) when dropped.
struct Processes {
    children: Vec<(String, Child)>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            terminate(child);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for (name, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("devnet: {name} did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

fn terminate(child: &Child) {
    #[cfg(unix)]
    {
        if let Ok(pid) = i32::try_from(child.id()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
    }
}

/// Paths and addresses of the devnet's processes.
struct Devnet {
    node_bin: PathBuf,
    relay_bin: PathBuf,
    dir: PathBuf,
    relay_api: String,
    node_apis: Vec<String>,
    stop: Arc<AtomicBool>,
}

pub(crate) fn run(args: DevnetArgs) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let node_bin = std::env::current_exe().context("cannot find this program's path")?;
    let relay_bin =
        node_bin.with_file_name(format!("studio-relay{}", std::env::consts::EXE_SUFFIX));
    if !relay_bin.is_file() {
        bail!(
            "the studio-relay program is not next to {} ; build both first: \
             `cargo build -p studio-relay -p aimatrix-node`",
            node_bin.display()
        );
    }
    let temp;
    let dir = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("aimatrix-devnet-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                rt.block_on(aimatrix_cli_support::shutdown_signal());
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    let mut net = Devnet {
        node_bin,
        relay_bin,
        dir,
        relay_api: free_loopback_addr()?,
        node_apis: Vec::new(),
        stop,
    };
    let mut procs = Processes { children: Vec::new() };
    let outcome = net.run(&args, &mut procs);
    drop(procs);
    if net.stop.load(Ordering::SeqCst) {
        println!("devnet stopped");
        return Ok(ExitCode::SUCCESS);
    }
    outcome
}

impl Devnet {
    fn run(&mut self, args: &DevnetArgs, procs: &mut Processes) -> anyhow::Result<ExitCode> {
        println!("devnet: data and logs in {}", self.dir.display());
        let relay_addr = self.start_relay(procs)?;
        println!("relay   {relay_addr}");
        for i in 0..args.nodes {
            let api = free_loopback_addr()?;
            self.start_node(procs, i, &relay_addr, &api)?;
            self.node_apis.push(api);
        }
        let peers = self.wait_for_nodes()?;
        for (i, peer) in peers.iter().enumerate() {
            println!("node-{i}  {peer}");
        }
        let minted = 1_000;
        self.relay(&["ledger", "mint", "studio", &minted.to_string(), "--memo", "devnet"])?;
        println!("minted {minted} credits for account studio");

        let job_file = self.write_sample_job()?;
        let mut ids = Vec::new();
        for _ in 0..args.jobs {
            let posted = self.relay_json(&["job", "post", &path_str(&job_file)?, "--json"])?;
            let id = posted["job_id"].as_str().context("job post printed no job_id")?.to_owned();
            println!("posted  job {id}");
            ids.push(id);
        }
        if args.training_rounds > 0 {
            let job_file = self.write_training_job(args.nodes.min(4), args.training_rounds)?;
            let posted = self.relay_json(&["job", "post", &path_str(&job_file)?, "--json"])?;
            let id = posted["job_id"].as_str().context("job post printed no job_id")?.to_owned();
            println!("posted  training job {id} ({} rounds)", args.training_rounds);
            ids.push(id);
        }
        let finished = self.watch(&ids)?;
        println!();
        let mut all_ok = true;
        for job in &finished {
            all_ok &= self.print_result(job)?;
        }
        println!("earned (from each node's receipts) and ledger balances:");
        for (i, api) in self.node_apis.iter().enumerate() {
            let status = self.node_json(&["status", "--json", "--api", api])?;
            let peer = status["peer_id"].as_str().unwrap_or("?").to_owned();
            let balance = self.relay_json(&["ledger", "balance", &peer, "--json"])?;
            println!(
                "  node-{i}  earned {:>4}  ledger {:>4}  {peer}",
                status["earned"],
                available(&balance)
            );
        }
        let studio = self.relay_json(&["ledger", "balance", "studio", "--json"])?;
        println!("  studio (requester)  ledger {:>4}", available(&studio));
        let audit = self.relay_json(&["ledger", "audit", "--json"]);
        match audit {
            Ok(report) => println!("ledger audit: {}", summarize_audit(&report)),
            Err(e) => println!("ledger audit: {e:#}"),
        }
        if args.keep_running {
            println!("the network keeps running; Ctrl-C stops it");
            while !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
    }

    fn start_relay(&self, procs: &mut Processes) -> anyhow::Result<String> {
        let data = self.dir.join("relay");
        let log = log_file(&self.dir, "relay.log")?;
        let mut child = Command::new(&self.relay_bin)
            .args(["serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", &self.relay_api])
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.relay_bin.display()))?;
        let stdout = child.stdout.take().context("no relay stdout")?;
        procs.children.push(("relay".into(), child));
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line.trim().to_owned();
        if addr.is_empty() {
            bail!(
                "the relay exited before printing its address; see {}",
                self.dir.join("relay.log").display()
            );
        }
        Ok(addr)
    }

    fn start_node(
        &self,
        procs: &mut Processes,
        i: u32,
        relay: &str,
        api: &str,
    ) -> anyhow::Result<()> {
        let log = log_file(&self.dir, &format!("node-{i}.log"))?;
        let child = Command::new(&self.node_bin)
            .args(["join", "--relay", relay, "--listen", "/ip4/127.0.0.1/tcp/0", "--api", api])
            .arg("--data-dir")
            .arg(self.dir.join(format!("node-{i}")))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.node_bin.display()))?;
        procs.children.push((format!("node-{i}"), child));
        Ok(())
    }

    /// Waits until every node's API answers and the relay has heard every node's advert.
    fn wait_for_nodes(&self) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut peers = vec![None; self.node_apis.len()];
        loop {
            self.check_stop()?;
            for (i, api) in self.node_apis.iter().enumerate() {
                if peers[i].is_none() {
                    if let Ok(status) = self.node_json(&["status", "--json", "--api", api]) {
                        peers[i] = status["peer_id"].as_str().map(str::to_owned);
                    }
                }
            }
            let known = self
                .relay_json(&["status", "--json"])
                .ok()
                .and_then(|s| s["known_nodes"].as_u64())
                .unwrap_or(0);
            if peers.iter().all(Option::is_some) && known >= self.node_apis.len() as u64 {
                return Ok(peers.into_iter().flatten().collect());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the nodes did not all reach the relay within 60 s ({known} of {} known); \
                     see the logs in {}",
                    self.node_apis.len(),
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Writes the batch-stats module, the sample documents and a job file.
    fn write_sample_job(&self) -> anyhow::Result<PathBuf> {
        let jobs = self.dir.join("sample-job");
        std::fs::create_dir_all(jobs.join("docs"))?;
        std::fs::write(jobs.join("batch-stats.wasm"), aimatrix_workloads::BATCH_STATS_WASM)?;
        let mut toml = String::from(
            "kind = \"batch\"\nname = \"word statistics\"\nreward = 10\nreplication = 1\n\
             max_attempts = 3\ndeadline_s = 300\n\n[workload]\nruntime = \"wasm\"\n\
             module = \"batch-stats.wasm\"\nargs = [\"--top\", \"5\"]\n\n[requirements]\n\
             cpu_cores = 1\nmemory_mb = 64\n\n[limits]\ntimeout_s = 30\nmemory_mb = 64\n",
        );
        for (name, text) in SAMPLE_DOCS {
            std::fs::write(jobs.join("docs").join(name), text)?;
            toml.push_str(&format!("\n[[inputs]]\nname = \"{name}\"\nsource = \"docs/{name}\"\n"));
        }
        let path = jobs.join("job.toml");
        std::fs::write(&path, toml)?;
        Ok(path)
    }

    /// Writes the sample training job: the train-step guest, a fresh 64-32-10 model, the
    /// digits training split (chunked by the relay, one chunk per participant) and test split.
    fn write_training_job(&self, participants: u32, rounds: u32) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("sample-training-job");
        std::fs::create_dir_all(&dir)?;
        let files = aimatrix_digits::job_files(32, 1);
        std::fs::write(dir.join("train-step.wasm"), aimatrix_workloads::TRAIN_STEP_WASM)?;
        std::fs::write(dir.join("model.bin"), &files.model)?;
        std::fs::write(dir.join("digits-train.bin"), &files.dataset)?;
        std::fs::write(dir.join("digits-test.bin"), &files.holdout)?;
        let toml = format!(
            "kind = \"training\"\nname = \"digits\"\nreward = 2\nmax_attempts = 3\n\
             deadline_s = 900\n\n[workload]\nruntime = \"wasm\"\nmodule = \"train-step.wasm\"\n\n\
             [requirements]\ncpu_cores = 1\nmemory_mb = 128\n\n\
             [limits]\ntimeout_s = 120\nmemory_mb = 128\n\n\
             [training]\nmodel = \"model.bin\"\ndataset = \"digits-train.bin\"\n\
             holdout = \"digits-test.bin\"\nparticipants = {participants}\nquorum = {participants}\n\
             rounds = {rounds}\nlocal_epochs = 2\nlearning_rate = 0.1\nbatch_size = 16\n\
             aggregation = \"centered_clip\"\ncompression = \"int8\"\nround_deadline_s = 120\n"
        );
        let path = dir.join("job.toml");
        std::fs::write(&path, toml)?;
        Ok(path)
    }

    /// Shows each job's state and progress as it changes; returns the final job views.
    fn watch(&self, ids: &[String]) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut shown: Vec<String> = vec![String::new(); ids.len()];
        loop {
            self.check_stop()?;
            let mut views = Vec::with_capacity(ids.len());
            for (i, id) in ids.iter().enumerate() {
                let view = self.relay_json(&["job", "status", id, "--json"])?;
                let line = describe(&view);
                if line != shown[i] {
                    println!("job {}  {line}", &id[..8.min(id.len())]);
                    shown[i] = line;
                }
                views.push(view);
            }
            if views.iter().all(is_final) {
                return Ok(views);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the sample jobs did not finish within 10 minutes; see the logs in {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// Prints one finished job; true when it completed.
    fn print_result(&self, job: &Value) -> anyhow::Result<bool> {
        let id = job["id"].as_str().unwrap_or("?");
        if job["state"] != "completed" {
            println!("job {id}: {} ({})", job["state"], job["reason"]);
            return Ok(false);
        }
        let out = self.dir.join("results").join(id);
        self.relay(&["job", "result", id, "--out", &path_str(&out)?])?;
        if job["kind"] == "training" {
            println!("training job {id} completed; test accuracy after each round:");
            for r in job["training"]["history"].as_array().map(Vec::as_slice).unwrap_or_default() {
                println!(
                    "  round {:>2}: {} update(s) accepted, {:>6} bytes, accuracy {:>6.2}%, loss {:.4}",
                    r["round"],
                    r["accepted"],
                    r["bytes_received"],
                    100.0 * r["accuracy"].as_f64().unwrap_or(0.0),
                    r["loss"].as_f64().unwrap_or(0.0)
                );
            }
            println!("  final model and metrics.csv in {}", out.display());
            return Ok(true);
        }
        let ran_on: Vec<&str> = job["leases"]
            .as_array()
            .map(|ls| {
                ls.iter().filter(|l| l["paid"] == true).filter_map(|l| l["node"].as_str()).collect()
            })
            .unwrap_or_default();
        println!("job {id} completed on {}:", ran_on.join(", "));
        let stdout = std::fs::read_to_string(out.join("stdout")).unwrap_or_default();
        for line in stdout.lines() {
            println!("  | {line}");
        }
        Ok(true)
    }

    fn check_stop(&self) -> anyhow::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    }

    fn relay(&self, args: &[&str]) -> anyhow::Result<String> {
        run_tool(&self.relay_bin, args, &[("AIMATRIX_RELAY_API", &self.relay_api)])
    }

    fn relay_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        parse_json(&self.relay(args)?)
    }

    fn node_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        parse_json(&run_tool(&self.node_bin, args, &[])?)
    }
}

fn run_tool(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed: {}",
            bin.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_json(text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text.trim()).with_context(|| format!("expected JSON, got {text:?}"))
}

fn is_final(view: &Value) -> bool {
    matches!(view["state"].as_str(), Some("completed" | "failed" | "refused"))
}

fn describe(view: &Value) -> String {
    let state = view["state"].as_str().unwrap_or("?");
    if let Some(t) = view.get("training") {
        let done = t["history"].as_array().map_or(0, Vec::len);
        let last = t["history"].as_array().and_then(|h| h.last());
        let accuracy = last
            .and_then(|r| r["accuracy"].as_f64())
            .map(|a| format!(", test accuracy {:.2}%", 100.0 * a))
            .unwrap_or_default();
        return format!(
            "{state}: training {} ({done} of {} rounds done{accuracy})",
            t["phase"].as_str().unwrap_or("?"),
            t["rounds"]
        );
    }
    let leases = view["leases"].as_array().map(Vec::as_slice).unwrap_or_default();
    let running: Vec<String> = leases
        .iter()
        .filter(|l| l["status"] == "active")
        .map(|l| format!("{} {}%", short(l["node"].as_str().unwrap_or("?")), l["progress"]))
        .collect();
    if running.is_empty() {
        state.to_owned()
    } else {
        format!("{state}: running on {}", running.join(", "))
    }
}

fn short(peer: &str) -> &str {
    &peer[peer.len().saturating_sub(8)..]
}

fn available(balance: &Value) -> String {
    balance.get("available").map_or_else(|| balance.to_string(), ToString::to_string)
}

fn summarize_audit(report: &Value) -> String {
    let list = |key: &str| report.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    let (problems, disagreements) = (list("problems"), list("disagreements"));
    match report.get("clean").and_then(Value::as_bool) {
        Some(true) => match report.get("jobs").and_then(Value::as_u64) {
            Some(jobs) => format!("clean ({jobs} job records agree with the ledger)"),
            None => "clean".to_owned(),
        },
        Some(false) => format!(
            "{} problem(s) in the ledger: {}; {} disagreement(s) with the job store: {}",
            problems.len(),
            Value::Array(problems),
            disagreements.len(),
            Value::Array(disagreements)
        ),
        None => report.to_string(),
    }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let path = dir.join(name);
    std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))
}

fn path_str(path: &Path) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}

/// A free port on 127.0.0.1 (bound and released; the child binds it right after).
fn free_loopback_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", aimatrix_cli_support::free_loopback_port()?))
}
