//! Applies a delta to a model and reports loss and accuracy on a dataset, before and after.
//!
//! ```text
//! cargo run -p aimatrix-mlp --example evaluate -- MODEL.bin DELTA.bin DATA.bin
//! ```
//!
//! The relay's side of a training round in miniature: read what `train-step` returned, apply
//! it, and see whether the model got better on data it did not train on.

use std::error::Error;
use std::fs;

use aimatrix_mlp::{apply_delta, decode_delta, loss_and_accuracy, Dataset, Model};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, delta, data] = args.as_slice() else {
        return Err("usage: evaluate MODEL.bin DELTA.bin DATA.bin".into());
    };
    let model = Model::decode(&fs::read(model)?).map_err(|err| format!("{model}: {err}"))?;
    let delta = decode_delta(&fs::read(delta)?).map_err(|err| format!("{delta}: {err}"))?;
    let data = Dataset::decode(&fs::read(data)?).map_err(|err| format!("{data}: {err}"))?;
    let updated = apply_delta(&model, &delta)?;
    let (loss_before, accuracy_before) = loss_and_accuracy(&model, &data);
    let (loss_after, accuracy_after) = loss_and_accuracy(&updated, &data);
    println!("{} samples", data.len());
    println!("before: loss {loss_before:.4}, accuracy {accuracy_before:.4}");
    println!("after:  loss {loss_after:.4}, accuracy {accuracy_after:.4}");
    Ok(())
}
