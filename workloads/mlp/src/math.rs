//! `exp` and `ln` from basic IEEE-754 operations only.
//!
//! `f32::exp` and `f32::ln` call the platform's maths library (glibc on Linux, wasi-libc in the
//! sandbox, something else on macOS), and those may round the last bit differently. Training
//! must give the same bits everywhere, so these are computed here in `f64` with `+ - * /` and
//! bit manipulation, all of which IEEE-754 defines exactly, then rounded once to `f32`.
//! The results are within one `f32` ulp of the true values, which is all training needs.

use std::f64::consts::{LN_2, LOG2_E, SQRT_2};

/// `1 / n!` for n = 0..=11, each the f64 nearest the exact value (written as the shortest
/// decimal that reads back as it).
const INV_FACTORIAL: [f64; 12] = [
    1.0,
    1.0,
    0.5,
    0.16666666666666666,
    0.041666666666666664,
    0.008333333333333333,
    0.001388888888888889,
    0.0001984126984126984,
    2.48015873015873e-05,
    2.7557319223985893e-06,
    2.755731922398589e-07,
    2.505210838544172e-08,
];

/// `e^x`, deterministic on every platform.
pub(crate) fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > 88.8 {
        return f32::INFINITY;
    }
    if x < -104.0 {
        return 0.0;
    }
    let x = f64::from(x);
    // x = k ln2 + r with |r| <= ln2 / 2, so e^x = 2^k e^r.
    let k = (x * LOG2_E + 0.5).floor();
    let r = x - k * LN_2;
    // Taylor series of e^r to r^11 / 11!, in Horner form from the highest term: the remainder
    // is below 1e-14 relative for |r| <= 0.35, far under an f32 ulp. Written out rather than
    // looped (in the sandbox every loop iteration also pays wasmtime's epoch check, and this
    // runs ten times per sample) and without a division (the coefficients are 1/n! rounded
    // once to f64, constants here).
    let mut sum = INV_FACTORIAL[11];
    macro_rules! horner {
        ($($n:literal)*) => { $( sum = sum * r + INV_FACTORIAL[$n]; )* };
    }
    horner!(10 9 8 7 6 5 4 3 2 1 0);
    // k is in [-150, 129], so 2^k is a normal f64 and the exponent field cannot overflow.
    let scale = f64::from_bits(((k as i64 + 1023) as u64) << 52);
    (sum * scale) as f32
}

/// The natural logarithm, deterministic on every platform. `ln(0) = -inf`, `ln(x < 0) = NaN`.
pub(crate) fn ln(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    // Every positive f32, subnormals included, is a normal f64: split it into m 2^e.
    let bits = f64::from(x).to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    if m > SQRT_2 {
        m /= 2.0;
        e += 1;
    }
    // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172: the series to s^21 is exact
    // well past f32 precision.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut power = s;
    let mut sum = 0.0_f64;
    macro_rules! terms {
        ($($n:literal)*) => { $( sum += power / $n; power *= s2; )* };
    }
    terms!(1.0 3.0 5.0 7.0 9.0 11.0 13.0 15.0 17.0 19.0 21.0);
    (e as f64 * LN_2 + 2.0 * sum) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32s of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn exp_matches_std_within_one_ulp() {
        let mut x = -103.0_f32;
        while x < 88.0 {
            let ours = exp(x);
            let theirs = x.exp();
            assert!(ulps(ours, theirs) <= 1, "exp({x}) = {ours}, std says {theirs}");
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn ln_matches_std_within_one_ulp() {
        let mut x = 1.0e-40_f32;
        while x < 1.0e38 {
            let ours = ln(x);
            let theirs = x.ln();
            assert!(ulps(ours, theirs) <= 1, "ln({x}) = {ours}, std says {theirs}");
            x *= 1.013;
        }
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert!(ln(-1.0).is_nan());
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
    }
}
