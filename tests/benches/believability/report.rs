//! What the real run measured ([`Real`], read from the processes' logs) and the table that
//! shows it beside the simulator's summaries ([`print_report`]).

use std::path::Path;

use aimatrix_sim::{Scenario, Summary};
use anyhow::bail;
use studio_relay::api::types::JobView;

use super::logs::{Micros, NodeLog, RelayLog};
use super::{percentile, Opts, Posting};

/// Jobs by state, as the relay reports them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct JobCounts {
    pub(crate) posted: u64,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) pending: u64,
}

impl JobCounts {
    pub(crate) fn of<'a>(jobs: impl Iterator<Item = &'a JobView>) -> Self {
        let mut c = Self::default();
        for j in jobs {
            c.posted += 1;
            match j.state.as_str() {
                "completed" => c.completed += 1,
                "failed" | "refused" => c.failed += 1,
                _ => c.pending += 1,
            }
        }
        c
    }
}

/// What the real run measured.
pub(crate) struct Real {
    /// Jobs at the end of the scenario's duration (the simulator's summary counts them then).
    pub(crate) counts: JobCounts,
    /// Post → first lease, ms (relay log).
    pub(crate) assign_ms: Vec<f64>,
    /// Post → each node's first hearing of the offer, ms.
    pub(crate) propagation_ms: Vec<f64>,
    /// Post → the earliest node to hear the offer, per job, ms.
    pub(crate) first_node_ms: Vec<f64>,
    /// The earliest to the last node hearing the first announcement, per job, ms.
    pub(crate) spread_ms: Vec<f64>,
    /// Post → completed (relay log), ms.
    pub(crate) complete_ms: Vec<f64>,
    /// One-way latency between processes, ms: a claim line to its lease line (node → relay,
    /// with the relay's handling) and a lease line to the node's `running` line.
    pub(crate) one_way_ms: Vec<f64>,
    pub(crate) claim_to_grant_ms: Vec<f64>,
    pub(crate) grant_to_run_ms: Vec<f64>,
    /// Announcements the nodes' cores took, claims sent, claims denied, leases granted.
    pub(crate) offers_heard: u64,
    pub(crate) claims: u64,
    pub(crate) denials: u64,
    pub(crate) leases: u64,
    /// Jobs whose offer was announced more than once (a node heard it twice or more).
    pub(crate) reannounced_jobs: u64,
}

impl Real {
    /// Reads the logs in `dir`; counts what happened before `end`.
    pub(crate) fn measure(
        dir: &Path,
        nodes: usize,
        posting: &Posting,
        end: Micros,
        counts: JobCounts,
    ) -> anyhow::Result<Self> {
        let relay = RelayLog::read(&dir.join("relay.log"))?;
        let node_logs: Vec<NodeLog> = (0..nodes)
            .map(|i| NodeLog::read(&dir.join(format!("node-{i}.log"))))
            .collect::<Result<_, _>>()?;
        let mut r = Self {
            counts,
            assign_ms: Vec::new(),
            propagation_ms: Vec::new(),
            first_node_ms: Vec::new(),
            spread_ms: Vec::new(),
            complete_ms: Vec::new(),
            one_way_ms: Vec::new(),
            claim_to_grant_ms: Vec::new(),
            grant_to_run_ms: Vec::new(),
            offers_heard: 0,
            claims: 0,
            denials: node_logs
                .iter()
                .map(|n| n.denials.iter().filter(|&&at| at < end).count() as u64)
                .sum(),
            leases: 0,
            reannounced_jobs: 0,
        };
        let ms = |from: Micros, to: Micros| (to - from) as f64 / 1000.0;
        let before_end = |v: &Vec<Micros>| v.iter().filter(|&&at| at < end).count() as u64;
        for id in &posting.ids {
            let Some(&posted) = relay.posted.get(id) else {
                bail!("job {id}: no `posted` line in relay.log (did the relay's log change?)");
            };
            let grants = relay.leases.get(id).map(Vec::as_slice).unwrap_or_default();
            r.leases += grants.iter().filter(|g| g.2 < end).count() as u64;
            if let Some(first) = grants.iter().map(|g| g.2).filter(|&at| at < end).min() {
                r.assign_ms.push(ms(posted, first));
            }
            if let Some(&done) = relay.completed.get(id).filter(|&&at| at < end) {
                r.complete_ms.push(ms(posted, done));
            }
            let firsts: Vec<Micros> = node_logs
                .iter()
                .filter_map(|n| n.offers.get(id)?.first().copied())
                .filter(|&at| at < end)
                .collect();
            r.propagation_ms.extend(firsts.iter().map(|&at| ms(posted, at)));
            if let (Some(&lo), Some(&hi)) = (firsts.iter().min(), firsts.iter().max()) {
                r.first_node_ms.push(ms(posted, lo));
                r.spread_ms.push(ms(lo, hi));
            }
            let heard: Vec<u64> =
                node_logs.iter().filter_map(|n| n.offers.get(id).map(before_end)).collect();
            r.offers_heard += heard.iter().sum::<u64>();
            r.reannounced_jobs += u64::from(heard.iter().any(|&n| n > 1));
            r.claims +=
                node_logs.iter().filter_map(|n| n.claims.get(id)).map(before_end).sum::<u64>();
            for &(lease, _, granted) in grants {
                let Some(node) =
                    node_logs.iter().find(|n| n.runs.contains_key(&(id.clone(), lease)))
                else {
                    continue;
                };
                let ran = node.runs[&(id.clone(), lease)];
                r.grant_to_run_ms.push(ms(granted, ran));
                let claim =
                    node.claims.get(id).and_then(|c| c.iter().filter(|&&c| c <= granted).max());
                if let Some(&claim) = claim {
                    r.claim_to_grant_ms.push(ms(claim, granted));
                }
            }
        }
        if r.propagation_ms.is_empty() && !posting.ids.is_empty() {
            bail!(
                "no node logged `offer <job>: can serve` for any posted job; did the node's \
                 debug log change? logs in {}",
                dir.display()
            );
        }
        r.one_way_ms = r.claim_to_grant_ms.iter().chain(&r.grant_to_run_ms).copied().collect();
        Ok(r)
    }
}

/// Prints the side-by-side table and the notes under it.
pub(crate) fn print_report(
    opts: &Opts,
    sc: &Scenario,
    calibrated_sc: &Scenario,
    sims: [&Summary; 2],
    real: &Real,
    peers: &[usize],
    posting: &Posting,
) {
    let n = &calibrated_sc.network;
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut row = |metric: &str, sim: [String; 2], real: String| {
        rows.push([metric.to_owned(), sim[0].clone(), sim[1].clone(), real]);
    };
    let each = |f: &dyn Fn(&Summary) -> String| [f(sims[0]), f(sims[1])];
    let c = &real.counts;
    row(
        "jobs posted / completed / failed / pending at the end",
        each(&|s| {
            let j = &s.jobs;
            format!("{} / {} / {} / {}", j.posted, j.completed, j.failed + j.refused, j.pending)
        }),
        format!("{} / {} / {} / {}", c.posted, c.completed, c.failed, c.pending),
    );
    let sim_p = |p: &aimatrix_sim::stats::Percentiles| {
        format!("{} / {} / {} / {}", p.p50, p.p90, p.p99, p.max)
    };
    row(
        "time to assign, ms: p50 / p90 / p99 / max",
        each(&|s| sim_p(&s.time_to_assign_ms)),
        real_p(&real.assign_ms),
    );
    row(
        "offer propagation, ms: p50 / p90 / p99 / max",
        each(&|s| sim_p(&s.offer_propagation_ms)),
        real_p(&real.propagation_ms),
    );
    row(
        "time to complete, ms: p50 / p90 / p99 / max",
        each(&|s| sim_p(&s.time_to_complete_ms)),
        real_p(&real.complete_ms),
    );
    let per_job = |x: u64, jobs: u64| format!("{:.1}", x as f64 / jobs.max(1) as f64);
    row(
        "offer announcements heard per job",
        each(&|s| per_job(s.offer_propagation_ms.count, s.jobs.posted)),
        per_job(real.offers_heard, c.posted),
    );
    row(
        "claims per job (denied)",
        each(&|s| {
            let a = &s.activity;
            format!(
                "{} ({})",
                per_job(a.claims, s.jobs.posted),
                per_job(a.claims_denied, s.jobs.posted)
            )
        }),
        format!("{} ({})", per_job(real.claims, c.posted), per_job(real.denials, c.posted)),
    );
    row(
        "leases per job",
        each(&|s| per_job(s.activity.leases_granted, s.jobs.posted)),
        per_job(real.leases, c.posted),
    );
    row(
        "messages the cores sent per job",
        each(&|s| format!("{:.1}", s.messages.sent_per_job)),
        "not counted".into(),
    );
    row(
        "wire messages per job (gossip, control, DHT)",
        each(&|s| format!("{:.0}", s.messages.wire_messages_per_job)),
        "not counted".into(),
    );
    let mean_peers = peers.iter().sum::<usize>() as f64 / peers.len().max(1) as f64;
    row(
        "node-to-node connections per node",
        each(&|s| format!("{:.1}", s.overlay.node_links_mean)),
        format!("{mean_peers:.1} (of {} nodes answering)", peers.len()),
    );
    row(
        "gossip mesh degree",
        each(&|s| format!("{:.1}", s.overlay.mesh_degree_mean)),
        "not shown by the node".into(),
    );

    let header = [
        "metric".to_owned(),
        format!("sim ({} ms + 0..{} ms)", sc.network.base_ms, sc.network.jitter_ms),
        format!("sim (measured: {} ms + 0..{} ms)", n.base_ms, n.jitter_ms),
        "real (processes on loopback)".to_owned(),
    ];
    let mut widths = [0; 4];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    println!();
    println!(
        "believability: scenario {:?}, {} nodes, 1 relay, {} s, {} jobs/s, seed {}",
        sc.name, sc.nodes, sc.duration_s, sc.workload.arrivals_per_s, sc.seed
    );
    println!("reproduce: {}", opts.command(sc));
    println!();
    let line = |r: &[String; 4]| {
        let cells: Vec<String> =
            r.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        format!("| {} |", cells.join(" | "))
    };
    println!("{}", line(&header));
    println!("|{}|", widths.map(|w| "-".repeat(w + 2)).join("|"));
    for r in &rows {
        println!("{}", line(r));
    }
    println!();
    println!(
        "measured one-way latency between processes: claim line -> relay lease line {}; lease \
         line -> node `running` line {} (ms: p50 / p90 / p99 / max)",
        real_p(&real.claim_to_grant_ms),
        real_p(&real.grant_to_run_ms)
    );
    println!(
        "real offer propagation split: relay `posted` line -> first node hears it {}; first -> \
         last node hears it {} (ms: p50 / p90 / p99 / max)",
        real_p(&real.first_node_ms),
        real_p(&real.spread_ms)
    );
    println!(
        "real posting: POST round trip {} ms; largest lag behind the Poisson schedule {:.1} ms; \
         {} jobs announced more than once; guest run times {}",
        real_p(&posting.post_ms),
        posting.lag_ms_max,
        real.reannounced_jobs,
        real_p(&posting.run_ms.values().map(|&v| v as f64).collect::<Vec<_>>())
    );
    for (name, s) in ["sim", "sim (measured latency)"].iter().zip(sims) {
        println!(
            "{name}: invariants {}; {} steps; wire {:.0} messages per job; overlay {} gossip \
             copies, {} duplicates, {} IHAVE",
            if s.invariants_ok { "ok" } else { "FAILED" },
            s.steps,
            s.messages.wire_messages_per_job,
            s.overlay.gossip_copies,
            s.overlay.gossip_duplicates,
            s.overlay.ihave
        );
    }
}

/// `p50 / p90 / p99 / max` of real samples, to 0.1 ms.
fn real_p(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    format!(
        "{:.1} / {:.1} / {:.1} / {max:.1}",
        percentile(v, 0.5),
        percentile(v, 0.9),
        percentile(v, 0.99)
    )
}
