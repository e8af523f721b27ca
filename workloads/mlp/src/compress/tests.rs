use proptest::prelude::*;

use super::*;
use crate::rng::SplitMix64;

fn sample_delta(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| (rng.next_unit_f32() - 0.5) * 0.02).collect()
}

const ALL: [Codec; 5] = [
    Codec::None,
    Codec::Fp16,
    Codec::Int8 { block: 256 },
    Codec::Int8 { block: 1 },
    Codec::TopK { fraction: 0.01 },
];

#[test]
fn f16_known_values() {
    let cases: [(f32, u16); 14] = [
        (0.0, 0x0000),
        (-0.0, 0x8000),
        (1.0, 0x3c00),
        (-2.0, 0xc000),
        (0.1, 0x2e66),
        (65504.0, 0x7bff),
        (65519.99, 0x7bff),
        (65520.0, 0x7c00), // halfway to the next (infinite) step: ties to even, infinity
        (1e10, 0x7c00),
        (6.103_515_6e-5, 0x0400), // 2^-14, the smallest normal
        (5.960_464_5e-8, 0x0001), // 2^-24, the smallest subnormal
        (2.980_232_2e-8, 0x0000), // 2^-25: a tie between 0 and 2^-24, to even
        (4.470_348_4e-8, 0x0001), // 1.5 * 2^-25 rounds up
        (f32::NEG_INFINITY, 0xfc00),
    ];
    for (x, half) in cases {
        assert_eq!(f32_to_f16_bits(x), half, "{x}: {:#06x}", f32_to_f16_bits(x));
    }
    assert!(f16_bits_to_f32(f32_to_f16_bits(f32::NAN)).is_nan());
    // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: to even (1). 1 + 3·2^-11: up.
    assert_eq!(f32_to_f16_bits(1.0 + 1.0 / 2048.0), 0x3c00);
    assert_eq!(f32_to_f16_bits(1.0 + 3.0 / 2048.0), 0x3c02);
}

#[test]
fn every_half_survives_a_trip_through_f32() {
    for half in 0..=u16::MAX {
        let x = f16_bits_to_f32(half);
        if x.is_nan() {
            assert!(f16_bits_to_f32(f32_to_f16_bits(x)).is_nan());
        } else {
            assert_eq!(f32_to_f16_bits(x), half, "{half:#06x} -> {x}");
        }
    }
}

/// Checks `f32_to_f16_bits(x)` is the nearest half, ties to even, by looking at its
/// neighbours.
fn assert_nearest_even(x: f32) {
    let half = f32_to_f16_bits(x);
    let ours = f64::from(f16_bits_to_f32(half));
    let x64 = f64::from(x);
    let error = (ours - x64).abs();
    for neighbour in [half.wrapping_sub(1), half.wrapping_add(1)] {
        // Stay on the same sign and among finite values.
        if neighbour & 0x8000 != half & 0x8000 || neighbour & 0x7c00 == 0x7c00 {
            continue;
        }
        let theirs = (f64::from(f16_bits_to_f32(neighbour)) - x64).abs();
        assert!(error <= theirs, "{x}: {half:#06x} is not nearest ({neighbour:#06x} is)");
        if error == theirs {
            assert_eq!(half & 1, 0, "{x}: tie not broken to even");
        }
    }
}

#[test]
fn f32_to_f16_rounds_to_nearest_even() {
    let mut rng = SplitMix64::new(11);
    let mut checked = 0;
    while checked < 200_000 {
        let x = f32::from_bits(rng.next_u64() as u32);
        // Everything with a finite half: |x| below 65520.
        if x.is_finite() && x.abs() < 65520.0 {
            assert_nearest_even(x);
            checked += 1;
        }
    }
    // Every f32 between two adjacent halves in the normal and subnormal ranges.
    for start in [0x3c00_u16, 0x0001, 0x03ff, 0x7bfe] {
        let (lo, hi) = (f16_bits_to_f32(start), f16_bits_to_f32(start + 1));
        let mut bits = lo.to_bits();
        while f32::from_bits(bits) <= hi {
            assert_nearest_even(f32::from_bits(bits));
            bits += 1;
        }
    }
}

#[test]
fn documented_sizes_for_the_digits_model() {
    let n = 4810;
    assert_eq!(Codec::None.encoded_len(n), 19_260);
    assert_eq!(Codec::Fp16.encoded_len(n), 9_640);
    assert_eq!(Codec::int8().encoded_len(n), 4_906);
    assert_eq!(Codec::topk_count(0.01, n), 49);
    assert_eq!(Codec::topk().encoded_len(n), 412);
    assert_eq!(Codec::topk_count(0.01, 4800), 48, "an exact product must not round up");
    assert_eq!(Codec::topk_count(1e-9, 10), 1);
    assert_eq!(Codec::topk_count(1.0, 10), 10);
    assert_eq!(Codec::topk_count(0.5, 0), 0);
    for codec in ALL {
        assert_eq!(compress(codec, &sample_delta(n, 1)).len(), codec.encoded_len(n));
    }
}

#[test]
fn each_codec_reconstructs_within_its_error_bound() {
    let delta = sample_delta(1000, 2);
    let max = delta.iter().fold(0.0_f32, |m, x| m.max(x.abs()));
    let none = decompress(&compress(Codec::None, &delta), 1000).unwrap();
    assert_eq!(none, delta);
    let half = decompress(&compress(Codec::Fp16, &delta), 1000).unwrap();
    for (x, y) in delta.iter().zip(&half) {
        // Half precision keeps 11 significant bits (and subnormals below 6e-5 keep less).
        assert!((x - y).abs() <= x.abs() / 2048.0 + 3e-8, "{x} vs {y}");
    }
    let int8 = decompress(&compress(Codec::Int8 { block: 1000 }, &delta), 1000).unwrap();
    for (x, y) in delta.iter().zip(&int8) {
        assert!((x - y).abs() <= max / 127.0 / 2.0 * 1.0001, "{x} vs {y}");
    }
    let sparse = decompress(&compress(Codec::TopK { fraction: 0.05 }, &delta), 1000).unwrap();
    let kept: Vec<usize> = (0..1000).filter(|&i| sparse[i] != 0.0).collect();
    assert_eq!(kept.len(), 50);
    let smallest_kept = kept.iter().map(|&i| delta[i].abs()).fold(f32::INFINITY, f32::min);
    for i in 0..1000 {
        if sparse[i] == 0.0 {
            assert!(
                delta[i].abs() <= smallest_kept,
                "dropped {} but kept {smallest_kept}",
                delta[i]
            );
        } else {
            assert_eq!(sparse[i], delta[i]);
        }
    }
}

#[test]
fn int8_edge_cases() {
    let zeros = vec![0.0_f32; 10];
    assert_eq!(decompress(&compress(Codec::int8(), &zeros), 10).unwrap(), zeros);
    // The block maximum is exact (q = ±127 times its scale), whatever the rounding of x / s.
    let values = [0.3_f32, -0.7, 0.0001, 0.7];
    let back = decompress(&compress(Codec::Int8 { block: 4 }, &values), 4).unwrap();
    assert!((back[1] + 0.7).abs() < 1e-6 && (back[3] - 0.7).abs() < 1e-6, "{back:?}");
    // Blocks are independent: a huge value in one block does not flatten the next.
    let values = [1000.0_f32, 0.0, 0.001, 0.002];
    let back = decompress(&compress(Codec::Int8 { block: 2 }, &values), 4).unwrap();
    assert!((back[3] - 0.002).abs() < 1e-5 && back[2] > 0.0, "{back:?}");
}

#[test]
fn fp16_saturates_instead_of_overflowing() {
    let back = decompress(&compress(Codec::Fp16, &[1e9, -1e9, 1.0]), 3).unwrap();
    assert_eq!(back, vec![F16_MAX, -F16_MAX, 1.0]);
}

#[test]
fn topk_ties_prefer_the_lower_index_and_indices_ascend() {
    let values = [1.0_f32, -3.0, 3.0, 0.5, -3.0];
    let bytes = compress(Codec::TopK { fraction: 0.4 }, &values);
    // k = 2: three values tie at magnitude 3; indices 1 and 2 win.
    assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 8], &[1, 0, 0, 0, 2, 0, 0, 0]);
    assert_eq!(decompress(&bytes, 5).unwrap(), vec![0.0, -3.0, 3.0, 0.0, 0.0]);
}

#[test]
fn error_feedback_loses_nothing_for_good() {
    // Over many rounds, what was sent plus what is still held equals everything produced.
    for codec in [Codec::TopK { fraction: 0.01 }, Codec::Int8 { block: 64 }, Codec::Fp16] {
        let mut residual = Residual::new(500);
        let mut produced = vec![0.0_f64; 500];
        let mut sent = vec![0.0_f64; 500];
        for round in 0..40 {
            let delta = sample_delta(500, 100 + round);
            let bytes = residual.compress(codec, &delta);
            let got = decompress(&bytes, 500).unwrap();
            for i in 0..500 {
                produced[i] += f64::from(delta[i]);
                sent[i] += f64::from(got[i]);
            }
        }
        for i in 0..500 {
            let held = f64::from(residual.values()[i]);
            assert!((produced[i] - sent[i] - held).abs() < 1e-5, "{} at {i}", codec.name());
        }
    }
    // Lossless: nothing is ever held back.
    let mut residual = Residual::new(3);
    residual.compress(Codec::None, &[1.0, 2.0, 3.0]);
    assert_eq!(residual.values(), &[0.0; 3]);
}

#[test]
fn error_feedback_eventually_sends_small_coordinates() {
    // A constant delta where one coordinate dominates: without feedback top-1 would send
    // coordinate 0 forever; with it, the others accumulate until they win.
    let delta = [1.0_f32, 0.3, 0.3, 0.3];
    let mut residual = Residual::new(4);
    let mut ever_sent = [false; 4];
    for _ in 0..8 {
        let got =
            decompress(&residual.compress(Codec::TopK { fraction: 0.25 }, &delta), 4).unwrap();
        for (flag, value) in ever_sent.iter_mut().zip(&got) {
            *flag |= *value != 0.0;
        }
    }
    assert_eq!(ever_sent, [true; 4]);
}

#[test]
fn decompress_explains_what_is_wrong() {
    let delta = sample_delta(10, 3);
    let good = compress(Codec::TopK { fraction: 0.3 }, &delta); // k = 3
    let err = decompress(&good, 11).unwrap_err();
    assert_eq!(err, UpdateFormatError::Count { expected: 11, found: 10 });
    assert!(err.to_string().contains("different model"), "{err}");

    let mut bytes = good.clone();
    bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(decompress(&bytes, 10), Err(UpdateFormatError::UnknownCodec { id: 9 }));

    let mut bytes = good.clone();
    bytes[16..20].copy_from_slice(&11u32.to_le_bytes());
    assert_eq!(
        decompress(&bytes, 10),
        Err(UpdateFormatError::Parameter { codec: "topk", value: 11 })
    );

    // A k that fits but a body for another k.
    let mut bytes = good.clone();
    bytes[16..20].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        decompress(&bytes, 10),
        Err(UpdateFormatError::Format(FormatError::Length { .. }))
    ));

    // Repeated and out-of-range indices.
    let mut bytes = good.clone();
    let first = bytes[20..24].to_vec();
    bytes[24..28].copy_from_slice(&first);
    assert!(matches!(decompress(&bytes, 10), Err(UpdateFormatError::Index { position: 1, .. })));
    let mut bytes = good.clone();
    bytes[28..32].copy_from_slice(&10u32.to_le_bytes());
    assert_eq!(decompress(&bytes, 10), Err(UpdateFormatError::Index { position: 2, index: 10 }));

    let mut bytes = good.clone();
    bytes[32..36].copy_from_slice(&f32::NAN.to_le_bytes());
    assert_eq!(decompress(&bytes, 10), Err(UpdateFormatError::Value { field: "value", index: 0 }));

    let int8 = compress(Codec::Int8 { block: 4 }, &delta); // 3 scales
    let mut bytes = int8.clone();
    bytes[20..24].copy_from_slice(&(-1.0_f32).to_le_bytes());
    assert_eq!(decompress(&bytes, 10), Err(UpdateFormatError::Value { field: "scale", index: 0 }));
    let mut bytes = int8.clone();
    bytes[20..24].copy_from_slice(&f32::MAX.to_le_bytes());
    bytes[32] = 127;
    assert_eq!(decompress(&bytes, 10), Err(UpdateFormatError::Value { field: "value", index: 0 }));
    let mut bytes = int8.clone();
    bytes[33] = 0x80;
    assert_eq!(decompress(&bytes, 10), Err(UpdateFormatError::Int8Range { index: 1 }));
    let mut bytes = int8;
    bytes[16..20].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        decompress(&bytes, 10),
        Err(UpdateFormatError::Parameter { codec: "int8", value: 0 })
    );

    let mut fp16 = compress(Codec::Fp16, &delta);
    fp16[22..24].copy_from_slice(&0x7c00u16.to_le_bytes());
    assert_eq!(decompress(&fp16, 10), Err(UpdateFormatError::Value { field: "value", index: 1 }));
    let mut none = compress(Codec::None, &delta);
    none[16] = 1;
    assert_eq!(
        decompress(&none, 10),
        Err(UpdateFormatError::Parameter { codec: "none", value: 1 })
    );

    let err = decompress(b"AMLD\x01\0\0\0", 10).unwrap_err();
    assert!(err.to_string().contains("bad magic"), "{err}");
    let mut future = good;
    future[4] = 2;
    assert!(matches!(
        decompress(&future, 10),
        Err(UpdateFormatError::Format(FormatError::UnsupportedVersion { found: 2, .. }))
    ));
}

#[test]
fn a_huge_claimed_count_is_refused_before_allocating() {
    let mut bytes = compress(Codec::None, &[1.0]);
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        decompress(&bytes, 1),
        Err(UpdateFormatError::Count { expected: 1, found: u32::MAX })
    );
    // Even for a model that big, the length check comes before any allocation.
    assert!(matches!(
        decompress(&bytes, u32::MAX as usize),
        Err(UpdateFormatError::Format(FormatError::Length { .. }))
    ));
    let mut topk = compress(Codec::TopK { fraction: 1.0 }, &[1.0]);
    topk[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(decompress(&topk, 1).is_err());
}

#[test]
fn codec_id_peeks_without_checking() {
    assert_eq!(codec_id(&compress(Codec::int8(), &[1.0])), Some(2));
    assert_eq!(codec_id(b"AMLC"), None);
    assert_eq!(codec_id(b"XXXXXXXXXXXX"), None);
}

fn codec_strategy() -> impl Strategy<Value = Codec> {
    prop_oneof![
        Just(Codec::None),
        Just(Codec::Fp16),
        (1u32..300).prop_map(|block| Codec::Int8 { block }),
        (0.001f64..=1.0).prop_map(|fraction| Codec::TopK { fraction }),
    ]
}

proptest! {
    #[test]
    fn roundtrip_is_within_the_codec_bound(
        codec in codec_strategy(),
        values in prop::collection::vec(-100.0f32..100.0, 0..400),
    ) {
        let bytes = compress(codec, &values);
        prop_assert_eq!(bytes.len(), codec.encoded_len(values.len()));
        let back = decompress(&bytes, values.len()).unwrap();
        prop_assert_eq!(back.len(), values.len());
        let max = values.iter().fold(0.0_f32, |m, x| m.max(x.abs()));
        for (x, y) in values.iter().zip(&back) {
            let bound = match codec {
                Codec::None => 0.0,
                Codec::Fp16 => x.abs() / 2048.0 + 3e-8,
                Codec::Int8 { .. } => max / 254.0 * 1.0001 + 1e-6,
                Codec::TopK { .. } => if *y == 0.0 { x.abs() } else { 0.0 },
            };
            prop_assert!((x - y).abs() <= bound, "{} {} vs {}", codec.name(), x, y);
        }
        // Compressing what came back changes nothing for the exact and half codecs.
        if matches!(codec, Codec::None | Codec::Fp16) {
            prop_assert_eq!(decompress(&compress(codec, &back), back.len()).unwrap(), back);
        }
    }

    #[test]
    fn decompress_never_panics_on_hostile_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        count in 0usize..64,
    ) {
        let _ = decompress(&bytes, count);
    }

    #[test]
    fn decompress_never_panics_on_mutated_updates(
        codec in codec_strategy(),
        values in prop::collection::vec(-1.0f32..1.0, 1..64),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = compress(codec, &values);
        let cut = cut.index(bytes.len());
        prop_assert!(decompress(&bytes[..cut], values.len()).is_err());
        for (at, byte) in flips {
            let at = at.index(bytes.len());
            bytes[at] = byte;
        }
        let _ = decompress(&bytes, values.len());
    }
}
