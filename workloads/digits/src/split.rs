//! The fixed train/test split and the participants' chunks.
//!
//! Every function here is deterministic: the same data and seed give the same samples in the
//! same order. Shuffles are Fisher–Yates driven by a ChaCha8 generator seeded from a `u64`.

use aimatrix_mlp::Dataset;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use crate::CLASSES;

/// The seed of the one train/test split every result in this project is measured on.
pub const SPLIT_SEED: u64 = 0x6469_6769_7473; // "digits"
/// The share of each class held out for testing.
pub const TEST_SHARE: f64 = 0.25;

/// The project's train/test split of [`crate::load`]: stratified, 25 % of each class held
/// out, seed [`SPLIT_SEED`]. 1,347 training and 450 test samples.
pub fn train_test() -> (Dataset, Dataset) {
    stratified_split(&crate::load(), TEST_SHARE, SPLIT_SEED)
}

/// Splits `data` into `(train, test)`, stratified by class as scikit-learn's
/// `train_test_split(stratify=y)` is: `ceil(test_share · n)` samples are held out in all, each
/// class gets `floor(test_share · count)` of them and the rest go one each to the classes with
/// the largest fractional parts (ties: the lower class). Which samples of a class are held out
/// is decided by a seeded shuffle of that class. The test set is in the data's
/// original order; the training set is shuffled once more, so that a model trained on it in
/// order (as [`aimatrix_mlp::train`] does) does not see the classes one after another.
///
/// # Panics
///
/// If `test_share` is not in `[0, 1]`.
pub fn stratified_split(data: &Dataset, test_share: f64, seed: u64) -> (Dataset, Dataset) {
    assert!((0.0..=1.0).contains(&test_share), "test_share must be in [0, 1]");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); CLASSES];
    for (index, &label) in data.labels.iter().enumerate() {
        by_class[usize::from(label)].push(index);
    }
    let held_out = test_counts(&by_class, test_share, data.len());
    let mut test = Vec::new();
    let mut train = Vec::new();
    for (mut indices, held_out) in by_class.into_iter().zip(held_out) {
        shuffle(&mut indices, &mut rng);
        test.extend_from_slice(&indices[..held_out]);
        train.extend_from_slice(&indices[held_out..]);
    }
    test.sort_unstable();
    shuffle(&mut train, &mut rng);
    (subset(data, &train), subset(data, &test))
}

/// How many samples of each class to hold out (the rule on [`stratified_split`]).
fn test_counts(by_class: &[Vec<usize>], test_share: f64, total: usize) -> Vec<usize> {
    let wanted = (test_share * total as f64 - 1e-9).ceil().max(0.0) as usize;
    let exact: Vec<f64> = by_class.iter().map(|c| test_share * c.len() as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|&e| (e + 1e-9).floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
    by_remainder.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - counts[a] as f64, exact[b] - counts[b] as f64);
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let missing = wanted.saturating_sub(counts.iter().sum());
    for &class in by_remainder.iter().take(missing) {
        counts[class] += 1;
    }
    counts
}

/// Deals `data` into `n` IID chunks: one seeded shuffle, then consecutive slices whose sizes
/// differ by at most one.
///
/// # Panics
///
/// If `n` is 0.
pub fn iid_chunks(data: &Dataset, n: usize, seed: u64) -> Vec<Dataset> {
    assert!(n > 0, "iid_chunks: n must be at least 1");
    let mut order: Vec<usize> = (0..data.len()).collect();
    shuffle(&mut order, &mut ChaCha8Rng::seed_from_u64(seed));
    (0..n).map(|i| subset(data, &order[i * order.len() / n..(i + 1) * order.len() / n])).collect()
}

/// Deals `data` into `n` non-IID chunks, as McMahan et al. did for MNIST: sort the samples by
/// label, cut them into `n · shards_per_chunk` equal shards, and give each chunk
/// `shards_per_chunk` shards picked at random. With 2 shards per chunk most participants see
/// only two or three digits.
///
/// # Panics
///
/// If `n` or `shards_per_chunk` is 0.
pub fn non_iid_chunks(
    data: &Dataset,
    n: usize,
    shards_per_chunk: usize,
    seed: u64,
) -> Vec<Dataset> {
    assert!(
        n > 0 && shards_per_chunk > 0,
        "non_iid_chunks: n and shards_per_chunk must be positive"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    // Stable: within a label, the data's order.
    order.sort_by_key(|&index| data.labels[index]);
    let shards = n * shards_per_chunk;
    let mut shard_ids: Vec<usize> = (0..shards).collect();
    shuffle(&mut shard_ids, &mut rng);
    let shard = |s: usize| &order[s * order.len() / shards..(s + 1) * order.len() / shards];
    shard_ids
        .chunks(shards_per_chunk)
        .map(|ids| {
            let indices: Vec<usize> = ids.iter().flat_map(|&s| shard(s).iter().copied()).collect();
            subset(data, &indices)
        })
        .collect()
}

/// The same dataset with every label `l` replaced by `9 − l`: what a label-flipping attacker
/// trains on.
pub fn flip_labels(data: &Dataset) -> Dataset {
    let labels = data.labels.iter().map(|&l| (CLASSES as u8 - 1).saturating_sub(l)).collect();
    Dataset { features: data.features, samples: data.samples.clone(), labels }
}

/// The samples at `indices`, in that order.
pub fn subset(data: &Dataset, indices: &[usize]) -> Dataset {
    let mut samples = Vec::with_capacity(indices.len() * data.features);
    for &index in indices {
        samples.extend_from_slice(data.sample(index));
    }
    let labels = indices.iter().map(|&index| data.labels[index]).collect();
    Dataset { features: data.features, samples, labels }
}

/// Fisher–Yates, from the last element down.
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class_counts(data: &Dataset) -> [usize; CLASSES] {
        let mut counts = [0; CLASSES];
        for &label in &data.labels {
            counts[usize::from(label)] += 1;
        }
        counts
    }

    #[test]
    fn the_split_is_stratified_disjoint_and_fixed() {
        let all = crate::load();
        let (train, test) = train_test();
        assert_eq!((train.len(), test.len()), (1347, 450));
        let (all_counts, test_counts) = (class_counts(&all), class_counts(&test));
        for class in 0..CLASSES {
            let exact = 0.25 * all_counts[class] as f64;
            let count = test_counts[class] as f64;
            assert!(count == exact.floor() || count == exact.ceil(), "class {class}: {count}");
        }
        // Every sample lands in exactly one side: compare as multisets of rows.
        let rows = |d: &Dataset| {
            let mut rows: Vec<Vec<u32>> = (0..d.len())
                .map(|i| {
                    let mut row: Vec<u32> = d.sample(i).iter().map(|p| p.to_bits()).collect();
                    row.push(u32::from(d.labels[i]));
                    row
                })
                .collect();
            rows.sort();
            rows
        };
        let mut both = rows(&train);
        both.extend(rows(&test));
        both.sort();
        assert_eq!(both, rows(&all));
        // Fixed: the same call gives the same data; another seed gives another split.
        let (train_again, test_again) = train_test();
        assert_eq!((train_again, test_again), (train.clone(), test.clone()));
        let (other, _) = stratified_split(&all, TEST_SHARE, SPLIT_SEED + 1);
        assert_ne!(other, train);
        // The training order is mixed: the first 50 samples hold at least 8 classes.
        let first: std::collections::BTreeSet<u8> = train.labels[..50].iter().copied().collect();
        assert!(first.len() >= 8, "{first:?}");
    }

    #[test]
    fn iid_chunks_cover_the_data_evenly() {
        let (train, _) = train_test();
        let chunks = iid_chunks(&train, 10, 1);
        let sizes: Vec<usize> = chunks.iter().map(Dataset::len).collect();
        assert!(sizes.iter().all(|&s| s == 134 || s == 135), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), train.len());
        // IID: every chunk has every class.
        for chunk in &chunks {
            assert!(class_counts(chunk).iter().all(|&c| c >= 3), "{:?}", class_counts(chunk));
        }
        assert_eq!(iid_chunks(&train, 10, 1), chunks);
        assert_ne!(iid_chunks(&train, 10, 2), chunks);
    }

    #[test]
    fn non_iid_chunks_see_few_classes() {
        let (train, _) = train_test();
        let chunks = non_iid_chunks(&train, 10, 2, 3);
        assert_eq!(chunks.len(), 10);
        assert_eq!(chunks.iter().map(Dataset::len).sum::<usize>(), train.len());
        for chunk in &chunks {
            let present = class_counts(chunk).iter().filter(|&&c| c > 0).count();
            assert!(present <= 4, "a non-IID chunk has {present} classes");
        }
    }

    #[test]
    fn flipping_maps_each_label_to_nine_minus_it() {
        let data = Dataset { features: 1, samples: vec![0.0, 1.0, 2.0], labels: vec![0, 4, 9] };
        assert_eq!(flip_labels(&data).labels, vec![9, 5, 0]);
        assert_eq!(flip_labels(&data).samples, data.samples);
    }
}
