//! `aimatrix-node detect` end to end: the real binary's report agrees with what Linux says
//! directly (`/proc/cpuinfo`, `/proc/meminfo`, cgroup limits, statvfs of the data dir).

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use aimatrix_protocol::capability::CapabilityProfile;
use aimatrix_tests::binary;

fn detect(args: &[&str], data_dir: &Path) -> Output {
    let output = Command::new(binary("aimatrix-node"))
        .arg("detect")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    output
}

fn detect_json(data_dir: &Path) -> serde_json::Value {
    let output = detect(&["--json"], data_dir);
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "--json prints one object on one line: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// What /proc/cpuinfo says: (first model name, processors, physical cores).
fn cpuinfo() -> (Option<String>, u64, u64) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let mut model = None;
    let mut processors = 0;
    let mut cores = BTreeSet::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let field = |name: &str| {
            block.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_owned())
            })
        };
        if field("processor").is_none() {
            continue;
        }
        processors += 1;
        if model.is_none() {
            model = field("model name").filter(|m| !m.is_empty());
        }
        if let (Some(physical), Some(core)) = (field("physical id"), field("core id")) {
            cores.insert((physical, core));
        }
    }
    // Without topology fields (some ARM boards) every processor is a core.
    let physical_cores = if cores.is_empty() { processors } else { cores.len() as u64 };
    (model, processors, physical_cores)
}

fn mem_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// The container's memory limit, when one is set below the machine's memory (cgroup v1 first,
/// then v2, at the cgroup root the container sees).
fn cgroup_limit_bytes(mem_total: u64) -> Option<u64> {
    let read =
        |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    [read("/sys/fs/cgroup/memory/memory.limit_in_bytes"), read("/sys/fs/cgroup/memory.max")]
        .into_iter()
        .flatten()
        .find(|limit| *limit < mem_total)
}

/// Free bytes for unprivileged users on `dir`'s filesystem, from statvfs (through coreutils'
/// `stat -f`: `%a` is f_bavail, `%S` is f_frsize).
fn statvfs_free_bytes(dir: &Path) -> u64 {
    let output = Command::new("stat").args(["-f", "--format=%a %S"]).arg(dir).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().unwrap());
    fields.next().unwrap() * fields.next().unwrap()
}

fn within_percent(actual: u64, expected: u64, percent: u64) -> bool {
    actual.abs_diff(expected) * 100 <= expected * percent
}

#[test]
fn detect_json_agrees_with_proc_cgroups_and_statvfs() {
    let dir = tempfile::tempdir().unwrap();
    let report = detect_json(dir.path());

    let (model, processors, physical_cores) = cpuinfo();
    if let Some(model) = model {
        assert_eq!(report["cpu"]["model"], model.as_str());
    }
    assert_eq!(report["cpu"]["threads"], processors);
    assert_eq!(report["cpu"]["physical_cores"], physical_cores);

    let mem_total = mem_total_bytes();
    let total = report["memory"]["total_bytes"].as_u64().unwrap();
    match cgroup_limit_bytes(mem_total) {
        Some(limit) => {
            assert_eq!(total, limit, "a container's limit is the node's memory");
            assert_eq!(report["memory"]["cgroup_limit_bytes"], limit);
        }
        None => {
            assert!(within_percent(total, mem_total, 1), "{total} vs MemTotal {mem_total}");
            assert!(report["memory"]["cgroup_limit_bytes"].is_null());
        }
    }
    let available = report["memory"]["available_bytes"].as_u64().unwrap();
    assert!(available > 0 && available <= total, "available {available} of {total}");

    assert_eq!(report["disk"]["path"], dir.path().display().to_string());
    let free = report["disk"]["free_bytes"].as_u64().unwrap();
    let expected_free = statvfs_free_bytes(dir.path());
    assert!(within_percent(free, expected_free, 1), "{free} vs statvfs {expected_free}");

    let runtimes = &report["runtimes"];
    assert_eq!(runtimes["wasm"]["available"], true);
    let docker = &runtimes["docker"];
    let docker_field = if docker["available"] == true { "version" } else { "reason" };
    assert!(docker[docker_field].as_str().is_some_and(|s| !s.is_empty()), "{docker}");
    if !Path::new("/dev/nvidia0").exists() {
        assert_eq!(report["gpus"], serde_json::json!([]));
        let reason = runtimes["cuda"]["reason"].as_str().unwrap();
        assert!(reason.starts_with("no NVIDIA GPU: "), "{reason}");
        assert_eq!(runtimes["docker_gpu"]["available"], false);
    }

    // wasm runs everywhere, so every node runs the batch kinds and training; no node runs a
    // model server yet, whatever its hardware, so serving is never among them.
    let kinds: Vec<&str> =
        report["job_kinds"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(kinds, ["training", "batch", "data_processing", "agent_testing"]);
    let recommendation = &report["recommendation"];
    let good_for = recommendation["good_for"].as_array().unwrap();
    assert!(!good_for.is_empty());
    for advice in good_for {
        let advice = advice.as_str().unwrap();
        assert!(!advice.contains("serv"), "serving is offered as work for this node: {advice}");
    }
    let not_offered = recommendation["not_offered"].as_array().unwrap();
    assert_eq!(not_offered.len(), 1, "{recommendation}");
    assert_eq!(not_offered[0]["kind"], "serving");
    assert!(not_offered[0]["reason"].as_str().unwrap().contains("model server"), "{not_offered:?}");
    assert!(recommendation.get("cpu").is_none(), "no serving model sizes: {recommendation}");

    // The advertised profile is the detected one.
    let profile: CapabilityProfile = serde_json::from_value(report["profile"].clone()).unwrap();
    assert_eq!(profile.cpu.model, report["cpu"]["model"].as_str().unwrap());
    assert_eq!(u64::from(profile.cpu.threads), processors);
    assert_eq!(profile.memory.total_bytes, total);
    assert_eq!(profile.disk.free_bytes, free);
    assert_eq!(profile.gpus.len(), report["gpus"].as_array().unwrap().len());
    assert!(profile.runtimes.wasm);
    assert_eq!(profile.runtimes.docker, docker["available"] == true);
    assert_eq!(profile.runtimes.docker_gpu, runtimes["docker_gpu"]["available"] == true);
    // ... with the kinds it lists, so a relay never offers it a serving job.
    assert_eq!(report["profile"]["policy"]["allowed_kinds"], report["job_kinds"]);
}

#[test]
fn detect_prints_a_human_summary_with_the_cpu_model() {
    let dir = tempfile::tempdir().unwrap();
    let output = detect(&[], dir.path());
    let text = String::from_utf8(output.stdout).unwrap();
    let (model, _, _) = cpuinfo();
    if let Some(model) = model {
        assert!(text.contains(&model), "{text}");
    }
    for label in ["cpu", "memory", "disk", "gpus", "runtimes", "job kinds", "good for"] {
        assert!(text.lines().any(|l| l.starts_with(label)), "no {label} line:\n{text}");
    }
    assert!(text.contains("wasm: yes"), "{text}");
    let kinds = text.lines().find(|l| l.starts_with("job kinds")).unwrap();
    assert_eq!(kinds, "job kinds   training, batch, data_processing, agent_testing");
    // Serving shows only as not offered, never as work for this node.
    let serving: Vec<&str> = text.lines().filter(|l| l.contains("serving")).collect();
    assert_eq!(serving.len(), 1, "{text}");
    let expected = "not offered serving: aimatrix-node cannot host a model server yet";
    assert!(serving[0].starts_with(expected), "{text}");
}

#[test]
fn an_unusable_data_dir_is_a_reason_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let report = detect_json(&file.join("data"));
    assert_eq!(report["disk"]["free_bytes"], 0);
    let reason = report["disk"]["reason"].as_str().unwrap();
    assert!(reason.contains("cannot create data directory"), "{reason}");
    assert_eq!(report["profile"]["disk"]["free_bytes"], 0);
    assert!(report["cpu"]["threads"].as_u64().unwrap() > 0);
}

#[test]
fn an_unreachable_engine_means_no_docker_runtime_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary("aimatrix-node"))
        .args(["detect", "--json", "--data-dir"])
        .arg(dir.path())
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["runtimes"]["docker"]["available"], false);
    let reason = json["runtimes"]["docker"]["reason"].as_str().unwrap();
    assert!(reason.contains("nonexistent"), "{reason}");
    assert_eq!(json["profile"]["runtimes"]["docker"], false, "the node does not advertise docker");
    assert_eq!(json["runtimes"]["wasm"]["available"], true);
}
