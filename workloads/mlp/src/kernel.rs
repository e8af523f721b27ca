//! The vector loops training spends its time in, written so that the compiler turns them into
//! four-lane SIMD (SSE natively, `simd128` in the wasm guest) and so that each loop iteration
//! does a lot of work.
//!
//! The second point matters in the sandbox: wasmtime checks the epoch deadline (the job's wall
//! time limit) at every loop back-edge, and fuel metering counts every basic block, so a loop
//! that handles eight floats per iteration pays those checks four times as often as one that
//! handles thirty-two. Each loop here therefore walks its slices in blocks of
//! [`BLOCK`] floats (a body the compiler unrolls completely), then in quads, then one at a time.
//!
//! Nothing here reorders a sum: [`dot`] keeps the eight-lane order training has always used,
//! and [`axpy`] touches each element once. The bits are the same as with plain loops.

use wide::f32x4;

/// Floats per unrolled block (eight quads).
const BLOCK: usize = 32;

/// The dot product of `a` and `b` (up to the shorter length), summed in eight independent
/// lanes combined in a fixed order: lane `i` adds the products of elements `i, i + 8, i + 16,
/// ...` in index order, then `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`, then the
/// products of the last `len % 8` elements, summed in order from 0.0. The same bits on every
/// platform: no FMA contraction, no reassociation by the compiler.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    // Lanes 0..4 and 4..8, one SIMD register each. Written with explicit vectors: left to
    // itself, LLVM vectorizes this reduction two lanes at a time, natively and in wasm.
    let mut low = f32x4::ZERO;
    let mut high = f32x4::ZERO;
    let mut a_blocks = a.chunks_exact(BLOCK);
    let mut b_blocks = b.chunks_exact(BLOCK);
    for (x, y) in (&mut a_blocks).zip(&mut b_blocks) {
        for at in (0..BLOCK).step_by(8) {
            low += quad(&x[at..]) * quad(&y[at..]);
            high += quad(&x[at + 4..]) * quad(&y[at + 4..]);
        }
    }
    let mut a_eights = a_blocks.remainder().chunks_exact(8);
    let mut b_eights = b_blocks.remainder().chunks_exact(8);
    for (x, y) in (&mut a_eights).zip(&mut b_eights) {
        low += quad(x) * quad(y);
        high += quad(&x[4..]) * quad(&y[4..]);
    }
    let mut tail = 0.0_f32;
    for (x, y) in a_eights.remainder().iter().zip(b_eights.remainder()) {
        tail += x * y;
    }
    reduce(low, high, tail)
}

/// `out[r] = bias[r] + dot(row r of matrix, x)` for each row, where row `r` is
/// `matrix[r * x.len()..(r + 1) * x.len()]`: the same bits as calling [`dot`] per row.
///
/// Rows go four at a time, so each load of `x` serves four rows and a call does one pass
/// instead of one per row (a wasm call pays a stack check and an epoch check on entry).
///
/// # Panics
///
/// If `matrix` is shorter than `out.len() * x.len()` or `bias` shorter than `out`.
// Always inlined (here and in `outer_add`): the digits copy of the training loop then sees
// its constant lengths inside, and LLVM unrolls for them (left to itself, it called one
// generic copy from both training loops).
#[inline(always)]
pub(crate) fn matvec(matrix: &[f32], x: &[f32], bias: &[f32], out: &mut [f32]) {
    let cols = x.len();
    let (x_eights, x_tail) = x.as_chunks::<8>();
    let eights = x_eights.len();
    let groups = out.len() / ROWS;
    for group in 0..groups {
        let first = ROWS * group;
        let rows: [&[f32]; ROWS] =
            std::array::from_fn(|i| &matrix[(first + i) * cols..(first + i + 1) * cols]);
        let row_eights: [&[[f32; 8]]; ROWS] = rows.map(|row| &row.as_chunks::<8>().0[..eights]);
        let mut low = [f32x4::ZERO; ROWS];
        let mut high = [f32x4::ZERO; ROWS];
        each_eight(x_eights, |k, x8| {
            let (x_low, x_high) = (quad(x8), quad(&x8[4..]));
            for i in 0..ROWS {
                let r8 = &row_eights[i][k];
                low[i] += quad(r8) * x_low;
                high[i] += quad(&r8[4..]) * x_high;
            }
        });
        for i in 0..ROWS {
            let mut tail = 0.0_f32;
            for (m, v) in rows[i][8 * eights..].iter().zip(x_tail) {
                tail += m * v;
            }
            out[first + i] = bias[first + i] + reduce(low[i], high[i], tail);
        }
    }
    for r in ROWS * groups..out.len() {
        out[r] = bias[r] + dot(&matrix[r * cols..(r + 1) * cols], x);
    }
}

/// Rows [`matvec`] computes at once.
const ROWS: usize = 4;

/// `row r of matrix += coeffs[r] * x` for each `r` in `rows` (ascending, no repeats), where row
/// `r` is `matrix[r * x.len()..(r + 1) * x.len()]`: each element updated once, as [`axpy`]
/// per row would. Rows go four at a time, so each load of `x` serves four rows.
///
/// # Panics
///
/// If `rows` is not ascending without repeats, or a row or coefficient is out of range.
#[inline(always)]
pub(crate) fn outer_add(matrix: &mut [f32], rows: &[usize], coeffs: &[f32], x: &[f32]) {
    let cols = x.len();
    let (x_eights, x_tail) = x.as_chunks::<8>();
    let whole = 8 * x_eights.len();
    let mut groups = rows.chunks_exact(ROWS);
    for group in &mut groups {
        let ranges: [std::ops::Range<usize>; ROWS] =
            std::array::from_fn(|i| group[i] * cols..(group[i] + 1) * cols);
        let Ok(mut targets) = matrix.get_disjoint_mut(ranges) else {
            panic!("outer_add: rows must be ascending, without repeats, and in range");
        };
        let coeff: [f32; ROWS] = std::array::from_fn(|i| coeffs[group[i]]);
        for (row, &c) in targets.iter_mut().zip(&coeff) {
            for (m, v) in row[whole..].iter_mut().zip(x_tail) {
                *m += c * v;
            }
        }
        let splat = coeff.map(f32x4::splat);
        let mut eights = targets.map(|row| row.as_chunks_mut::<8>().0);
        each_eight(x_eights, |k, x8| {
            let (x_low, x_high) = (quad(x8), quad(&x8[4..]));
            for i in 0..ROWS {
                let r8 = &mut eights[i][k];
                let low = (quad(r8) + splat[i] * x_low).to_array();
                let high = (quad(&r8[4..]) + splat[i] * x_high).to_array();
                r8[..4].copy_from_slice(&low);
                r8[4..].copy_from_slice(&high);
            }
        });
    }
    for &r in groups.remainder() {
        axpy(&mut matrix[r * cols..(r + 1) * cols], coeffs[r], x);
    }
}

/// `v = if v > 0 { v } else { 0 }` for each value (NaN becomes 0), eight per loop iteration.
#[inline]
pub(crate) fn relu(values: &mut [f32]) {
    let (eights, rest) = values.as_chunks_mut::<8>();
    for eight in eights {
        for v in eight {
            *v = if *v > 0.0 { *v } else { 0.0 };
        }
    }
    for v in rest {
        *v = if *v > 0.0 { *v } else { 0.0 };
    }
}

/// Calls `step(k, &eights[k])` for each `k` in order, four calls per loop iteration: in the
/// sandbox each iteration also pays an epoch check, and a layer's row is only a few eights.
#[inline(always)]
fn each_eight(eights: &[[f32; 8]], mut step: impl FnMut(usize, &[f32; 8])) {
    let (fours, rest) = eights.as_chunks::<4>();
    for (f, [e0, e1, e2, e3]) in fours.iter().enumerate() {
        // Written out, not a loop over the four: for wasm, LLVM turned that inner loop into
        // one of eight iterations of one step each, an epoch check per step.
        step(4 * f, e0);
        step(4 * f + 1, e1);
        step(4 * f + 2, e2);
        step(4 * f + 3, e3);
    }
    for (h, eight) in rest.iter().enumerate() {
        step(4 * fours.len() + h, eight);
    }
}

/// Combines the eight lanes and the tail in [`dot`]'s order.
#[inline(always)]
fn reduce(low: f32x4, high: f32x4, tail: f32) -> f32 {
    let quads = (low + high).to_array();
    ((quads[0] + quads[2]) + (quads[1] + quads[3])) + tail
}

/// The first four values of `values` as a vector.
///
/// # Panics
///
/// If `values` has fewer than four elements (the callers pass whole blocks).
#[inline(always)]
fn quad(values: &[f32]) -> f32x4 {
    f32x4::new([values[0], values[1], values[2], values[3]])
}

/// `y[i] += a * x[i]` for every `i` below the shorter length.
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let (y, x) = (&mut y[..n], &x[..n]);
    let mut y_blocks = y.chunks_exact_mut(BLOCK);
    let mut x_blocks = x.chunks_exact(BLOCK);
    for (y, x) in (&mut y_blocks).zip(&mut x_blocks) {
        for i in 0..BLOCK {
            y[i] += a * x[i];
        }
    }
    let y_rest = y_blocks.into_remainder();
    let mut y_quads = y_rest.chunks_exact_mut(4);
    let mut x_quads = x_blocks.remainder().chunks_exact(4);
    for (y, x) in (&mut y_quads).zip(&mut x_quads) {
        for i in 0..4 {
            y[i] += a * x[i];
        }
    }
    for (y, x) in y_quads.into_remainder().iter_mut().zip(x_quads.remainder()) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: the eight-lane order, one element at a time.
    fn dot_reference(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let whole = n - n % 8;
        let mut lanes = [0.0_f32; 8];
        for k in 0..whole {
            lanes[k % 8] += a[k] * b[k];
        }
        let mut tail = 0.0_f32;
        for k in whole..n {
            tail += a[k] * b[k];
        }
        let quads = [0, 1, 2, 3].map(|i| lanes[i] + lanes[i + 4]);
        ((quads[0] + quads[2]) + (quads[1] + quads[3])) + tail
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn dot_keeps_the_eight_lane_order_at_every_length() {
        for n in 0..140 {
            let (a, b) = (values(n, 1), values(n + 3, 7));
            assert_eq!(dot(&a, &b).to_bits(), dot_reference(&a, &b).to_bits(), "length {n}");
        }
    }

    #[test]
    fn matvec_gives_each_row_the_bits_of_dot() {
        for rows in 0..11 {
            for cols in [0, 1, 7, 8, 9, 31, 32, 33, 64, 70] {
                let matrix = values(rows * cols, 11);
                let (x, bias) = (values(cols, 13), values(rows, 17));
                let mut out = vec![f32::NAN; rows];
                matvec(&matrix, &x, &bias, &mut out);
                for (r, value) in out.iter().enumerate() {
                    let expected = bias[r] + dot_reference(&matrix[r * cols..(r + 1) * cols], &x);
                    assert_eq!(value.to_bits(), expected.to_bits(), "{rows}x{cols}, row {r}");
                }
            }
        }
    }

    #[test]
    fn outer_add_updates_the_listed_rows_as_axpy_would() {
        for cols in [0, 3, 8, 13, 32, 64, 70] {
            let x = values(cols, 19);
            let coeffs = values(11, 23);
            for rows in [vec![], vec![4], vec![0, 1, 2, 3], vec![0, 2, 3, 5, 6, 7, 9, 10]] {
                let mut matrix = values(11 * cols, 29);
                let mut expected = matrix.clone();
                outer_add(&mut matrix, &rows, &coeffs, &x);
                for &r in &rows {
                    for (e, x) in expected[r * cols..(r + 1) * cols].iter_mut().zip(&x) {
                        *e += coeffs[r] * x;
                    }
                }
                let bits = |m: &[f32]| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&matrix), bits(&expected), "cols {cols}, rows {rows:?}");
            }
        }
    }

    #[test]
    fn axpy_touches_every_element_once() {
        for n in 0..100 {
            let x = values(n, 3);
            let mut y = values(n, 5);
            let mut expected = y.clone();
            axpy(&mut y, 0.37, &x);
            for (e, x) in expected.iter_mut().zip(&x) {
                *e += 0.37 * x;
            }
            assert_eq!(y, expected, "length {n}");
            // The SGD step: adding -a times x is bitwise subtracting a times x.
            axpy(&mut y, -1.5, &x);
            for (e, x) in expected.iter_mut().zip(&x) {
                *e -= 1.5 * x;
            }
            assert_eq!(y, expected, "negated, length {n}");
        }
    }
}
