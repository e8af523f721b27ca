//! Memoised signature verdicts for a driver that runs many receivers in one thread.

use std::cell::RefCell;

use sha2::{Digest as _, Sha256};

use super::{MemoKey, Signature, VerifyError};
use crate::thread_memo::{Installed, SlotCell};

thread_local! {
    static MEMO: SlotCell<[u8; 32], Result<(), VerifyError>> = const { RefCell::new(None) };
}

/// Counters of an installed memo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignatureMemoStats {
    /// Verdicts reused.
    pub hits: u64,
    /// Signatures actually checked.
    pub misses: u64,
}

/// Memoises signature verdicts on the current thread while it is alive.
///
/// A signature verdict is a pure function of the signed bytes and the signature, so a
/// process that hands the same envelope to many receivers (the simulator delivers one
/// offer to thousands of simulated nodes, each with its own `Verifier`) need check each
/// distinct envelope once. Only the ed25519 check is memoised: every receiver still
/// decodes the envelope and applies its own size, domain, lifetime, clock and replay
/// checks. The key is the SHA-256 of the signature and the signed bytes, so a forged or
/// altered envelope never meets the verdict of the genuine one.
///
/// Nothing installs a memo but a driver that asks for one: the node and the relay binaries
/// never do, so they check every signature they receive. Dropping the memo uninstalls it
/// (and restores one installed before, if any).
#[must_use = "the memo is uninstalled when dropped"]
pub struct SignatureMemo {
    installed: Installed<[u8; 32], Result<(), VerifyError>>,
}

impl SignatureMemo {
    /// Installs a memo of at most `capacity` verdicts (at least 2) on this thread.
    pub fn install(capacity: usize) -> Self {
        Self { installed: Installed::install(&MEMO, capacity) }
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> SignatureMemoStats {
        let (hits, misses) = self.installed.counts();
        SignatureMemoStats { hits, misses }
    }
}

/// `check()`'s verdict on `signature` over the signed bytes (`signed`, concatenated), from
/// the memo when one is installed. The memo key is taken from `memo_key` when it holds
/// one (it must then be the key of these bytes), and left there when computed.
pub(super) fn verdict(
    signature: &Signature,
    signed: &[&[u8]],
    memo_key: &MemoKey,
    check: impl FnOnce() -> Result<(), VerifyError>,
) -> Result<(), VerifyError> {
    MEMO.with(|m| {
        let mut guard = m.borrow_mut();
        let Some(state) = guard.as_mut() else { return check() };
        let key = memo_key.get().unwrap_or_else(|| {
            let mut hasher = Sha256::new();
            hasher.update(signature.0);
            for part in signed {
                hasher.update(part);
            }
            hasher.finalize().into()
        });
        memo_key.set(Some(key));
        if let Some(v) = state.get(&key) {
            let v = v.clone();
            state.hits += 1;
            return v;
        }
        let v = check();
        state.insert(key, v.clone());
        v
    })
}
