//! Property tests: codec roundtrips, hostile bytes, signature tampering, replay, expiry and
//! matching that reports every reason.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::BTreeMap;

use aimatrix_protocol::capability::{
    CapabilityProfile, CpuInfo, DiskInfo, GpuInfo, GpuVendor, Load, MemoryInfo, NodePolicy,
    Runtimes, GIB, MIB,
};
use aimatrix_protocol::codec;
use aimatrix_protocol::envelope::{Domain, Envelope, Verifier, VerifyConfig, VerifyError};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::job::{ContentRef, Input, JobKind, JobKindSet, JobSpec, Runtime};
use aimatrix_protocol::matching::{evaluate, Mismatch};
use aimatrix_protocol::messages::{
    open, seal, Advert, Cancel, Claim, DenyReason, JobId, JobResult, Lease, LeaseDenied, Message,
    Offer, Outcome, OutputDigest, Progress, Receipt, RejectReason, RoundLease, Usage, Verdict,
};
use aimatrix_protocol::testkit;
use proptest::prelude::*;

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn job_id() -> impl Strategy<Value = JobId> {
    any::<[u8; 16]>().prop_map(JobId)
}

fn node_id() -> impl Strategy<Value = aimatrix_protocol::identity::NodeId> {
    any::<u64>().prop_map(|n| testkit::keypair(n).public())
}

fn kind() -> impl Strategy<Value = JobKind> {
    prop::sample::select(JobKind::ALL.to_vec())
}

fn spec() -> impl Strategy<Value = JobSpec> {
    (
        1u64..1_000_000,
        1u32..=16,
        1u32..=10,
        prop::collection::vec("[a-z0-9 -]{0,12}", 0..4),
        prop::collection::btree_map("[A-Z_]{1,8}", "[ -~]{0,16}", 0..3),
        prop::collection::vec(("[a-z]{1,8}\\.txt", digest(), any::<u32>()), 0..3),
        any::<bool>(),
        0u32..4,
    )
        .prop_map(|(reward, replication, attempts, args, env, inputs, docker, gpus)| {
            let mut spec =
                if docker { testkit::docker_gpu_spec(reward) } else { testkit::batch_spec(reward) };
            spec.replication = replication;
            spec.max_attempts = attempts;
            spec.workload.args = args;
            spec.workload.env = env;
            if docker {
                spec.requirements.gpus = gpus;
            }
            let mut seen = std::collections::BTreeSet::new();
            spec.inputs = inputs
                .into_iter()
                .filter(|(name, _, _)| seen.insert(name.clone()))
                .map(|(name, d, size)| Input {
                    name,
                    source: ContentRef::Digest(d),
                    size_bytes: u64::from(size),
                })
                .collect();
            spec
        })
}

fn profile() -> impl Strategy<Value = CapabilityProfile> {
    (
        (1u32..128, 1u64..512, 0u64..2048),
        prop::collection::vec((0u64..96, any::<bool>()), 0..4),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        (prop::collection::vec(kind(), 0..5), 0u64..50, 1u64..1_000_000, 1u32..128, 1u64..100_000),
        (1u32..4, 0u32..5),
    )
        .prop_map(|((cores, mem_gb, disk_gb), gpus, rt, pol, load)| CapabilityProfile {
            cpu: CpuInfo { model: "cpu".into(), physical_cores: cores, threads: cores * 2 },
            memory: MemoryInfo { total_bytes: mem_gb * GIB, available_bytes: mem_gb * GIB / 2 },
            disk: DiskInfo { free_bytes: disk_gb * GIB },
            gpus: gpus
                .into_iter()
                .map(|(vram, nv)| GpuInfo {
                    vendor: if nv { GpuVendor::Nvidia } else { GpuVendor::Amd },
                    name: "gpu".into(),
                    vram_bytes: vram * GIB,
                    compute_capability: nv.then_some((8, 0)),
                    driver: None,
                })
                .collect(),
            runtimes: Runtimes { wasm: rt.0, docker: rt.1, docker_gpu: rt.2 },
            policy: NodePolicy {
                allowed_kinds: pol.0.into_iter().collect::<JobKindSet>(),
                reward_floor: pol.1,
                max_memory_mb: pol.2,
                max_cpu_cores: pol.3,
                max_timeout_s: pol.4,
                max_concurrent_jobs: load.0,
                docker_enabled: rt.3,
            },
            load: Load { running_jobs: load.1, cpu_percent: 0 },
        })
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        prop::collection::vec(("[a-z/]{1,12}", digest(), any::<u64>()), 0..4).prop_map(|o| {
            Outcome::succeeded(
                o.into_iter()
                    .map(|(name, digest, size_bytes)| OutputDigest { name, digest, size_bytes })
                    .collect(),
            )
        }),
        ".{0,40}".prop_map(|reason| Outcome::Failed { reason }),
        ".{0,40}".prop_map(|reason| Outcome::HandedBack { reason }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), profile())
            .prop_map(|(seq, profile)| Message::Advert(Advert { seq, profile })),
        (job_id(), spec(), any::<u64>(), any::<u32>(), prop::collection::vec(node_id(), 0..4))
            .prop_map(|(job_id, spec, deadline_ms, open_slots, preferred)| {
                Message::Offer(Offer { job_id, spec, deadline_ms, open_slots, preferred })
            }),
        job_id().prop_map(|job_id| Message::Claim(Claim { job_id })),
        (
            job_id(),
            any::<u32>(),
            node_id(),
            any::<u64>(),
            spec(),
            prop::option::of((any::<u32>(), digest(), any::<u32>()))
        )
            .prop_map(|(job_id, lease, node, deadline_ms, spec, round)| {
                let round = round.map(|(round, model, chunk)| RoundLease {
                    round,
                    model,
                    chunk,
                    chunks: chunk.saturating_add(1),
                    data: model,
                    verify: chunk % 2 == 0,
                });
                Message::Lease(Lease { job_id, lease, node, deadline_ms, spec, round })
            }),
        (
            job_id(),
            prop_oneof![
                Just(DenyReason::UnknownJob),
                Just(DenyReason::NotOpen),
                Just(DenyReason::NoOpenSlot),
                Just(DenyReason::Excluded),
                (1u32..99, 0u32..99).prop_map(|(need, have)| DenyReason::Mismatch(vec![
                    Mismatch::CpuCores { need, have }
                ])),
            ]
        )
            .prop_map(|(job_id, reason)| Message::LeaseDenied(LeaseDenied {
                job_id,
                taken: vec![job_id],
                reason
            })),
        (job_id(), any::<u32>(), 0u8..=100).prop_map(|(job_id, lease, percent)| Message::Progress(
            Progress { job_id, lease, percent }
        )),
        (job_id(), any::<u32>(), outcome(), any::<[u64; 4]>()).prop_map(
            |(job_id, lease, outcome, u)| {
                let usage = Usage {
                    wall_ms: u[0],
                    cpu_ms: u[1],
                    peak_memory_bytes: u[2],
                    fuel_consumed: u[3],
                };
                Message::Result(JobResult { job_id, lease, outcome, usage })
            }
        ),
        (
            job_id(),
            any::<u32>(),
            node_id(),
            prop::option::of(any::<u32>()),
            prop_oneof![
                any::<u64>().prop_map(|amount| Verdict::Paid { amount }),
                ".{0,30}".prop_map(|reason| Verdict::Rejected { reason }),
            ]
        )
            .prop_map(|(job_id, lease, node, round, verdict)| Message::Receipt(Receipt {
                job_id,
                lease,
                node,
                round,
                verdict
            })),
        (job_id(), any::<u32>(), ".{0,30}")
            .prop_map(|(job_id, lease, reason)| Message::Cancel(Cancel { job_id, lease, reason })),
    ]
}

const NOW: u64 = 1_700_000_000_000;

fn verifier() -> Verifier {
    Verifier::new(VerifyConfig { skew_tolerance_ms: 5_000, ..VerifyConfig::default() })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_message_roundtrips_through_a_signed_envelope(msg in message(), nonce in any::<u64>()) {
        let key = testkit::keypair(9);
        let bytes = seal(&key, &msg, nonce, NOW, 60_000).unwrap();
        let (signer, back) = open(&mut verifier(), NOW, &bytes, &Domain::ALL).unwrap();
        prop_assert_eq!(signer, key.public());
        prop_assert_eq!(back, msg.clone());
        // The payload alone roundtrips too.
        let payload = msg.encode_payload().unwrap();
        prop_assert_eq!(Message::decode_payload(msg.domain(), &payload).unwrap(), msg);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = codec::decode::<Envelope>(&bytes);
        let _ = open(&mut verifier(), NOW, &bytes, &Domain::ALL);
        for domain in Domain::ALL {
            let _ = Message::decode_payload(domain, &bytes);
        }
        // With a valid version byte, bincode's own parser gets the bytes.
        let mut versioned = vec![codec::FORMAT_VERSION];
        versioned.extend_from_slice(&bytes);
        let _ = codec::decode::<Envelope>(&versioned);
        for domain in Domain::ALL {
            let _ = Message::decode_payload(domain, &versioned);
        }
    }

    #[test]
    fn truncated_envelopes_are_errors(msg in message(), cut in any::<prop::sample::Index>()) {
        let bytes = seal(&testkit::keypair(1), &msg, 1, NOW, 60_000).unwrap();
        let len = cut.index(bytes.len());
        prop_assert!(open(&mut verifier(), NOW, &bytes[..len], &Domain::ALL).is_err());
    }

    #[test]
    fn any_single_bit_flip_fails_verification(msg in message(), bit in any::<prop::sample::Index>()) {
        let bytes = seal(&testkit::keypair(2), &msg, 77, NOW, 60_000).unwrap();
        let mut flipped = bytes.clone();
        let bit = bit.index(bytes.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(open(&mut verifier(), NOW, &flipped, &Domain::ALL).is_err(), "bit {} of {}", bit, bytes.len() * 8);
    }

    #[test]
    fn any_field_change_of_a_signed_envelope_fails_the_signature(
        msg in message(),
        field in 0usize..6,
        bit in any::<prop::sample::Index>(),
    ) {
        let bytes = seal(&testkit::keypair(3), &msg, 5, NOW, 60_000).unwrap();
        let mut env: Envelope = codec::decode(&bytes).unwrap();
        match field {
            0 => env.nonce ^= 1 << bit.index(64),
            1 => env.issued_at_ms ^= 1 << bit.index(64),
            2 => env.expires_at_ms ^= 1 << bit.index(64),
            3 => { let i = bit.index(env.payload.len() * 8); env.payload[i / 8] ^= 1 << (i % 8); }
            4 => { let i = bit.index(512); env.signature.0[i / 8] ^= 1 << (i % 8); }
            _ => {
                let mut key = *env.signer.as_bytes();
                let i = bit.index(256);
                key[i / 8] ^= 1 << (i % 8);
                env.signer = aimatrix_protocol::identity::NodeId::from_bytes(key);
            }
        }
        prop_assert!(env.verify_signature().is_err());
    }

    #[test]
    fn a_copy_of_an_envelope_is_rejected_as_a_duplicate(msg in message(), nonce in any::<u64>()) {
        let bytes = seal(&testkit::keypair(4), &msg, nonce, NOW, 60_000).unwrap();
        let mut v = verifier();
        prop_assert!(open(&mut v, NOW, &bytes, &Domain::ALL).is_ok());
        let again = open(&mut v, NOW + 1, &bytes, &Domain::ALL);
        let is_copy = matches!(again, Err(RejectReason::Verify(VerifyError::Duplicate { .. })));
        prop_assert!(is_copy, "{:?}", again);
        prop_assert_eq!(again.unwrap_err().label(), "duplicate");
    }

    #[test]
    fn another_message_under_a_used_nonce_is_rejected_as_nonce_reuse(
        msg in message(),
        nonce in any::<u64>(),
    ) {
        let key = testkit::keypair(4);
        let mut v = verifier();
        prop_assert!(open(&mut v, NOW, &seal(&key, &msg, nonce, NOW, 60_000).unwrap(), &Domain::ALL).is_ok());
        // The same message with a later expiry: other signed bytes under the same nonce.
        let other = seal(&key, &msg, nonce, NOW, 61_000).unwrap();
        let again = open(&mut v, NOW + 1, &other, &Domain::ALL);
        let reused = matches!(again, Err(RejectReason::Verify(VerifyError::NonceReused { .. })));
        prop_assert!(reused, "{:?}", again);
        prop_assert_eq!(again.unwrap_err().label(), "nonce_reused");
    }

    #[test]
    fn expiry_and_skew_are_respected(ttl in 1u64..120_000, offset in -200_000i64..200_000) {
        let skew = 5_000i64;
        let bytes = seal(&testkit::keypair(5), &Message::Claim(Claim { job_id: JobId([1; 16]) }), 1, NOW, ttl).unwrap();
        let now = (NOW as i64 + offset) as u64;
        let result = open(&mut verifier(), now, &bytes, &[Domain::Claim]);
        let valid = offset >= -skew && offset <= ttl as i64 + skew;
        prop_assert_eq!(result.is_ok(), valid, "offset {} ttl {}: {:?}", offset, ttl, result);
        if offset > ttl as i64 + skew {
            let expired = matches!(result, Err(RejectReason::Verify(VerifyError::Expired { .. })));
            prop_assert!(expired, "{:?}", result);
        }
        if offset < -skew {
            let early = matches!(result, Err(RejectReason::Verify(VerifyError::NotYetValid { .. })));
            prop_assert!(early, "{:?}", result);
        }
    }

    #[test]
    fn matching_reports_every_reason(spec in spec(), p in profile(), timeout in 1u64..200_000, mem in 1u64..600_000) {
        let mut spec = spec;
        spec.limits.timeout_s = timeout;
        spec.requirements.memory_mb = mem;
        let r = &spec.requirements;
        // Each condition, checked on its own.
        let mut expected: BTreeMap<&str, bool> = BTreeMap::new();
        expected.insert("kind", !p.policy.allowed_kinds.contains(spec.kind));
        expected.insert("reward", spec.reward < p.policy.reward_floor);
        expected.insert("cpu_cap", r.cpu_cores > p.policy.max_cpu_cores);
        expected.insert("mem_cap", r.memory_mb > p.policy.max_memory_mb);
        expected.insert("timeout_cap", timeout > p.policy.max_timeout_s);
        expected.insert("capacity", p.load.running_jobs >= p.policy.max_concurrent_jobs);
        let runtime_ok = match spec.workload.runtime {
            Runtime::Wasm => p.runtimes.wasm,
            Runtime::Docker => p.runtimes.docker && p.policy.docker_enabled,
        };
        expected.insert("runtime", !runtime_ok);
        expected.insert("cpu", r.cpu_cores > p.cpu.physical_cores);
        expected.insert("mem", r.memory_mb > p.memory.total_bytes / MIB);
        let input_mb = spec.inputs.iter().map(|i| i.size_bytes).sum::<u64>().div_ceil(MIB);
        expected.insert("disk", r.disk_mb + input_mb > p.disk.free_bytes / MIB);
        expected.insert("gpu_runtime", r.gpus > 0 && !p.runtimes.docker_gpu);
        let fitting = p.gpus.iter().filter(|g| g.vram_bytes >= u64::from(r.vram_gb) * GIB).count() as u32;
        expected.insert("gpus", r.gpus > 0 && fitting < r.gpus);

        let got: BTreeMap<&str, bool> = expected.keys().map(|k| (*k, false)).collect();
        let mut got = got;
        match evaluate(&spec, &p) {
            Ok(_) => {}
            Err(reasons) => {
                prop_assert!(!reasons.is_empty());
                for m in reasons {
                    let key = match m {
                        Mismatch::KindNotAllowed { .. } => "kind",
                        Mismatch::RewardBelowFloor { .. } => "reward",
                        Mismatch::CpuCoresOverCap { .. } => "cpu_cap",
                        Mismatch::MemoryOverCap { .. } => "mem_cap",
                        Mismatch::TimeoutOverCap { .. } => "timeout_cap",
                        Mismatch::AtCapacity { .. } => "capacity",
                        Mismatch::RuntimeUnavailable { .. } => "runtime",
                        Mismatch::CpuCores { .. } => "cpu",
                        Mismatch::Memory { .. } => "mem",
                        Mismatch::Disk { .. } => "disk",
                        Mismatch::NoGpuRuntime => "gpu_runtime",
                        Mismatch::Gpus { .. } => "gpus",
                    };
                    prop_assert!(!got[key], "reason {} reported twice", key);
                    got.insert(key, true);
                }
            }
        }
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn job_specs_roundtrip_through_toml(spec in spec()) {
        let text = spec.to_toml();
        prop_assert_eq!(JobSpec::parse_toml(&text).unwrap(), spec);
    }
}
