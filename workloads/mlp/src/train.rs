//! The forward pass, evaluation and mini-batch SGD.
//!
//! Every sum here runs in one fixed order (index order, bias first) in `f32`; together with
//! [`crate::math`] that makes training bitwise reproducible. Keep it that way: reordering a
//! loop, splitting a sum or adding threads changes the trained bits, and with them the hashes
//! that replicas of a training job are compared by.

use crate::kernel::{axpy, matvec, outer_add, relu};
use crate::math;
use crate::model::Layout;
use crate::{Dataset, Model};

/// The class probabilities (softmax of the outputs) for one input.
///
/// # Panics
///
/// If the model is inconsistent ([`Model::check`]) or `input.len() != model.inputs`.
pub fn forward(model: &Model, input: &[f32]) -> Vec<f32> {
    let layout = Layout::of(model);
    assert_eq!(input.len(), layout.inputs, "forward: input length must equal model.inputs");
    let mut scratch = Scratch::new(&layout);
    forward_into(&model.params, &layout, input, &mut scratch);
    scratch.probs
}

/// The most likely class for one input (the lowest index on a tie).
///
/// # Panics
///
/// As [`forward`].
pub fn predict(model: &Model, input: &[f32]) -> usize {
    let layout = Layout::of(model);
    assert_eq!(input.len(), layout.inputs, "predict: input length must equal model.inputs");
    let mut scratch = Scratch::new(&layout);
    forward_into(&model.params, &layout, input, &mut scratch);
    argmax(&scratch.logits)
}

/// Mean cross-entropy and accuracy (fraction of samples whose [`predict`]ion equals the label)
/// over `data`. An empty dataset gives `(0.0, 0.0)`.
///
/// # Panics
///
/// If [`Model::check_dataset`] fails.
pub fn loss_and_accuracy(model: &Model, data: &Dataset) -> (f32, f32) {
    if let Err(err) = model.check_dataset(data) {
        panic!("loss_and_accuracy: {err}");
    }
    if data.is_empty() {
        return (0.0, 0.0);
    }
    let layout = Layout::of(model);
    let mut scratch = Scratch::new(&layout);
    // The mean is taken in f64 so that 1797 small terms lose nothing; it is still one fixed
    // order of exact IEEE operations, so still reproducible.
    let mut loss_sum = 0.0_f64;
    let mut correct = 0_usize;
    for (index, &label) in data.labels.iter().enumerate() {
        let label = usize::from(label);
        let norm = forward_into(&model.params, &layout, data.sample(index), &mut scratch);
        loss_sum += f64::from(norm.loss(&scratch.logits, label));
        if argmax(&scratch.logits) == label {
            correct += 1;
        }
    }
    let count = data.len() as f64;
    ((loss_sum / count) as f32, (correct as f64 / count) as f32)
}

/// Trains a copy of `model` on `data` by mini-batch SGD and returns it.
///
/// Each epoch walks the samples in dataset order in batches of `batch_size` (the last batch
/// may be smaller); for each batch the gradient of the summed cross-entropy is averaged over
/// the batch and `learning_rate` times it is subtracted from the parameters. No shuffling, no
/// momentum, no randomness: the same arguments give bitwise the same result on every platform.
/// An empty dataset or zero epochs returns the model unchanged. A learning rate that is too
/// large makes the parameters overflow to infinity or NaN; callers that need finite models
/// must check (`decode` refuses non-finite values).
///
/// # Panics
///
/// If [`Model::check_dataset`] fails or `batch_size` is 0.
pub fn train(
    model: &Model,
    data: &Dataset,
    epochs: u32,
    learning_rate: f32,
    batch_size: u32,
) -> Model {
    if let Err(err) = model.check_dataset(data) {
        panic!("train: {err}");
    }
    assert!(batch_size > 0, "train: batch_size must be at least 1");
    let layout = Layout::of(model);
    let mut params = model.params.clone();
    let batch_size = batch_size as usize;
    // The digits network gets its own copy of the loop in which every length is a constant,
    // so the compiler knows each kernel loop's trip count and unrolls it: the same operations
    // in the same order (the same bits), far fewer loop iterations. That matters most in the
    // sandbox, where each iteration also pays wasmtime's epoch check and fuel count.
    if layout == Layout::DIGITS {
        run_epochs(&mut params, &Layout::DIGITS, data, epochs, learning_rate, batch_size);
    } else {
        run_epochs(&mut params, &layout, data, epochs, learning_rate, batch_size);
    }
    Model { inputs: model.inputs, hidden: model.hidden, outputs: model.outputs, params }
}

/// [`train`]'s epochs, in place on `params`. Inlined into each call, so a constant `layout`
/// makes every slice length below a constant.
#[inline(always)]
fn run_epochs(
    params: &mut [f32],
    layout: &Layout,
    data: &Dataset,
    epochs: u32,
    learning_rate: f32,
    batch_size: usize,
) {
    let mut grad = vec![0.0_f32; layout.total];
    let grad = &mut grad[..layout.total];
    let params = &mut params[..layout.total];
    let mut scratch = Scratch::new(layout);
    for _ in 0..epochs {
        let mut start = 0;
        while start < data.len() {
            let end = data.len().min(start.saturating_add(batch_size));
            grad.fill(0.0);
            for index in start..end {
                let label = usize::from(data.labels[index]);
                let sample = data.sample(index);
                accumulate_gradient(params, layout, sample, label, &mut scratch, grad);
            }
            let step = learning_rate / (end - start) as f32;
            // params -= step * grad, element by element.
            axpy(params, -step, grad);
            start = end;
        }
    }
}

/// Activations for one sample, reused across samples so a training step does not allocate.
struct Scratch {
    /// Hidden activations after ReLU.
    hidden: Vec<f32>,
    /// Output pre-activations.
    logits: Vec<f32>,
    /// Softmax of `logits`; during backprop, the gradient of the loss with respect to `logits`.
    probs: Vec<f32>,
    /// During backprop, the gradient of the loss with respect to the hidden activations.
    hidden_grad: Vec<f32>,
    /// During backprop, the hidden units that were active (ReLU passed them), first.
    active: Vec<usize>,
}

impl Scratch {
    fn new(layout: &Layout) -> Self {
        Self {
            hidden: vec![0.0; layout.hidden],
            logits: vec![0.0; layout.outputs],
            probs: vec![0.0; layout.outputs],
            hidden_grad: vec![0.0; layout.hidden],
            active: vec![0; layout.hidden],
        }
    }
}

/// The softmax normaliser: `logsumexp(logits) = max + ln_sum`.
#[derive(Debug, Clone, Copy)]
struct Normaliser {
    max: f32,
    ln_sum: f32,
}

impl Normaliser {
    /// Cross-entropy of the class `label`: `logsumexp(z) - z[label]`, arranged so that it
    /// neither overflows nor takes the log of an underflowed probability.
    fn loss(self, logits: &[f32], label: usize) -> f32 {
        self.ln_sum - (logits[label] - self.max)
    }
}

/// Computes the hidden activations, logits and probabilities of `input` into `scratch`.
#[inline(always)]
fn forward_into(
    params: &[f32],
    layout: &Layout,
    input: &[f32],
    scratch: &mut Scratch,
) -> Normaliser {
    let (inputs, hidden, outputs) = (layout.inputs, layout.hidden, layout.outputs);
    let input = &input[..inputs];
    let activations = &mut scratch.hidden[..hidden];
    let logits = &mut scratch.logits[..outputs];
    // hidden = relu(b1 + W1 input), logits = b2 + W2 hidden; each row's sum is `dot`'s.
    let (w1, b1) = (&params[layout.w1..layout.b1], &params[layout.b1..layout.w2]);
    let (w2, b2) = (&params[layout.w2..layout.b2], &params[layout.b2..layout.total]);
    matvec(w1, input, b1, activations);
    relu(activations);
    matvec(w2, activations, b2, logits);
    softmax(logits, &mut scratch.probs[..outputs])
}

/// Writes `softmax(logits)` into `probs`, subtracting the maximum first so `exp` cannot
/// overflow.
#[inline(always)]
fn softmax(logits: &[f32], probs: &mut [f32]) -> Normaliser {
    let max = logits.iter().fold(f32::NEG_INFINITY, |max, &z| if z > max { z } else { max });
    let mut sum = 0.0_f32;
    for (p, &z) in probs.iter_mut().zip(logits) {
        *p = math::exp(z - max);
        sum += *p;
    }
    for p in probs.iter_mut() {
        *p /= sum;
    }
    Normaliser { max, ln_sum: math::ln(sum) }
}

/// The first index of the largest value (NaNs never win).
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (index, &value) in values.iter().enumerate() {
        if value > values[best] || values[best].is_nan() {
            best = index;
        }
    }
    best
}

/// Adds the gradient of one sample's cross-entropy to `grad` (same layout as the params).
#[inline(always)]
fn accumulate_gradient(
    params: &[f32],
    layout: &Layout,
    input: &[f32],
    label: usize,
    scratch: &mut Scratch,
    grad: &mut [f32],
) {
    let (inputs, hidden, outputs) = (layout.inputs, layout.hidden, layout.outputs);
    let input = &input[..inputs];
    forward_into(params, layout, input, scratch);
    // d loss / d logits = softmax - one_hot(label).
    scratch.probs[label] -= 1.0;
    let Scratch { hidden: activations, probs: logits_grad, hidden_grad, active, .. } = scratch;
    let activations = &activations[..hidden];
    let logits_grad = &logits_grad[..outputs];
    let hidden_grad = &mut hidden_grad[..hidden];
    // One pass over the output rows gives both the w2 gradient and d loss / d hidden. Each
    // hidden_grad[j] still sums w2[o][j] * g[o] from 0.0 in output order, as a per-unit loop
    // would, but the inner loops run along contiguous rows, so they vectorize.
    hidden_grad.fill(0.0);
    for (o, &g) in logits_grad.iter().enumerate() {
        grad[layout.b2 + o] += g;
        let at = layout.w2 + o * hidden;
        let weights = &params[at..at + hidden];
        axpy(&mut grad[at..at + hidden], g, activations);
        axpy(hidden_grad, g, weights);
    }
    // ReLU passes gradient only through units that were active. Without a branch: an
    // inactive unit adds +0.0, which leaves every value but -0.0 as it was, and a gradient
    // entry is never -0.0 (it starts at +0.0, and a sum is -0.0 only if both terms are).
    let active = &mut active[..hidden];
    let grad_b1 = &mut grad[layout.b1..layout.b1 + hidden];
    let mut count = 0;
    let mut unit = |j: usize| {
        let on = activations[j] > 0.0;
        grad_b1[j] += if on { hidden_grad[j] } else { 0.0 };
        active[count] = j;
        count += usize::from(on);
    };
    // Eight units per loop iteration, written out (in the sandbox each iteration also pays an
    // epoch check).
    let whole = hidden - hidden % 8;
    for j in (0..whole).step_by(8) {
        unit(j);
        unit(j + 1);
        unit(j + 2);
        unit(j + 3);
        unit(j + 4);
        unit(j + 5);
        unit(j + 6);
        unit(j + 7);
    }
    for j in whole..hidden {
        unit(j);
    }
    // w1 row j += d loss / d hidden[j] * input, for the active units.
    outer_add(
        &mut grad[layout.w1..layout.w1 + hidden * inputs],
        &active[..count],
        hidden_grad,
        input,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Three well-separated clusters in 4 dimensions: class `c` is bright in feature `c`.
    fn clusters(per_class: usize, seed: u64) -> Dataset {
        let mut rng = SplitMix64::new(seed);
        let mut data = Dataset { features: 4, samples: Vec::new(), labels: Vec::new() };
        for index in 0..3 * per_class {
            let class = index % 3;
            for feature in 0..4 {
                let noise = 0.2 * rng.next_unit_f32();
                data.samples.push(if feature == class { 0.8 + noise } else { noise });
            }
            data.labels.push(class as u8);
        }
        data
    }

    /// [`clusters`] stretched to the digits model's 64 features (a digits-shaped dataset).
    fn wide_clusters(per_class: usize, seed: u64) -> Dataset {
        let data = clusters(per_class, seed);
        Dataset {
            features: 64,
            samples: data.samples.iter().cycle().take(data.len() * 64).copied().collect(),
            labels: data.labels,
        }
    }

    fn bits(model: &Model) -> Vec<u32> {
        model.params.iter().map(|p| p.to_bits()).collect()
    }

    #[test]
    fn training_lowers_the_loss_on_separable_data() {
        let data = clusters(20, 1);
        let model = Model::init_with_dims(4, 8, 3, 5);
        let (loss_before, _) = loss_and_accuracy(&model, &data);
        let trained = train(&model, &data, 30, 0.5, 8);
        let (loss_after, accuracy_after) = loss_and_accuracy(&trained, &data);
        assert!(loss_after < 0.5 * loss_before, "loss {loss_before} -> {loss_after}");
        assert_eq!(accuracy_after, 1.0);
    }

    #[test]
    fn training_twice_gives_bitwise_identical_params() {
        let model = Model::init(11);
        let wide = wide_clusters(30, 2);
        let a = train(&model, &wide, 3, 0.1, 7);
        let b = train(&model, &wide, 3, 0.1, 7);
        assert_eq!(bits(&a), bits(&b));
        assert_ne!(bits(&a), bits(&model), "training changed nothing");
    }

    /// FNV-1a over the parameters' bits.
    fn fingerprint(model: &Model) -> u64 {
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        for byte in model.params.iter().flat_map(|p| p.to_le_bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        hash
    }

    #[test]
    fn trained_bits_are_pinned() {
        // Replicas of a training job are compared by hash, and a relay may check a node's
        // delta by recomputing it: every build of this crate, on every platform, must train
        // to the same bits. If you changed the arithmetic on purpose, update the constant and
        // say in the changelog that deltas from older nodes will no longer match.
        let wide = wide_clusters(40, 6);
        let trained = train(&Model::init(3), &wide, 2, 0.05, 16);
        assert_eq!(
            fingerprint(&trained),
            0x0ca4_a3fd_c957_fb1d,
            "fingerprint {:#018x}",
            fingerprint(&trained)
        );
    }

    #[test]
    fn the_digits_copy_of_the_loop_gives_the_generic_loops_bits() {
        let wide = wide_clusters(40, 9);
        let model = Model::init(5);
        assert_eq!(Layout::of(&model), Layout::DIGITS);
        // `train` takes the constant-layout copy; a layout the compiler cannot see through
        // takes the generic one.
        let specialised = train(&model, &wide, 3, 0.1, 16);
        let mut params = model.params.clone();
        run_epochs(&mut params, &std::hint::black_box(Layout::DIGITS), &wide, 3, 0.1, 16);
        assert_eq!(bits(&specialised), params.iter().map(|p| p.to_bits()).collect::<Vec<_>>());
        assert_ne!(bits(&specialised), bits(&model), "training changed nothing");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let data = clusters(1, 3);
        let model = Model::init_with_dims(4, 5, 3, 8);
        let layout = Layout::of(&model);
        let (input, label) = (data.sample(1), usize::from(data.labels[1]));
        let mut scratch = Scratch::new(&layout);
        let mut grad = vec![0.0; layout.total];
        accumulate_gradient(&model.params, &layout, input, label, &mut scratch, &mut grad);

        let loss_at = |params: &[f32]| {
            let mut scratch = Scratch::new(&layout);
            let norm = forward_into(params, &layout, input, &mut scratch);
            f64::from(norm.loss(&scratch.logits, label))
        };
        for index in 0..layout.total {
            let eps = 1e-2_f32;
            let mut plus = model.params.clone();
            plus[index] += eps;
            let mut minus = model.params.clone();
            minus[index] -= eps;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * f64::from(eps));
            let analytic = f64::from(grad[index]);
            assert!(
                (numeric - analytic).abs() < 2e-3 + 2e-2 * analytic.abs(),
                "param {index}: analytic {analytic}, numeric {numeric}"
            );
        }
    }

    #[test]
    fn probabilities_sum_to_one_and_predict_agrees() {
        let model = Model::init(4);
        let input: Vec<f32> = (0..64).map(|i| (i % 17) as f32 / 16.0).collect();
        let probs = forward(&model, &input);
        assert_eq!(probs.len(), 10);
        let sum: f32 = probs.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "sum {sum}");
        let best = probs.iter().enumerate().fold(0, |b, (i, &p)| if p > probs[b] { i } else { b });
        assert_eq!(predict(&model, &input), best);
    }

    #[test]
    fn empty_data_and_zero_epochs_change_nothing() {
        let model = Model::init_with_dims(4, 3, 3, 1);
        let empty = Dataset { features: 4, samples: vec![], labels: vec![] };
        assert_eq!(loss_and_accuracy(&model, &empty), (0.0, 0.0));
        assert_eq!(train(&model, &empty, 5, 0.1, 4), model);
        assert_eq!(train(&model, &clusters(2, 1), 0, 0.1, 4), model);
    }

    #[test]
    fn fresh_model_has_chance_level_loss() {
        // A small random init gives near-uniform outputs: loss close to ln(10).
        let data = clusters(5, 9);
        let model = Model::init_with_dims(4, 32, 10, 3);
        let (loss, _) = loss_and_accuracy(&model, &data);
        assert!((loss - 10f32.ln()).abs() < 0.5, "loss {loss}");
    }

    #[test]
    #[should_panic(expected = "features")]
    fn training_on_mismatched_data_panics_with_the_reason() {
        let _ = train(&Model::init(0), &clusters(1, 0), 1, 0.1, 1);
    }
}
