//! Arbitrary bytes as a compressed training update (`AMLC`), which the relay reads from every
//! participant with `aimatrix_mlp::decompress` and the model's parameter count: decoding must
//! never panic, and whatever decodes must be exactly that many finite values, which survive
//! the lossless codec unchanged and go through the relay's next step (`validate`).
#![no_main]

use aimatrix_mlp::compress::{codec_id, decompress, Codec};
use aimatrix_mlp::{validate, Model, NormCheck, HIDDEN, INPUTS, OUTPUTS};
use libfuzzer_sys::fuzz_target;

/// The most parameters an input may ask for through its own header (the model's count is the
/// relay's, not the sender's; this only bounds what the target allocates).
const PARAM_COUNT_MAX: usize = 1 << 16;

/// Where the count sits in the header: magic, version, codec, then the count.
const COUNT_AT: usize = 12;

fuzz_target!(|data: &[u8]| {
    let _ = codec_id(data);
    // The relay passes its model's parameter count, which random bytes would almost never
    // match; the count the input claims (when small) lets the fuzzer reach every body decoder.
    let standard = Model::param_count(INPUTS, HIDDEN, OUTPUTS);
    let claimed = data
        .get(COUNT_AT..COUNT_AT + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .filter(|&n| n <= PARAM_COUNT_MAX && n != standard);
    for param_count in std::iter::once(standard).chain(claimed) {
        check(data, param_count);
    }
});

fn check(data: &[u8], param_count: usize) {
    let values = match decompress(data, param_count) {
        Ok(values) => values,
        Err(error) => {
            // The reason is recorded in the round's history and shown to the job's owner.
            let _ = error.to_string();
            return;
        }
    };
    assert_eq!(values.len(), param_count, "decoded a different number of values");
    assert!(values.iter().all(|v| v.is_finite()), "decoded a value that is not finite");
    assert!(codec_id(data).is_some_and(|id| id <= 3), "decoded an unknown codec");

    let raw = aimatrix_mlp::compress(Codec::None, &values);
    let again = decompress(&raw, param_count).expect("a decoded update re-encodes losslessly");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_eq!(bits(&again), bits(&values), "lossless roundtrip changed a value");

    let verdicts = validate(&[&values[..]], param_count, &NormCheck::default());
    assert_eq!(verdicts.len(), 1);
}
