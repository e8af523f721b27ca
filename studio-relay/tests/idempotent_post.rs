//! A post carries a requester-chosen idempotency key: a retry with the same key returns the
//! job the first try posted, never a second one, also after the relay restarted; the same key
//! for another spec is refused; posts without a key are separate jobs.

#![allow(clippy::unwrap_used)]

mod common;

use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::job::{ContentRef, JobSpec};
use studio_relay::api::types::{MintRequest, PostJobRequest};

use common::Serve;

fn spec(module: &str, reward: u64) -> JobSpec {
    let mut spec = JobSpec::from_toml(&format!(
        "kind = \"batch\"\nreward = {reward}\n[workload]\nruntime = \"wasm\"\nmodule = \"m.wasm\"\n"
    ))
    .unwrap();
    let digest: Digest = format!("sha256:{module}").parse().unwrap();
    spec.workload.module = Some(ContentRef::Digest(digest));
    spec
}

fn keyed(spec: JobSpec, key: Option<&str>) -> PostJobRequest {
    PostJobRequest { spec, account: "studio".into(), idempotency_key: key.map(str::to_owned) }
}

#[test]
fn a_retry_with_the_same_key_returns_the_same_job_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = Serve::start(&data, &dir.path().join("serve-1.log"));
    let client = serve.client();
    let mint = MintRequest { account: "studio".into(), amount: 100, memo: String::new(), id: None };
    client.mint(&mint).unwrap();
    let module = client.put_blob(b"\0asm idempotent").unwrap().sha256;

    let first = client.post_job(&keyed(spec(&module, 10), Some("order-17"))).unwrap();
    let again = client.post_job(&keyed(spec(&module, 10), Some("order-17"))).unwrap();
    assert_eq!(again.job_id, first.job_id, "a retry names the same job");
    assert_eq!(client.jobs().unwrap().len(), 1, "one job, not two");
    assert_eq!(client.balance("studio").unwrap().available, 90, "charged once");

    let other = client.post_job(&keyed(spec(&module, 20), Some("order-17"))).unwrap_err();
    assert_eq!(other.status(), Some(400), "{other}");
    assert!(other.to_string().contains("already posted job"), "{other}");

    // Without a key, each post is a job of its own.
    let a = client.post_job(&keyed(spec(&module, 10), None)).unwrap();
    let b = client.post_job(&keyed(spec(&module, 10), None)).unwrap();
    assert_ne!(a.job_id, b.job_id);
    assert_eq!(client.balance("studio").unwrap().available, 70);
    drop(serve);

    // A retry after the relay was killed and restarted finds the job in the job store.
    let serve = Serve::start(&data, &dir.path().join("serve-2.log"));
    let client = serve.client();
    let later = client
        .post_job(&keyed(spec(&module, 10), Some("order-17")))
        .unwrap_or_else(|e| panic!("{e}; the relay logged:\n{}", serve.log()));
    assert_eq!(later.job_id, first.job_id);
    assert_eq!(client.jobs().unwrap().len(), 3);
    assert_eq!(client.balance("studio").unwrap().available, 70, "still charged once");

    let long = "k".repeat(129);
    let err = client.post_job(&keyed(spec(&module, 10), Some(&long))).unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
}
