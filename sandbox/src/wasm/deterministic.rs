//! Deterministic replacements for WASI preview 1's nondeterministic imports.
//!
//! In deterministic mode the clocks and the random source are shadowed in the linker: clocks
//! start at a fixed instant and advance one microsecond per query, and `random_get` returns a
//! fixed SplitMix64 stream. Together with NaN canonicalization this makes a module's outputs a
//! function of its inputs only, so replicas on different nodes agree bit for bit.

use wasmtime::{Caller, Extern, Linker};

use super::State;

/// 2020-01-01T00:00:00Z in nanoseconds: the deterministic wall clock's start.
const EPOCH_NS: u64 = 1_577_836_800_000_000_000;
/// WASI errno values.
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;

/// Per-run deterministic clock and random state.
#[derive(Debug, Default)]
pub(crate) struct DetState {
    clock_ticks: u64,
    random: u64,
}

impl DetState {
    fn next_random(&mut self) -> u64 {
        self.random = self.random.wrapping_add(0x9e37_79b9_7f4a_7c15);
        aimatrix_protocol::messages::mix64(self.random)
    }
}

fn write_guest(caller: &mut Caller<'_, State>, ptr: i32, bytes: &[u8]) -> i32 {
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else { return ERRNO_FAULT };
    match memory.write(&mut *caller, ptr as u32 as usize, bytes) {
        Ok(()) => ERRNO_SUCCESS,
        Err(_) => ERRNO_FAULT,
    }
}

/// Replaces `random_get`, `clock_time_get` and `clock_res_get` in `linker`.
pub(crate) fn shadow_nondeterministic_imports(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    const MODULE: &str = "wasi_snapshot_preview1";
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut caller: Caller<'_, State>, ptr: i32, len: i32| -> i32 {
            let Ok(len) = usize::try_from(len as u32) else { return ERRNO_INVAL };
            if len > 64 << 20 {
                return ERRNO_INVAL;
            }
            let mut bytes = Vec::with_capacity(len);
            while bytes.len() < len {
                let word = caller.data_mut().det.next_random().to_le_bytes();
                let take = (len - bytes.len()).min(8);
                bytes.extend_from_slice(&word[..take]);
            }
            write_guest(&mut caller, ptr, &bytes)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut caller: Caller<'_, State>, id: i32, _precision: i64, out: i32| -> i32 {
            if !(0..=3).contains(&id) {
                return ERRNO_INVAL;
            }
            let det = &mut caller.data_mut().det;
            det.clock_ticks += 1;
            let elapsed_ns = det.clock_ticks.saturating_mul(1_000);
            let now = if id == 0 { EPOCH_NS.saturating_add(elapsed_ns) } else { elapsed_ns };
            write_guest(&mut caller, out, &now.to_le_bytes())
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut caller: Caller<'_, State>, id: i32, out: i32| -> i32 {
            if !(0..=3).contains(&id) {
                return ERRNO_INVAL;
            }
            write_guest(&mut caller, out, &1_000u64.to_le_bytes())
        },
    )?;
    Ok(())
}
