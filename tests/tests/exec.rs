//! `aimatrix-node exec` end to end: the real binary runs jobs in the wasm sandbox.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::Path;
use std::process::{Command, Output};

use aimatrix_tests::binary;

fn exec(args: &[&str], data_dir: &Path) -> Output {
    Command::new(binary("aimatrix-node"))
        .arg("exec")
        .args(args)
        .env("AIMATRIX_DATA_DIR", data_dir)
        .output()
        .unwrap()
}

fn json(output: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn write_job(dir: &Path, body: &str) -> String {
    let path = dir.join("job.toml");
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[test]
fn the_batch_workload_computes_known_statistics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("batch-stats.wasm"), aimatrix_workloads::BATCH_STATS_WASM)
        .unwrap();
    std::fs::write(dir.path().join("one.txt"), "A b a.\nthe end\n").unwrap();
    std::fs::write(dir.path().join("two.txt"), "B, c; b!").unwrap();
    let job = write_job(
        dir.path(),
        r#"kind = "batch"
reward = 1
[workload]
runtime = "wasm"
module = "batch-stats.wasm"
args = ["--top", "2"]
[[inputs]]
name = "one.txt"
source = "one.txt"
[[inputs]]
name = "two.txt"
source = "two.txt"
"#,
    );
    let out = dir.path().join("out");
    let output = exec(&[&job, "--json", "--out", out.to_str().unwrap()], dir.path());
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let result = json(&output);
    assert_eq!(result["status"], "succeeded");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["stdout"], "2 documents, 8 words, 5 unique\n");
    assert_eq!(result["outputs"][0]["name"], "report.json");
    assert!(
        result["usage"]["wall_ms"].is_u64()
            && result["usage"]["peak_memory_bytes"].as_u64().unwrap() > 0
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let total = &report["totals"];
    assert_eq!(total["words"], 8);
    assert_eq!(total["unique_words"], 5);
    assert_eq!(total["lines"], 3);
    // a: 2, b: 3, c: 1, end: 1, the: 1 → top 2 is b, a.
    assert_eq!(total["top_words"][0], serde_json::json!({"word": "b", "count": 3}));
    assert_eq!(total["top_words"][1], serde_json::json!({"word": "a", "count": 2}));
    assert_eq!(report["documents"][1]["name"], "two.txt");
    assert_eq!(report["documents"][1]["words"], 3);
}

#[test]
fn the_training_step_is_deterministic_and_writes_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("train-step.wasm");
    std::fs::write(&module, aimatrix_workloads::TRAIN_STEP_WASM).unwrap();
    let model = aimatrix_mlp::Model::init(3);
    let data = aimatrix_mlp::Dataset {
        features: 64,
        samples: (0..64 * 40).map(|i| ((i * 7919) % 17) as f32 / 16.0).collect(),
        labels: (0..40).map(|i| (i % 10) as u8).collect(),
    };
    std::fs::write(dir.path().join("model.bin"), model.encode()).unwrap();
    std::fs::write(dir.path().join("chunk.bin"), data.encode()).unwrap();
    let mut digests = Vec::new();
    for run in 0..2 {
        let out = dir.path().join(format!("out{run}"));
        let output = exec(
            &[
                module.to_str().unwrap(),
                "--input",
                dir.path().join("model.bin").to_str().unwrap(),
                "--input",
                dir.path().join("chunk.bin").to_str().unwrap(),
                "--deterministic",
                "--fuel",
                "10000000000",
                "--json",
                "--out",
                out.to_str().unwrap(),
                "--",
                "--epochs",
                "2",
                "--batch",
                "8",
            ],
            dir.path(),
        );
        assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
        let result = json(&output);
        assert!(result["usage"]["fuel"].as_u64().unwrap() > 0);
        let delta =
            aimatrix_mlp::decode_delta(&std::fs::read(out.join("delta.bin")).unwrap()).unwrap();
        assert_eq!(delta.len(), model.params.len());
        assert!(delta.iter().any(|d| *d != 0.0), "training moved the parameters");
        let outputs = result["outputs"].as_array().unwrap();
        digests.push(outputs.iter().find(|o| o["name"] == "delta.bin").unwrap()["sha256"].clone());
    }
    assert_eq!(digests[0], digests[1], "a re-run gives a bitwise-identical delta");
}

#[test]
fn a_job_that_runs_and_fails_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("exit3.wasm");
    let wasm = wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1) (func (export "_start") (call $exit (i32.const 3))))"#,
    )
    .unwrap();
    std::fs::write(&module, wasm).unwrap();
    let output = exec(&[module.to_str().unwrap(), "--json"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let result = json(&output);
    assert_eq!(result["status"], "failed");
    assert_eq!(result["exit_code"], 3);

    let spin = dir.path().join("spin.wasm");
    std::fs::write(
        &spin,
        wat::parse_str(
            r#"(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))"#,
        )
        .unwrap(),
    )
    .unwrap();
    let output = exec(&[spin.to_str().unwrap(), "--timeout", "1", "--json"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(json(&output)["status"], "timed_out");
    let output = exec(&[spin.to_str().unwrap(), "--fuel", "1000000", "--json"], dir.path());
    assert_eq!(json(&output)["status"], "out_of_fuel");
}

#[test]
fn a_job_that_cannot_run_exits_2_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("script.wasm");
    std::fs::write(&not_wasm, "#!/bin/sh\necho hi\n").unwrap();
    let output = exec(&[not_wasm.to_str().unwrap()], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a WebAssembly binary"));

    let job = write_job(
        dir.path(),
        "kind = \"batch\"\nreward = 1\n[workload]\nruntime = \"wasm\"\nmodule = \"m.wasm\"\n[requirements]\nvram_gb = \"lots\"\n",
    );
    let output = exec(&[&job], dir.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("job.toml: requirements.vram_gb: invalid type: string \"lots\""),
        "{stderr}"
    );

    let job = write_job(
        dir.path(),
        "kind = \"batch\"\nreward = 1\n[workload]\nruntime = \"wasm\"\nmodule = \"missing.wasm\"\n",
    );
    let output = exec(&[&job], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.wasm"));

    let output = exec(&[dir.path().join("nope.wasm").to_str().unwrap()], dir.path());
    assert_eq!(output.status.code(), Some(2));
}
