//! Writes the seed inputs for the fuzz targets into `fuzz/seeds/<target>/`:
//! one sealed envelope per message kind for `envelope_decode`, every ```toml block of
//! `docs/job-spec.md` for `job_spec_toml`, one frame per direct request and response variant
//! for `direct_decode`, and one update per codec (for the standard digits model and for a
//! 10-value update) for `update_decompress`. Deterministic; rerun after a wire, schema or update
//! format change:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example make_seeds
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use aimatrix_mlp::{Codec, Model, HIDDEN, INPUTS, OUTPUTS};
use aimatrix_protocol::direct::{self, DirectRequest, DirectResponse};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::messages::{
    self, Advert, Cancel, Claim, DenyReason, JobId, JobResult, Lease, LeaseDenied, Message, Offer,
    Outcome, OutputDigest, Progress, Receipt, RoundLease, Usage, Verdict,
};
use aimatrix_protocol::testkit;

const NOW_MS: u64 = 1_700_000_000_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = fuzz_dir.join("seeds");

    let envelope_dir = clean_dir(seeds.join("envelope_decode"))?;
    let key = testkit::keypair(7);
    for (i, message) in sample_messages().iter().enumerate() {
        let bytes = messages::seal(&key, message, i as u64 + 1, NOW_MS, 60_000)?;
        fs::write(envelope_dir.join(format!("{}.bin", message.domain().tag())), bytes)?;
    }

    let toml_dir = clean_dir(seeds.join("job_spec_toml"))?;
    let doc = fs::read_to_string(fuzz_dir.join("../docs/job-spec.md"))?;
    for (i, block) in toml_blocks(&doc).iter().enumerate() {
        fs::write(toml_dir.join(format!("job-spec-md-{i:02}.toml")), block)?;
    }
    let direct_dir = clean_dir(seeds.join("direct_decode"))?;
    let job_id = JobId::from_digest(&Digest::of(b"seed job"));
    let claim = messages::seal(&key, &Message::Claim(Claim { job_id }), 100, NOW_MS, 60_000)?;
    let requests = [
        ("message", DirectRequest::Message(claim)),
        ("get-blob", DirectRequest::GetBlob(Digest::of(b"module"))),
        ("put-blob", DirectRequest::PutBlob { job_id, lease: 1, bytes: b"output\n".to_vec() }),
    ];
    for (name, request) in &requests {
        fs::write(
            direct_dir.join(format!("request-{name}.bin")),
            direct::encode_request(request)?,
        )?;
    }
    let responses = [
        ("accepted", DirectResponse::Accepted),
        ("refused", DirectResponse::refused("no active lease on this job")),
        ("blob", DirectResponse::Blob(b"\0asm\x01\0\0\0".to_vec())),
        ("not-found", DirectResponse::NotFound),
    ];
    for (name, response) in &responses {
        let frame = direct::encode_response(response)?;
        fs::write(direct_dir.join(format!("response-{name}.bin")), frame)?;
    }

    let update_dir = clean_dir(seeds.join("update_decompress"))?;
    let standard = Model::param_count(INPUTS, HIDDEN, OUTPUTS);
    for len in [standard, 10] {
        let delta = sample_delta(len);
        for codec in [Codec::None, Codec::Fp16, Codec::int8(), Codec::topk()] {
            let name = format!("{}-{len}.bin", codec.name());
            fs::write(update_dir.join(name), aimatrix_mlp::compress(codec, &delta))?;
        }
    }
    println!("seeds written under {}", seeds.display());
    Ok(())
}

fn clean_dir(dir: PathBuf) -> std::io::Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The fenced ```toml blocks of a markdown file.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```toml") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// A delta of `len` small values of both signs and a few zeros, like a round's update.
fn sample_delta(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| match i % 7 {
            0 => 0.0,
            k => (k as f32 - 3.5) * 0.01 * (1.0 + (i % 13) as f32),
        })
        .collect()
}

/// One message of every kind, with the optional parts filled in so the seeds reach them.
fn sample_messages() -> Vec<Message> {
    let job_id = JobId::from_digest(&Digest::of(b"seed job"));
    let node = testkit::keypair(8).public();
    let output = OutputDigest {
        name: "out/result.json".into(),
        digest: Digest::of(b"result"),
        size_bytes: 42,
    };
    vec![
        Message::Advert(Advert { seq: 3, profile: testkit::gpu_profile(24) }),
        Message::Offer(Offer {
            job_id,
            spec: testkit::batch_spec(10),
            deadline_ms: NOW_MS + 600_000,
            open_slots: 2,
            preferred: vec![node],
        }),
        Message::Claim(Claim { job_id }),
        Message::Lease(Lease {
            job_id,
            lease: 1,
            node,
            deadline_ms: NOW_MS + 300_000,
            spec: testkit::docker_gpu_spec(50),
            round: Some(RoundLease {
                round: 2,
                model: Digest::of(b"model"),
                chunk: 1,
                chunks: 4,
                data: Digest::of(b"chunk 1"),
                verify: false,
            }),
        }),
        Message::LeaseDenied(LeaseDenied {
            job_id,
            reason: DenyReason::Mismatch(vec![aimatrix_protocol::matching::Mismatch::NoGpuRuntime]),
            taken: vec![job_id],
        }),
        Message::Progress(Progress { job_id, lease: 1, percent: 50 }),
        Message::Result(JobResult {
            job_id,
            lease: 1,
            outcome: Outcome::succeeded(vec![output]),
            usage: Usage {
                wall_ms: 1200,
                cpu_ms: 900,
                peak_memory_bytes: 1 << 24,
                fuel_consumed: 7,
            },
        }),
        Message::Receipt(Receipt {
            job_id,
            lease: 1,
            node,
            round: Some(2),
            verdict: Verdict::Paid { amount: 9 },
        }),
        Message::Cancel(Cancel { job_id, lease: 1, reason: "deadline passed".into() }),
    ]
}
