//! `train-step`: one participant's share of a distributed training round.
//!
//! Built for `wasm32-wasip1` and run in a node's sandbox (it also runs natively, which is how
//! its tests run).
//!
//! ```text
//! train-step [--inputs DIR] [--outputs DIR] [--epochs E] [--lr LR] [--batch B]
//!            [--compression none|fp16|int8|topk] [--topk-fraction F]
//! ```
//!
//! - Reads `model.bin` (an `aimatrix-mlp` model, `AMLP`) and `chunk.bin` (an `aimatrix-mlp`
//!   dataset, `ADSC`) from `--inputs` (default `/job/inputs`).
//! - Runs `aimatrix_mlp::train` for `--epochs` (default 1) epochs at learning rate `--lr`
//!   (default 0.1) in mini-batches of `--batch` (default 32) samples. Training is
//!   deterministic: the same inputs give bitwise the same outputs on every node.
//! - Writes to `--outputs` (default `/job/outputs`, created if missing):
//!   - without `--compression`: `delta.bin`, the update, trained minus original parameters
//!     (`AMLD`);
//!   - with `--compression C`: `update.bin`, the update compressed with codec `C` (`AMLC`, what
//!     a training participant sends its relay). With `topk` (the largest `--topk-fraction`
//!     of the values, default 0.01) the step keeps error feedback: it adds `residual.bin` from
//!     `--inputs` (`AMLD`, what earlier rounds did not send; absent in the first round) to
//!     the delta before compressing, and writes what this update does not carry to
//!     `--outputs` as `residual.bin`, for the node to keep for the next round; and
//!     `delta.sha256`, the SHA-256 (64 hex digits and a newline) of the uncompressed delta's
//!     `AMLD` bytes: what a verifying re-run of the same round on another node must match
//!     (it does not depend on the residual);
//!   - `metrics.json`: `{"samples":N,"loss_before":x,"loss_after":y,"accuracy_after":z}`
//!     (mean cross-entropy on the chunk before and after, accuracy after).
//! - Prints one summary line to stdout.
//!
//! Exit status: 0 success; 1 a file could not be read or written, is malformed (the decoder's
//! message is on stderr), the model and chunk do not fit together, or training diverged to
//! non-finite values; 2 bad arguments.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sha2::{Digest as _, Sha256};

use aimatrix_mlp::{
    compress, decode_delta, delta, encode_delta, loss_and_accuracy, train, Codec, Dataset, Model,
    Residual,
};

/// The compressed update, with `--compression`.
const UPDATE: &str = "update.bin";
/// Error-feedback memory, read from the inputs and written to the outputs with `topk`.
const RESIDUAL: &str = "residual.bin";
/// The uncompressed delta's SHA-256, with `--compression`.
const DELTA_DIGEST: &str = "delta.sha256";

const USAGE: &str = "\
usage: train-step [--inputs DIR] [--outputs DIR] [--epochs E] [--lr LR] [--batch B]
                  [--compression none|fp16|int8|topk] [--topk-fraction F]

  --inputs DIR         directory holding model.bin and chunk.bin (and residual.bin with
                       topk, after the first round) (default /job/inputs)
  --outputs DIR        directory to write delta.bin (update.bin with --compression) and
                       metrics.json to (default /job/outputs)
  --epochs E           passes over the chunk, at least 1 (default 1)
  --lr LR              SGD learning rate, a positive number (default 0.1)
  --batch B            samples per mini-batch, at least 1 (default 32)
  --compression C      write update.bin compressed with C: none, fp16, int8 or topk (with
                       error feedback through residual.bin)
  --topk-fraction F    share of the values topk sends, above 0 and at most 1 (default 0.01)
";

/// What the command line asked for.
#[derive(Debug, PartialEq)]
struct Args {
    inputs: PathBuf,
    outputs: PathBuf,
    epochs: u32,
    learning_rate: f32,
    batch_size: u32,
    /// `--compression`: write `update.bin` with this codec instead of `delta.bin`.
    compression: Option<Codec>,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("train-step: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("train-step: {message}");
            ExitCode::from(1)
        }
    }
}

/// Parses `--flag VALUE` and `--flag=VALUE`; `Ok(None)` means `--help` was asked for.
fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        inputs: PathBuf::from("/job/inputs"),
        outputs: PathBuf::from("/job/outputs"),
        epochs: 1,
        learning_rate: 0.1,
        batch_size: 32,
        compression: None,
    };
    let mut codec_name: Option<String> = None;
    let mut topk_fraction = Codec::DEFAULT_TOPK_FRACTION;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(arg) = arg.to_str().map(str::to_owned) else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(OsString::from(value))),
            _ => (arg.as_str(), None),
        };
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        if !matches!(
            flag,
            "--inputs"
                | "--outputs"
                | "--epochs"
                | "--lr"
                | "--batch"
                | "--compression"
                | "--topk-fraction"
        ) {
            return Err(format!("unexpected argument '{arg}'"));
        }
        let Some(value) = inline.or_else(|| args.next()) else {
            return Err(format!("{flag} needs a value"));
        };
        let text = value.to_string_lossy();
        match flag {
            "--inputs" => parsed.inputs = PathBuf::from(value),
            "--outputs" => parsed.outputs = PathBuf::from(value),
            "--epochs" => parsed.epochs = positive_integer(flag, &text)?,
            "--batch" => parsed.batch_size = positive_integer(flag, &text)?,
            "--compression" => codec_name = Some(text.into_owned()),
            "--topk-fraction" => {
                topk_fraction = match text.parse::<f64>() {
                    Ok(f) if f > 0.0 && f <= 1.0 => f,
                    _ => {
                        return Err(format!(
                            "--topk-fraction must be above 0 and at most 1, got '{text}'"
                        ))
                    }
                }
            }
            _ => {
                parsed.learning_rate = match text.parse::<f32>() {
                    Ok(lr) if lr.is_finite() && lr > 0.0 => lr,
                    _ => return Err(format!("--lr must be a positive number, got '{text}'")),
                }
            }
        }
    }
    parsed.compression = match codec_name.as_deref() {
        None => None,
        Some("none") => Some(Codec::None),
        Some("fp16") => Some(Codec::Fp16),
        Some("int8") => Some(Codec::int8()),
        Some("topk") => Some(Codec::TopK { fraction: topk_fraction }),
        Some(other) => {
            return Err(format!("--compression must be none, fp16, int8 or topk, got '{other}'"))
        }
    };
    Ok(Some(parsed))
}

fn positive_integer(flag: &str, text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(value) if value > 0 => Ok(value),
        _ => Err(format!("{flag} must be a whole number from 1 to {}, got '{text}'", u32::MAX)),
    }
}

/// Trains, writes `delta.bin` (or `update.bin`, and `residual.bin` for top-k) and
/// `metrics.json`, and returns the summary line.
fn run(args: &Args) -> Result<String, String> {
    let model_path = args.inputs.join("model.bin");
    let model = Model::decode(&read(&model_path)?)
        .map_err(|err| format!("{}: {err}", model_path.display()))?;
    let chunk_path = args.inputs.join("chunk.bin");
    let chunk = Dataset::decode(&read(&chunk_path)?)
        .map_err(|err| format!("{}: {err}", chunk_path.display()))?;
    model.check_dataset(&chunk).map_err(|err| format!("model.bin and chunk.bin: {err}"))?;

    let (loss_before, _) = loss_and_accuracy(&model, &chunk);
    let trained = train(&model, &chunk, args.epochs, args.learning_rate, args.batch_size);
    let update = delta(&trained, &model);
    if update.iter().any(|value| !value.is_finite()) {
        return Err(format!(
            "training diverged: parameters became NaN or infinite at --lr {:?}; \
             try a smaller learning rate",
            args.learning_rate
        ));
    }
    let (loss_after, accuracy_after) = loss_and_accuracy(&trained, &chunk);

    fs::create_dir_all(&args.outputs).map_err(|err| {
        format!("cannot create outputs directory {}: {err}", args.outputs.display())
    })?;
    if args.compression.is_some() {
        let digest = Sha256::digest(encode_delta(&update));
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        write(&args.outputs.join(DELTA_DIGEST), format!("{hex}\n").as_bytes())?;
    }
    match args.compression {
        None => write(&args.outputs.join("delta.bin"), &encode_delta(&update))?,
        Some(codec @ Codec::TopK { .. }) => {
            let residual_path = args.inputs.join(RESIDUAL);
            let mut residual = if residual_path.exists() {
                let values = decode_delta(&read(&residual_path)?)
                    .map_err(|err| format!("{}: {err}", residual_path.display()))?;
                if values.len() != update.len() {
                    return Err(format!(
                        "{}: holds {} values but the model has {} parameters",
                        residual_path.display(),
                        values.len(),
                        update.len()
                    ));
                }
                Residual::from_values(values)
            } else {
                Residual::new(update.len())
            };
            let bytes = residual.compress(codec, &update);
            write(&args.outputs.join(UPDATE), &bytes)?;
            write(&args.outputs.join(RESIDUAL), &encode_delta(residual.values()))?;
        }
        Some(codec) => write(&args.outputs.join(UPDATE), &compress(codec, &update))?,
    }
    let metrics = format!(
        "{{\"samples\":{},\"loss_before\":{},\"loss_after\":{},\"accuracy_after\":{}}}\n",
        chunk.len(),
        number(loss_before),
        number(loss_after),
        number(accuracy_after)
    );
    write(&args.outputs.join("metrics.json"), metrics.as_bytes())?;

    Ok(format!(
        "trained {} samples for {} epoch(s): loss {loss_before:.4} -> {loss_after:.4}, \
         accuracy {accuracy_after:.4}",
        chunk.len(),
        args.epochs
    ))
}

/// A JSON number: Rust's shortest round-trip form of the `f32`; `null` if not finite (JSON
/// has no NaN or infinity).
fn number(value: f32) -> String {
    if value.is_finite() {
        format!("{value}")
    } else {
        "null".to_owned()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    fs::write(path, bytes).map_err(|err| format!("cannot write {}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_and_flags() {
        let defaults = parse(&[]).unwrap().unwrap();
        assert_eq!((defaults.epochs, defaults.learning_rate, defaults.batch_size), (1, 0.1, 32));
        assert_eq!(defaults.inputs, PathBuf::from("/job/inputs"));
        let args = parse(&["--epochs", "3", "--lr=0.05", "--batch", "8", "--inputs", "i"])
            .unwrap()
            .unwrap();
        assert_eq!((args.epochs, args.learning_rate, args.batch_size), (3, 0.05, 8));
        assert_eq!(args.inputs, PathBuf::from("i"));
        assert_eq!(parse(&["-h"]), Ok(None));
    }

    #[test]
    fn bad_arguments_are_explained() {
        assert!(parse(&["--epochs", "0"]).unwrap_err().contains("--epochs must be"));
        assert!(parse(&["--batch", "-3"]).unwrap_err().contains("--batch must be"));
        assert!(parse(&["--lr", "NaN"]).unwrap_err().contains("--lr must be a positive"));
        assert!(parse(&["--lr", "0"]).is_err());
        assert!(parse(&["--lr"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--momentum", "0.9"]).unwrap_err().contains("unexpected argument"));
        assert!(parse(&["--compression", "zip"]).unwrap_err().contains("none, fp16, int8 or topk"));
        assert!(parse(&["--topk-fraction", "0"]).unwrap_err().contains("above 0"));
    }

    #[test]
    fn compression_flags_pick_the_codec() {
        let args = parse(&["--compression", "topk", "--topk-fraction", "0.05"]).unwrap().unwrap();
        assert_eq!(args.compression, Some(Codec::TopK { fraction: 0.05 }));
        assert_eq!(
            parse(&["--compression=int8"]).unwrap().unwrap().compression,
            Some(Codec::int8())
        );
        assert_eq!(parse(&[]).unwrap().unwrap().compression, None);
    }

    #[test]
    fn topk_keeps_error_feedback_between_rounds() {
        let dir = std::env::temp_dir().join(format!("train-step-topk-{}", std::process::id()));
        let (inputs, outputs) = (dir.join("in"), dir.join("out"));
        fs::create_dir_all(&inputs).unwrap();
        let model = Model::init_with_dims(4, 6, 2, 1);
        let chunk = Dataset {
            features: 4,
            samples: (0..32).map(|i| (i % 5) as f32 / 4.0).collect(),
            labels: (0..8).map(|i| (i % 2) as u8).collect(),
        };
        fs::write(inputs.join("model.bin"), model.encode()).unwrap();
        fs::write(inputs.join("chunk.bin"), chunk.encode()).unwrap();
        let codec = Codec::TopK { fraction: 0.1 };
        let args = Args {
            inputs: inputs.clone(),
            outputs: outputs.clone(),
            epochs: 2,
            learning_rate: 0.5,
            batch_size: 4,
            compression: Some(codec),
        };
        run(&args).unwrap();
        let n = model.params.len();
        let first = aimatrix_mlp::decompress(&fs::read(outputs.join(UPDATE)).unwrap(), n).unwrap();
        let held = decode_delta(&fs::read(outputs.join(RESIDUAL)).unwrap()).unwrap();
        let full = delta(&train(&model, &chunk, 2, 0.5, 4), &model);
        for i in 0..n {
            assert_eq!(first[i] + held[i], full[i], "sent + held = produced at {i}");
        }
        assert_eq!(first.iter().filter(|v| **v != 0.0).count(), Codec::topk_count(0.1, n));
        assert!(!outputs.join("delta.bin").exists());
        let digest = fs::read_to_string(outputs.join(DELTA_DIGEST)).unwrap();
        assert_eq!(digest.len(), 65, "{digest:?}");
        let first_digest = digest.clone();

        // The next round adds what was held back.
        fs::rename(outputs.join(RESIDUAL), inputs.join(RESIDUAL)).unwrap();
        run(&args).unwrap();
        let second = aimatrix_mlp::decompress(&fs::read(outputs.join(UPDATE)).unwrap(), n).unwrap();
        let mut expected = Residual::from_values(held);
        assert_eq!(second, aimatrix_mlp::decompress(&expected.compress(codec, &full), n).unwrap());
        // The delta's digest does not depend on the residual: a re-run without it matches.
        assert_eq!(fs::read_to_string(outputs.join(DELTA_DIGEST)).unwrap(), first_digest);

        // A residual of the wrong size is refused with the reason.
        fs::write(inputs.join(RESIDUAL), encode_delta(&[0.0; 3])).unwrap();
        assert!(run(&args).unwrap_err().contains("holds 3 values"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_training_step_writes_a_delta_that_lowers_the_loss() {
        let dir = std::env::temp_dir().join(format!("train-step-test-{}", std::process::id()));
        let (inputs, outputs) = (dir.join("in"), dir.join("out"));
        fs::create_dir_all(&inputs).unwrap();
        let model = Model::init_with_dims(4, 6, 2, 1);
        let mut chunk = Dataset { features: 4, samples: Vec::new(), labels: Vec::new() };
        for index in 0..16 {
            let class = index % 2;
            chunk.samples.extend(if class == 0 {
                [1.0, 0.9, 0.0, 0.1]
            } else {
                [0.0, 0.1, 1.0, 0.9]
            });
            chunk.labels.push(class as u8);
        }
        fs::write(inputs.join("model.bin"), model.encode()).unwrap();
        fs::write(inputs.join("chunk.bin"), chunk.encode()).unwrap();
        let args = Args {
            inputs,
            outputs: outputs.clone(),
            epochs: 20,
            learning_rate: 0.5,
            batch_size: 4,
            compression: None,
        };

        let summary = run(&args).unwrap();
        assert!(summary.starts_with("trained 16 samples for 20 epoch(s)"), "{summary}");
        let update =
            aimatrix_mlp::decode_delta(&fs::read(outputs.join("delta.bin")).unwrap()).unwrap();
        let trained = aimatrix_mlp::apply_delta(&model, &update).unwrap();
        let (before, _) = loss_and_accuracy(&model, &chunk);
        let (after, accuracy) = loss_and_accuracy(&trained, &chunk);
        assert!(after < before, "{before} -> {after}");
        assert_eq!(accuracy, 1.0);
        let metrics = fs::read_to_string(outputs.join("metrics.json")).unwrap();
        assert!(metrics.starts_with("{\"samples\":16,\"loss_before\":"), "{metrics}");
        assert!(metrics.ends_with(",\"accuracy_after\":1}\n"), "{metrics}");

        // The same inputs give the same bytes.
        let first = fs::read(outputs.join("delta.bin")).unwrap();
        run(&args).unwrap();
        assert_eq!(fs::read(outputs.join("delta.bin")).unwrap(), first);

        // A corrupt model is reported with the decoder's message.
        fs::write(args.inputs.join("model.bin"), b"AMLP\x02\0\0\0").unwrap();
        let err = run(&args).unwrap_err();
        assert!(err.contains("model.bin: model: unsupported format version 2"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
