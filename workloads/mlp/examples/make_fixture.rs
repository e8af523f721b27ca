//! Writes `model.bin`, `chunk.bin` and `test.bin` for trying the `train-step` guest by hand.
//!
//! ```text
//! cargo run -p aimatrix-mlp --example make_fixture -- DIR [--seed S] [--samples N] [--csv FILE]
//! ```
//!
//! - `model.bin`: `Model::init(S)` (default seed 1).
//! - `chunk.bin` / `test.bin`: the first `N` samples (default 1000) and the rest of a digits
//!   dataset. With `--csv FILE`, the dataset is read from FILE: one sample per line, 64 pixel
//!   values 0 to 16 and then the label, comma-separated, as in the UCI 8×8 digits (scikit-learn
//!   ships it as `sklearn/datasets/data/digits.csv.gz`; unzip it first). Without `--csv`, 1500
//!   synthetic digits are drawn from an 8×8 font with random shifts and noise.
//!
//! Pixels are scaled to `[0, 1]`. Then, for example:
//!
//! ```text
//! cargo run --manifest-path workloads/guests/Cargo.toml -p train-step -- \
//!     --inputs DIR --outputs DIR/out --epochs 5
//! cargo run -p aimatrix-mlp --example evaluate -- DIR/model.bin DIR/out/delta.bin DIR/test.bin
//! ```

use std::error::Error;
use std::fs;
use std::path::PathBuf;

use aimatrix_mlp::{Dataset, Model, INPUTS};

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let (mut seed, mut samples, mut csv) = (1_u64, 1000_usize, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seed" => seed = value()?.parse()?,
            "--samples" => samples = value()?.parse()?,
            "--csv" => csv = Some(PathBuf::from(value()?)),
            _ if dir.is_none() && !arg.starts_with('-') => dir = Some(PathBuf::from(arg)),
            _ => return Err(format!("unexpected argument '{arg}'").into()),
        }
    }
    let dir = dir.ok_or("usage: make_fixture DIR [--seed S] [--samples N] [--csv FILE]")?;

    let all = match csv {
        Some(path) => read_csv(&fs::read_to_string(&path)?)?,
        None => synthetic_digits(1500, seed),
    };
    let (chunk, test) = split(&all, samples.min(all.len()));
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("model.bin"), Model::init(seed).encode())?;
    fs::write(dir.join("chunk.bin"), chunk.encode())?;
    fs::write(dir.join("test.bin"), test.encode())?;
    println!(
        "wrote {}: model.bin (seed {seed}), chunk.bin ({} samples), test.bin ({} samples)",
        dir.display(),
        chunk.len(),
        test.len()
    );
    Ok(())
}

/// UCI digits CSV: 64 values 0..=16, then the label.
fn read_csv(text: &str) -> Result<Dataset, Box<dyn Error>> {
    let mut data = Dataset { features: INPUTS, samples: Vec::new(), labels: Vec::new() };
    for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() != INPUTS + 1 {
            return Err(
                format!("line {}: expected 65 fields, got {}", number + 1, fields.len()).into()
            );
        }
        for field in &fields[..INPUTS] {
            data.samples.push(field.trim().parse::<f32>()? / 16.0);
        }
        data.labels.push(fields[INPUTS].trim().parse()?);
    }
    data.check()?;
    Ok(data)
}

fn split(all: &Dataset, first: usize) -> (Dataset, Dataset) {
    let cut = first * all.features;
    let part = |samples: &[f32], labels: &[u8]| Dataset {
        features: all.features,
        samples: samples.to_vec(),
        labels: labels.to_vec(),
    };
    (
        part(&all.samples[..cut], &all.labels[..first]),
        part(&all.samples[cut..], &all.labels[first..]),
    )
}

/// An 8×8 font for the digits.
const GLYPHS: [[&str; 8]; 10] = [
    [
        "..####..", ".#....#.", ".#...##.", ".#..#.#.", ".#.#..#.", ".##...#.", ".#....#.",
        "..####..",
    ],
    [
        "...##...", "..###...", ".#.##...", "...##...", "...##...", "...##...", "...##...",
        ".######.",
    ],
    [
        "..####..", ".#....#.", "......#.", ".....#..", "....#...", "...#....", "..#.....",
        ".######.",
    ],
    [
        "..####..", ".#....#.", "......#.", "...###..", "......#.", "......#.", ".#....#.",
        "..####..",
    ],
    [
        ".....#..", "....##..", "...#.#..", "..#..#..", ".#...#..", ".######.", ".....#..",
        ".....#..",
    ],
    [
        ".######.", ".#......", ".#......", ".#####..", "......#.", "......#.", ".#....#.",
        "..####..",
    ],
    [
        "...###..", "..#.....", ".#......", ".#####..", ".#....#.", ".#....#.", ".#....#.",
        "..####..",
    ],
    [
        ".######.", "......#.", ".....#..", "....#...", "...#....", "...#....", "...#....",
        "...#....",
    ],
    [
        "..####..", ".#....#.", ".#....#.", "..####..", ".#....#.", ".#....#.", ".#....#.",
        "..####..",
    ],
    [
        "..####..", ".#....#.", ".#....#.", ".#....#.", "..#####.", "......#.", ".....#..",
        "..###...",
    ],
];

/// `count` digits cycling through 0 to 9, each glyph shifted by up to one pixel, with its ink
/// at random strength and background noise.
fn synthetic_digits(count: usize, seed: u64) -> Dataset {
    let mut state = seed ^ 0x2545_f491_4f6c_dd1d;
    let mut uniform = move || {
        // xorshift64*: good enough for test data.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / 16_777_216.0
    };
    let mut data = Dataset { features: INPUTS, samples: Vec::new(), labels: Vec::new() };
    for index in 0..count {
        let digit = index % 10;
        let dx = (uniform() * 3.0) as i32 - 1;
        let dy = (uniform() * 3.0) as i32 - 1;
        for y in 0..8_i32 {
            for x in 0..8_i32 {
                let (sx, sy) = (x - dx, y - dy);
                let ink = (0..8).contains(&sx)
                    && (0..8).contains(&sy)
                    && GLYPHS[digit][sy as usize].as_bytes()[sx as usize] == b'#';
                let value = if ink { 0.6 + 0.4 * uniform() } else { 0.0 } + 0.25 * uniform();
                data.samples.push(value.min(1.0));
            }
        }
        data.labels.push(digit as u8);
    }
    data
}
