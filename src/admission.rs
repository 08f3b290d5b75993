//! The admission budget for identities the gateway has never seen.
//!
//! Every new identity costs a call to OpenAI's token endpoint and a cache slot. With the header
//! source a caller can mint identities at will (any well-formed JWT is one, signed or not), so
//! exchanges for identities without a cache record draw from one token bucket in shared data,
//! shared by every worker: `new_identities_burst` at once, refilled at `new_identities_per_s`.
//! Identities that have a record (cached, refreshing, backing off) never draw from it, so a
//! flood of forged tokens cannot push out real callers.

use serde::{Deserialize, Serialize};

use crate::shared::{self, SharedStore, StoreError, KEY_PREFIX};

pub fn key() -> String {
    format!("{KEY_PREFIX}admission")
}

/// The bucket as stored: whole tokens are thousandths, so refill needs no floating point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Bucket {
    milli_tokens: u64,
    at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The budget is spent; one more token is there in this many milliseconds.
    No {
        retry_after_ms: u64,
    },
}

/// Takes one token from the bucket at `now_ms`.
pub fn take(
    store: &dyn SharedStore,
    now_ms: u64,
    per_s: u32,
    burst: u32,
) -> Result<Admit, StoreError> {
    let full = u64::from(burst) * 1000;
    let per_ms = u64::from(per_s); // thousandths of a token per millisecond
    let mut outcome = Admit::Yes;
    shared::update(store, &key(), |current: Option<&Bucket>| {
        let bucket = current.copied().unwrap_or(Bucket {
            milli_tokens: full,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(bucket.at_ms);
        let available = bucket
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(per_ms))
            .min(full);
        if available < 1000 {
            outcome = Admit::No {
                retry_after_ms: (1000 - available).div_ceil(per_ms.max(1)),
            };
            return None;
        }
        outcome = Admit::Yes;
        Some(Bucket {
            milli_tokens: available - 1000,
            at_ms: now_ms.max(bucket.at_ms),
        })
    })?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemoryStore;

    const NOW: u64 = 1_000_000;

    #[test]
    fn a_burst_then_the_rate() {
        let s = MemoryStore::default();
        for _ in 0..100 {
            assert_eq!(take(&s, NOW, 20, 100).unwrap(), Admit::Yes);
        }
        assert_eq!(
            take(&s, NOW, 20, 100).unwrap(),
            Admit::No { retry_after_ms: 50 }
        );
        // 20 per second: one every 50 ms.
        assert_eq!(
            take(&s, NOW + 49, 20, 100).unwrap(),
            Admit::No { retry_after_ms: 1 }
        );
        assert_eq!(take(&s, NOW + 50, 20, 100).unwrap(), Admit::Yes);
        assert!(matches!(
            take(&s, NOW + 50, 20, 100).unwrap(),
            Admit::No { .. }
        ));
        // Over one second: twenty more, not more.
        let admitted = (0..40)
            .filter(|_| take(&s, NOW + 1_050, 20, 100).unwrap() == Admit::Yes)
            .count();
        assert_eq!(admitted, 20);
        // Refill stops at the burst.
        let admitted = (0..200)
            .filter(|_| take(&s, NOW + 1_000_000, 20, 100).unwrap() == Admit::Yes)
            .count();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn a_clock_that_goes_back_grants_nothing_extra() {
        let s = MemoryStore::default();
        assert_eq!(take(&s, NOW, 1, 1).unwrap(), Admit::Yes);
        assert!(matches!(
            take(&s, NOW - 500_000, 1, 1).unwrap(),
            Admit::No { .. }
        ));
        assert!(matches!(
            take(&s, NOW + 999, 1, 1).unwrap(),
            Admit::No { .. }
        ));
        assert_eq!(take(&s, NOW + 1_000, 1, 1).unwrap(), Admit::Yes);
    }

    #[test]
    fn workers_share_one_bucket() {
        let s = MemoryStore::default();
        assert_eq!(take(&s, NOW, 1, 2).unwrap(), Admit::Yes);
        // Another worker takes the last token between our read and our write.
        s.race_next_write(|s| assert_eq!(take(s, NOW, 1, 2).unwrap(), Admit::Yes));
        assert!(matches!(take(&s, NOW, 1, 2).unwrap(), Admit::No { .. }));
    }

    #[test]
    fn a_corrupt_bucket_starts_full() {
        let s = MemoryStore::default();
        s.set(&key(), b"garbage", None).unwrap();
        assert_eq!(take(&s, NOW, 1, 1).unwrap(), Admit::Yes);
        assert!(matches!(take(&s, NOW, 1, 1).unwrap(), Admit::No { .. }));
    }
}
