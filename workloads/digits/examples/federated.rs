//! The full-size runs behind `docs/training.md`: every scenario of issue #8, printed as a
//! markdown table beside the centralized baseline.
//!
//! ```text
//! cargo run --release -p aimatrix-digits --example federated [-- --rounds 50 --seed 1]
//! ```

use std::time::Instant;

use aimatrix_digits::baseline::{self, BaselineConfig};
use aimatrix_digits::federated::{self, Attack, Config, Partition, Report};
use aimatrix_digits::split;
use aimatrix_mlp::{Codec, NormCheck, Rule};

fn main() -> anyhow::Result<()> {
    let mut rounds = 50;
    let mut seed = 1;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rounds" => rounds = value.parse()?,
            "--seed" => seed = value.parse()?,
            _ => anyhow::bail!("unknown flag {flag}; use --rounds N and --seed S"),
        }
    }
    let (train, test) = split::train_test();
    let started = Instant::now();
    let base = baseline::centralized(&BaselineConfig::default(), &train, &test);
    println!(
        "centralized baseline ({} epochs, lr {}, batch {}): test accuracy {:.2} %, loss {:.4}\n",
        BaselineConfig::default().epochs,
        BaselineConfig::default().learning_rate,
        BaselineConfig::default().batch_size,
        100.0 * base.test_accuracy,
        base.test_loss
    );
    let clean = Config { rounds, seed, ..Config::default() };
    let off = NormCheck::OFF;
    let scale = Attack::Scale(-10.0);
    let noise = Attack::Noise { std: federated::DEFAULT_NOISE_STD };
    let flip = Attack::LabelFlip;
    let mean = Rule::Mean;
    let trimmed = Rule::trimmed_mean();
    let clip = Rule::centered_clip();
    let byz = |rule: Rule, attack: Attack, norm_check: NormCheck| Config {
        rule,
        attack,
        byzantine: 2,
        norm_check,
        ..clean.clone()
    };
    let scenarios: Vec<(String, Config)> = vec![
        ("clean".into(), Config { rule: mean, ..clean.clone() }),
        ("clean".into(), Config { rule: Rule::Median, ..clean.clone() }),
        ("clean".into(), clean.clone()),
        ("clean".into(), Config { rule: clip, ..clean.clone() }),
        ("2/10 scale -10, no norm check".into(), byz(mean, scale, off)),
        ("2/10 scale -10, no norm check".into(), byz(trimmed, scale, off)),
        ("2/10 scale -10, no norm check".into(), byz(clip, scale, off)),
        ("2/10 scale -10, norm check k=4".into(), byz(mean, scale, NormCheck::default())),
        ("2/10 scale -10, norm check k=4".into(), byz(trimmed, scale, NormCheck::default())),
        ("2/10 noise, no norm check".into(), byz(mean, noise, off)),
        ("2/10 noise, no norm check".into(), byz(trimmed, noise, off)),
        ("2/10 noise, no norm check".into(), byz(clip, noise, off)),
        ("2/10 noise, norm check k=4".into(), byz(mean, noise, NormCheck::default())),
        ("2/10 noise, norm check k=4".into(), byz(trimmed, noise, NormCheck::default())),
        ("2/10 label flip, no norm check".into(), byz(mean, flip, off)),
        ("2/10 label flip, no norm check".into(), byz(trimmed, flip, off)),
        ("2/10 label flip, no norm check".into(), byz(clip, flip, off)),
        ("2/10 label flip, norm check k=4".into(), byz(mean, flip, NormCheck::default())),
        ("2/10 label flip, norm check k=4".into(), byz(trimmed, flip, NormCheck::default())),
        ("30 % drop-out".into(), Config { drop_rate: 0.3, ..clean.clone() }),
        ("30 % drop-out".into(), Config { drop_rate: 0.3, rule: mean, ..clean.clone() }),
        ("fp16".into(), Config { codec: Codec::Fp16, ..clean.clone() }),
        ("int8 (B = 256)".into(), Config { codec: Codec::int8(), ..clean.clone() }),
        (
            "top-k 1 %, error feedback".into(),
            Config { codec: Codec::topk(), rule: mean, ..clean.clone() },
        ),
        (
            "top-k 1 %, error feedback".into(),
            Config { codec: Codec::topk(), rule: clip, ..clean.clone() },
        ),
        (
            "top-k 1 %, no error feedback".into(),
            Config { codec: Codec::topk(), rule: mean, error_feedback: false, ..clean.clone() },
        ),
        (
            "non-IID (2 shards each)".into(),
            Config {
                partition: Partition::NonIid { shards_per_participant: 2 },
                rule: mean,
                ..clean.clone()
            },
        ),
        (
            "non-IID (2 shards each)".into(),
            Config { partition: Partition::NonIid { shards_per_participant: 2 }, ..clean.clone() },
        ),
    ];
    println!(
        "10 participants, 64 hidden, {} local epochs, lr {}, batch {}, {rounds} rounds, seed {seed}\n",
        clean.local_epochs, clean.learning_rate, clean.batch_size
    );
    println!("| scenario | rule | codec | test acc. | vs baseline | rounds to 96 % | bytes/update | fewer bytes | rejected |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, config) in &scenarios {
        let report = federated::run_on(config, &train, &test);
        row(name, config, &report, base.test_accuracy);
    }
    eprintln!("\n{} scenarios in {:.1?}", scenarios.len(), started.elapsed());
    Ok(())
}

fn row(name: &str, config: &Config, report: &Report, baseline: f32) {
    let rejected: usize = report.rounds.iter().map(|r| r.rejected.len()).sum();
    let codec = match config.codec {
        Codec::TopK { fraction } => format!("topk {}", fraction),
        other => other.name().to_owned(),
    };
    println!(
        "| {name} | {} | {codec} | {:.2} % | {:+.2} | {} | {:.0} | {:.2}× | {rejected} |",
        config.rule.name(),
        100.0 * report.final_accuracy(),
        100.0 * (report.final_accuracy() - baseline),
        report.rounds_to(0.96).map_or("—".to_owned(), |r| r.to_string()),
        report.bytes_per_update(),
        report.compression_ratio(),
    );
}
