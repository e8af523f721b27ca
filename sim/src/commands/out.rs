//! `--out DIR`: the time series of a run as CSV files and SVG plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use aimatrix_sim::stats::Series;
use anyhow::Context;
use plotters::prelude::*;

/// Writes `timeseries.csv`, `propagation_cdf.csv`, `completion_latency.csv` and the plots
/// `queue_length.svg`, `propagation_cdf.svg`, `completion_latency.svg` into `dir`.
pub(crate) fn write(dir: &Path, series: &Series) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut put = |name: &str, text: String| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };

    let mut csv =
        String::from("t_s,open_jobs,posted,completed,failed,nodes_up,nodes_cut,wire_bytes\n");
    for s in &series.samples {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{}",
            s.t_s,
            s.open_jobs,
            s.posted,
            s.completed,
            s.failed,
            s.nodes_up,
            s.nodes_cut,
            s.wire_bytes
        );
    }
    put("timeseries.csv", csv)?;

    let propagation = cdf_of_histogram(&series.propagation_ms);
    let mut csv = String::from("ms,fraction_of_arrivals\n");
    for (ms, f) in &propagation {
        let _ = writeln!(csv, "{ms},{f:.6}");
    }
    put("propagation_cdf.csv", csv)?;

    let mut latencies = series.complete_ms.clone();
    latencies.sort_unstable();
    let mut csv = String::from("complete_ms,fraction_of_completed_jobs\n");
    let completion: Vec<(f64, f64)> = latencies
        .iter()
        .enumerate()
        .map(|(i, ms)| (*ms as f64 / 1000.0, (i + 1) as f64 / latencies.len() as f64))
        .collect();
    for (ms, (_, f)) in latencies.iter().zip(&completion) {
        let _ = writeln!(csv, "{ms},{f:.6}");
    }
    put("completion_latency.csv", csv)?;

    let queue: Vec<(f64, f64)> =
        series.samples.iter().map(|s| (s.t_s as f64 / 60.0, s.open_jobs as f64)).collect();
    let svg = dir.join("queue_length.svg");
    line_plot(&svg, "Jobs posted and not ended", "simulated minutes", "open jobs", &queue)?;
    written.push(svg);
    let points: Vec<(f64, f64)> = propagation.iter().map(|(ms, f)| (*ms as f64, *f)).collect();
    let svg = dir.join("propagation_cdf.svg");
    line_plot(
        &svg,
        "Offer propagation (CDF over arrivals)",
        "ms after publishing",
        "fraction",
        &points,
    )?;
    written.push(svg);
    let svg = dir.join("completion_latency.svg");
    line_plot(&svg, "Completion latency (CDF)", "seconds after posting", "fraction", &completion)?;
    written.push(svg);
    Ok(written)
}

/// (ms, cumulative fraction) at every non-empty bucket.
fn cdf_of_histogram(buckets: &[u64]) -> Vec<(u64, f64)> {
    let total: u64 = buckets.iter().sum();
    let mut seen = 0;
    let mut out = Vec::new();
    for (ms, n) in buckets.iter().enumerate() {
        if *n > 0 {
            seen += n;
            out.push((ms as u64, seen as f64 / total as f64));
        }
    }
    out
}

fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
) -> anyhow::Result<()> {
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let x_max = points.iter().map(|p| p.0).fold(0.0, f64::max).max(1.0);
        let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw()?;
        chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("plotting {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cdf_ends_at_one() {
        let cdf = cdf_of_histogram(&[0, 2, 0, 2]);
        assert_eq!(cdf, vec![(1, 0.5), (3, 1.0)]);
    }
}
