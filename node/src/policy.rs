//! The node owner's policy: the config file `node.toml`, and how it shapes what the node
//! advertises and claims.
//!
//! The protocol has a place for every setting: the job kinds, resource caps, reward floor and
//! job slots go into the advertised profile's [`NodePolicy`], so the node's own matching
//! (`aimatrix_protocol::matching`) and the relay's both apply them; the accept mode goes into
//! [`NodeConfig`]. [`Policy::apply`] turns a detected profile into the advertised one, and
//! [`Policy::node_config`] builds the core's config. Every key is documented in `docs/node.md`.
//!
//! ```ignore
//! let policy = Policy::parse("accept = \"manual\"\nmin_reward = 5\n")?;
//! let advertised = policy.apply(hardware::to_profile(&detected));
//! let core = NodeCore::new(key, policy.node_config(relay_id), advertised, seed);
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aimatrix_protocol::capability::{CapabilityProfile, NodePolicy};
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::job::{FieldError, JobKind, JobKindSet, Runtime};
use aimatrix_protocol::node::{AcceptMode, NodeConfig};
use anyhow::Context;
use clap::{Args, ValueEnum};
use libp2p::Multiaddr;
use serde::Deserialize;

use crate::hardware::advice;

/// The config file's name in the data directory, read when `--config` is not given.
pub(crate) const CONFIG_FILE: &str = "node.toml";

/// Most jobs one node may run at once.
const MAX_CONCURRENT_JOBS_MAX: u32 = 1024;

/// Longest shutdown grace period, in seconds.
const GRACE_PERIOD_S_MAX: u64 = 3600;

/// The owner's policy: the contents of `node.toml`. Absent keys take [`Policy::default`].
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Policy {
    /// Claim matching offers by itself (`auto`) or only on `compute accept` (`manual`).
    pub(crate) accept: AcceptMode,
    /// Job kinds the owner allows; the node serves those its hardware can run.
    pub(crate) allowed_kinds: JobKindSet,
    /// Most CPU cores one job may ask for; `None` allows as many as the machine has.
    pub(crate) max_cpu_cores: Option<u32>,
    /// Most memory one job may ask for, in MiB; `None` allows all the machine has.
    pub(crate) max_memory_mb: Option<u64>,
    /// Most GPUs the node offers (the ones with the most VRAM); `None` offers all.
    pub(crate) max_gpus: Option<u32>,
    /// Longest job timeout accepted, in seconds; `None` keeps the protocol's default (24 h).
    pub(crate) max_timeout_s: Option<u64>,
    /// Lowest reward, in credits, of a job the node claims.
    pub(crate) min_reward: u64,
    /// Jobs run at once (pending claims count too).
    pub(crate) max_concurrent_jobs: u32,
    /// Whether Docker jobs are served when an engine is present.
    pub(crate) docker: bool,
    /// How long a shutdown waits for running jobs before handing them back, in seconds.
    pub(crate) grace_period_s: u64,
    /// Addresses to listen on (the `--listen` flags replace them).
    pub(crate) listen: Vec<Multiaddr>,
    /// The relay to join (`--relay` replaces it and `relays`).
    pub(crate) relay: Option<Multiaddr>,
    /// More relays to join (`--relay` replaces them and `relay`).
    pub(crate) relays: Vec<Multiaddr>,
    /// Work only for the relays given here or with `--relay`, not for those their rosters
    /// vouch for.
    pub(crate) pin_relays: bool,
    /// The control API address (`--api` or `AIMATRIX_NODE_API` replace it).
    pub(crate) api: Option<SocketAddr>,
    /// How many other nodes to keep connections to (the gossip mesh among nodes).
    pub(crate) node_peers: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            accept: AcceptMode::Auto,
            allowed_kinds: JobKindSet::ALL,
            max_cpu_cores: None,
            max_memory_mb: None,
            max_gpus: None,
            max_timeout_s: None,
            min_reward: 0,
            max_concurrent_jobs: 1,
            docker: true,
            grace_period_s: 30,
            listen: Vec::new(),
            relay: None,
            relays: Vec::new(),
            pin_relays: false,
            api: None,
            node_peers: aimatrix_protocol::mesh::NODE_PEERS_DEFAULT,
        }
    }
}

/// Why a config file was refused: every problem found, each naming its field and line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PolicyError {
    /// The problems, in the order the checks found them.
    pub(crate) errors: Vec<FieldError>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for PolicyError {}

impl PolicyError {
    /// Every problem on its own line, prefixed with `source` (the file name).
    pub(crate) fn with_source(&self, source: &str) -> String {
        self.errors.iter().map(|e| format!("{source}: {e}")).collect::<Vec<_>>().join("\n")
    }
}

impl Policy {
    /// Parses `node.toml` text and checks its values.
    pub(crate) fn parse(text: &str) -> Result<Self, PolicyError> {
        let deserializer = toml::Deserializer::new(text);
        let policy: Self = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let mut problem = inner.message().trim().to_owned();
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                problem.push_str(&format!(" (line {line})"));
            }
            let field = if path == "." { String::new() } else { path };
            PolicyError { errors: vec![FieldError { field, problem }] }
        })?;
        policy.validate(text)?;
        Ok(policy)
    }

    /// Reads the config file: `explicit` (which must exist), else `node.toml` in the data
    /// directory when there is one, else the defaults.
    pub(crate) fn load(explicit: Option<&Path>, data_dir: &Path) -> anyhow::Result<Self> {
        let path = match explicit {
            Some(path) => path.to_owned(),
            None => {
                let path = data_dir.join(CONFIG_FILE);
                if !path.exists() {
                    return Ok(Self::default());
                }
                path
            }
        };
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read the node config {}; check --config", path.display())
        })?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!(e.with_source(&path.display().to_string())))
    }

    fn validate(&self, text: &str) -> Result<(), PolicyError> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, field: &str, problem: String| {
            if !ok {
                let problem = match line_of(text, field) {
                    Some(line) => format!("{problem} (line {line})"),
                    None => problem,
                };
                errors.push(FieldError { field: field.to_owned(), problem });
            }
        };
        check(
            self.allowed_kinds != JobKindSet::EMPTY,
            "allowed_kinds",
            "is empty, so the node would serve no job; list at least one kind, or remove the key \
             to allow every kind"
                .to_owned(),
        );
        check(
            (1..=MAX_CONCURRENT_JOBS_MAX).contains(&self.max_concurrent_jobs),
            "max_concurrent_jobs",
            format!("must be between 1 and {MAX_CONCURRENT_JOBS_MAX}"),
        );
        check(self.max_cpu_cores != Some(0), "max_cpu_cores", "must be at least 1".to_owned());
        check(self.max_memory_mb != Some(0), "max_memory_mb", "must be at least 1".to_owned());
        check(self.max_timeout_s != Some(0), "max_timeout_s", "must be at least 1".to_owned());
        check(
            self.grace_period_s <= GRACE_PERIOD_S_MAX,
            "grace_period_s",
            format!("must be at most {GRACE_PERIOD_S_MAX} (one hour)"),
        );
        let peers =
            aimatrix_protocol::mesh::NODE_PEERS_MIN..=aimatrix_protocol::mesh::NODE_PEERS_MAX;
        check(
            peers.contains(&self.node_peers),
            "node_peers",
            format!("must be between {} and {}", peers.start(), peers.end()),
        );
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PolicyError { errors })
        }
    }

    /// The profile to advertise for the `detected` hardware under this policy.
    ///
    /// Docker (and so docker-gpu) is removed when the policy turns it off; only the
    /// `max_gpus` GPUs with the most VRAM are kept; the allowed kinds are narrowed to those the
    /// remaining hardware and sandboxes can serve; caps, reward floor and job slots go into
    /// the profile's [`NodePolicy`]. Load is left to the core.
    pub(crate) fn apply(&self, detected: CapabilityProfile) -> CapabilityProfile {
        let mut profile = detected;
        profile.runtimes.docker &= self.docker;
        if let Some(max) = self.max_gpus {
            keep_largest_gpus(&mut profile, max as usize);
        }
        profile.runtimes.docker_gpu &= profile.runtimes.docker && !profile.gpus.is_empty();
        let servable = servable_kinds(&profile);
        let defaults = NodePolicy::default();
        profile.policy = NodePolicy {
            allowed_kinds: self.allowed_kinds.iter().filter(|k| servable.contains(*k)).collect(),
            reward_floor: self.min_reward,
            max_memory_mb: self.max_memory_mb.unwrap_or(defaults.max_memory_mb),
            max_cpu_cores: self.max_cpu_cores.unwrap_or(defaults.max_cpu_cores),
            max_timeout_s: self.max_timeout_s.unwrap_or(defaults.max_timeout_s),
            max_concurrent_jobs: self.max_concurrent_jobs,
            docker_enabled: self.docker,
        };
        profile
    }

    /// The core's config: this policy's accept mode, trusting only `relay`.
    pub(crate) fn node_config(&self, relays: Vec<NodeId>) -> NodeConfig {
        NodeConfig {
            accept: self.accept,
            trusted_relays: relays,
            pin_relays: self.pin_relays,
            ..NodeConfig::default()
        }
    }

    /// The relays to join: `--relay` flags when given, else `relay` and `relays` here.
    pub(crate) fn relays_to_join(&self, flags: &[Multiaddr]) -> Vec<Multiaddr> {
        if !flags.is_empty() {
            return flags.to_vec();
        }
        self.relay.iter().chain(&self.relays).cloned().collect()
    }

    /// How long a shutdown waits for running jobs.
    pub(crate) fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_s)
    }
}

/// Keeps the `max` GPUs with the most VRAM, in their detected order (device indices stay
/// meaningful to the sandbox).
fn keep_largest_gpus(profile: &mut CapabilityProfile, max: usize) {
    if profile.gpus.len() <= max {
        return;
    }
    let mut by_vram: Vec<usize> = (0..profile.gpus.len()).collect();
    // Stable: of equal GPUs, the first detected are kept.
    by_vram.sort_by_key(|i| std::cmp::Reverse(profile.gpus[*i].vram_bytes));
    let mut keep = vec![false; profile.gpus.len()];
    for i in by_vram.into_iter().take(max) {
        keep[i] = true;
    }
    let mut index = 0;
    profile.gpus.retain(|_| {
        index += 1;
        keep[index - 1]
    });
}

/// The job kinds a profile's hardware and sandboxes can run; the rule of
/// `hardware::advice::kind_support`, on the profile instead of the detection: every kind any
/// sandbox runs, except those no node runs yet (`serving`, see `advice::NOT_OFFERED`).
pub(crate) fn servable_kinds(profile: &CapabilityProfile) -> JobKindSet {
    let any_sandbox = profile.runtimes.wasm || profile.has_runtime(Runtime::Docker);
    JobKind::ALL.into_iter().filter(|k| any_sandbox && advice::not_offered(*k).is_none()).collect()
}

/// The 1-based line where top-level `key` is set in `text`, if it is.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            line.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// `--accept` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum AcceptFlag {
    /// Claim every matching offer while job slots are free.
    Auto,
    /// List offers; claim one only on `aimatrix-node compute accept`.
    Manual,
}

impl From<AcceptFlag> for AcceptMode {
    fn from(flag: AcceptFlag) -> Self {
        match flag {
            AcceptFlag::Auto => Self::Auto,
            AcceptFlag::Manual => Self::Manual,
        }
    }
}

/// The policy flags of `join`: the config file and the accept mode that overrides it.
#[derive(Clone, Debug, Args)]
pub(crate) struct PolicyArgs {
    /// The node's config file (policy, caps, addresses); default: `node.toml` in the data
    /// directory when it exists. See docs/node.md.
    #[arg(long = "config", value_name = "FILE", env = "AIMATRIX_NODE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Claim matching offers by itself (auto) or only on `compute accept` (manual); overrides
    /// the config file's `accept`.
    #[arg(long, value_enum, value_name = "MODE")]
    pub(crate) accept: Option<AcceptFlag>,
}

impl PolicyArgs {
    /// The config file's policy with the command-line overrides applied.
    pub(crate) fn load(&self, data_dir: &Path) -> anyhow::Result<Policy> {
        let mut policy = Policy::load(self.config.as_deref(), data_dir)?;
        if let Some(accept) = self.accept {
            policy.accept = accept.into();
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aimatrix_protocol::capability::{GpuInfo, GpuVendor, GIB};
    use aimatrix_protocol::matching::{self, Mismatch};
    use aimatrix_protocol::testkit;

    const EXAMPLE: &str = include_str!("../../examples/node.toml");

    fn gpu(name: &str, vram_gb: u64) -> GpuInfo {
        GpuInfo {
            vendor: GpuVendor::Nvidia,
            name: name.to_owned(),
            vram_bytes: vram_gb * GIB,
            compute_capability: Some((8, 6)),
            driver: None,
        }
    }

    #[test]
    fn the_documented_example_parses() {
        let policy = Policy::parse(EXAMPLE).unwrap();
        assert_eq!(policy.accept, AcceptMode::Manual);
        assert!(!policy.allowed_kinds.contains(JobKind::Serving));
        assert!(policy.allowed_kinds.contains(JobKind::Batch));
        assert_eq!(policy.max_cpu_cores, Some(4));
        assert_eq!(policy.min_reward, 5);
        assert_eq!(policy.max_concurrent_jobs, 2);
        assert!(!policy.docker);
        assert_eq!(policy.grace_period(), Duration::from_secs(60));
        assert_eq!(policy.listen.len(), 1);
        assert_eq!(policy.api, Some("127.0.0.1:7781".parse().unwrap()));
    }

    #[test]
    fn an_empty_file_is_the_default() {
        assert_eq!(Policy::parse("").unwrap(), Policy::default());
    }

    #[test]
    fn type_errors_name_the_field_and_line() {
        let err = Policy::parse("accept = \"auto\"\nmax_gpus = \"two\"\n").unwrap_err();
        let shown = err.with_source("node.toml");
        assert!(shown.starts_with("node.toml: max_gpus: invalid type: string \"two\""), "{shown}");
        assert!(shown.ends_with("(line 2)"), "{shown}");
    }

    #[test]
    fn unknown_keys_kinds_and_modes_are_refused() {
        let err = Policy::parse("\n\nmin_rewrd = 3\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `min_rewrd`"), "{err}");
        assert!(err.contains("(line 3)"), "{err}");
        let err = Policy::parse("allowed_kinds = [\"batch\", \"mining\"]").unwrap_err();
        let shown = err.to_string();
        assert!(shown.starts_with("allowed_kinds"), "{shown}");
        assert!(shown.contains("unknown variant `mining`"), "{shown}");
        let err = Policy::parse("accept = \"sometimes\"").unwrap_err().to_string();
        assert!(err.starts_with("accept: unknown variant `sometimes`"), "{err}");
        let err = Policy::parse("relay = \"not an address\"").unwrap_err().to_string();
        assert!(err.starts_with("relay: "), "{err}");
    }

    #[test]
    fn value_errors_name_the_field_and_line_and_come_all_at_once() {
        let text = "docker = false\nmax_concurrent_jobs = 0\nallowed_kinds = []\nnode_peers = 2\n";
        let err = Policy::parse(text).unwrap_err();
        let shown: Vec<String> = err.errors.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 3, "{shown:?}");
        assert!(shown[0].starts_with("allowed_kinds: is empty"), "{shown:?}");
        assert!(shown[0].ends_with("(line 3)"), "{shown:?}");
        assert!(shown[1].starts_with("max_concurrent_jobs: must be between 1"), "{shown:?}");
        assert!(shown[1].ends_with("(line 2)"), "{shown:?}");
        assert_eq!(shown[2], "node_peers: must be between 4 and 64 (line 4)", "{shown:?}");
        assert_eq!(Policy::parse("node_peers = 20\n").unwrap().node_peers, 20);
    }

    #[test]
    fn apply_caps_resources_and_sets_floor_and_slots() {
        let policy = Policy {
            max_cpu_cores: Some(2),
            max_memory_mb: Some(1024),
            min_reward: 7,
            max_concurrent_jobs: 3,
            max_timeout_s: Some(600),
            ..Policy::default()
        };
        let detected = testkit::profile();
        let p = policy.apply(detected.clone());
        assert_eq!(p.cpu, detected.cpu, "hardware stays as detected");
        assert_eq!(p.policy.max_cpu_cores, 2);
        assert_eq!(p.policy.max_memory_mb, 1024);
        assert_eq!(p.policy.reward_floor, 7);
        assert_eq!(p.policy.max_concurrent_jobs, 3);
        assert_eq!(p.policy.max_timeout_s, 600);

        // The protocol's matching applies the caps.
        let mut spec = testkit::batch_spec(5);
        spec.requirements.cpu_cores = 3;
        spec.requirements.memory_mb = 2048;
        let why = matching::evaluate(&spec, &p).unwrap_err();
        assert_eq!(
            why,
            [
                Mismatch::RewardBelowFloor { reward: 5, floor: 7 },
                Mismatch::CpuCoresOverCap { need: 3, cap: 2 },
                Mismatch::MemoryOverCap { need_mb: 2048, cap_mb: 1024 },
            ]
        );
        assert!(matching::evaluate(&testkit::batch_spec(7), &p).is_ok());
    }

    #[test]
    fn docker_off_removes_docker() {
        let mut detected = testkit::gpu_profile(24);
        detected.memory.total_bytes = 64 * GIB;
        let on = Policy::default().apply(detected.clone());
        assert!(on.has_runtime(Runtime::Docker));
        assert!(on.runtimes.docker_gpu);

        let off = Policy { docker: false, ..Policy::default() }.apply(detected);
        assert!(!off.runtimes.docker && !off.runtimes.docker_gpu);
        assert!(!off.policy.docker_enabled);
        assert!(off.runtimes.wasm);
        assert!(off.policy.allowed_kinds.contains(JobKind::Batch));
        let why = matching::evaluate(&testkit::docker_gpu_spec(10), &off).unwrap_err();
        assert!(why.contains(&Mismatch::RuntimeUnavailable { runtime: Runtime::Docker }));
        assert!(why.contains(&Mismatch::NoGpuRuntime));
    }

    #[test]
    fn an_absent_engine_keeps_the_owners_docker_choice() {
        let mut detected = testkit::profile();
        detected.runtimes.docker = false;
        detected.memory.total_bytes = 64 * GIB;
        let p = Policy::default().apply(detected);
        assert!(p.policy.docker_enabled, "the owner's choice is kept for when an engine appears");
        assert_eq!(p.policy.allowed_kinds.iter().count(), 4);
    }

    /// A node runs a serving job as a batch job with no network, which serves nothing: it never
    /// advertises the kind, even when the owner allows it and the hardware could hold a model.
    #[test]
    fn serving_is_never_advertised() {
        let mut big = testkit::gpu_profile(80);
        big.memory.total_bytes = 512 * GIB;
        assert!(big.runtimes.docker && big.runtimes.docker_gpu);
        assert!(!servable_kinds(&big).contains(JobKind::Serving));
        let p = Policy::default().apply(big.clone());
        assert_eq!(
            p.policy.allowed_kinds.iter().collect::<Vec<_>>(),
            [JobKind::Training, JobKind::Batch, JobKind::DataProcessing, JobKind::AgentTesting]
        );
        let only_serving =
            Policy { allowed_kinds: [JobKind::Serving].into_iter().collect(), ..Policy::default() };
        assert_eq!(only_serving.apply(big).policy.allowed_kinds, JobKindSet::EMPTY);
        let mut spec = testkit::docker_gpu_spec(10);
        spec.kind = JobKind::Serving;
        let why = matching::evaluate(&spec, &p).unwrap_err();
        assert!(why.contains(&Mismatch::KindNotAllowed { kind: JobKind::Serving }), "{why:?}");
    }

    #[test]
    fn max_gpus_keeps_the_largest_in_detected_order() {
        let mut detected = testkit::profile();
        detected.runtimes.docker_gpu = true;
        detected.gpus = vec![gpu("a", 8), gpu("b", 24), gpu("c", 16), gpu("d", 24)];
        let p = Policy { max_gpus: Some(2), ..Policy::default() }.apply(detected.clone());
        let names: Vec<&str> = p.gpus.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["b", "d"]);
        assert!(p.runtimes.docker_gpu);

        let none = Policy { max_gpus: Some(0), ..Policy::default() }.apply(detected);
        assert!(none.gpus.is_empty());
        assert!(!none.runtimes.docker_gpu, "no GPU left to run GPU containers on");
    }

    #[test]
    fn disallowed_kinds_stay_out() {
        let policy = Policy {
            allowed_kinds: [JobKind::Training].into_iter().collect(),
            ..Policy::default()
        };
        let p = policy.apply(testkit::profile());
        assert_eq!(p.policy.allowed_kinds.iter().collect::<Vec<_>>(), [JobKind::Training]);
        let why = matching::evaluate(&testkit::batch_spec(5), &p).unwrap_err();
        assert_eq!(why, [Mismatch::KindNotAllowed { kind: JobKind::Batch }]);
    }

    #[test]
    fn node_config_trusts_only_the_relay_and_takes_the_mode() {
        let relay = testkit::keypair(9).public();
        let cfg =
            Policy { accept: AcceptMode::Manual, ..Policy::default() }.node_config(vec![relay]);
        assert_eq!(cfg.accept, AcceptMode::Manual);
        assert_eq!(cfg.trusted_relays, [relay]);
        assert!(!cfg.pin_relays);
        let pinned = Policy { pin_relays: true, ..Policy::default() }.node_config(vec![relay]);
        assert!(pinned.pin_relays);
        assert_eq!(cfg.claim_timeout_ms, NodeConfig::default().claim_timeout_ms);
    }

    #[test]
    fn the_accept_flag_overrides_the_file_and_a_missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "accept = \"auto\"\nmin_reward = 3\n")
            .unwrap();
        let args = PolicyArgs { config: None, accept: Some(AcceptFlag::Manual) };
        let policy = args.load(dir.path()).unwrap();
        assert_eq!((policy.accept, policy.min_reward), (AcceptMode::Manual, 3));

        let missing = dir.path().join("nope.toml");
        let args = PolicyArgs { config: Some(missing), accept: None };
        let err = format!("{:#}", args.load(dir.path()).unwrap_err());
        assert!(err.contains("nope.toml") && err.contains("--config"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        let args = PolicyArgs { config: None, accept: None };
        assert_eq!(args.load(empty.path()).unwrap(), Policy::default());
    }
}
