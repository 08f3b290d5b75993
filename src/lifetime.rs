//! Time arithmetic: when a token stops being used, when it is refreshed, how long to back off.
//!
//! All times are milliseconds since the Unix epoch. Jitter comes in as a number in `0..=u16::MAX`
//! so the functions stay pure and testable.

/// Clock skew allowance: at most this much is cut off the end of a lifetime...
const MAX_SKEW_MS: u64 = 30_000;
/// ...and never more than this fraction of it, so short lifetimes stay usable.
const SKEW_DIVISOR: u64 = 10;
/// Refresh begins once this share of the lifetime (in percent) has passed...
const REFRESH_AT_PERCENT: u64 = 80;
/// ...minus up to this share (in percent) of jitter, so gateways do not refresh in lockstep.
const REFRESH_JITTER_PERCENT: u64 = 5;

const BACKOFF_BASE_MS: u64 = 1_000;
const BACKOFF_MAX_MS: u64 = 30_000;
const MAX_RETRY_AFTER_MS: u64 = 300_000;

/// When a token is used until, and when its refresh is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// After this instant the token is never used.
    pub expires_at_ms: u64,
    /// From this instant a request that uses the token also triggers a refresh.
    pub refresh_at_ms: u64,
}

/// Plans the use of a credential that ends at `end_ms` (the earliest of the token's own
/// lifetime and its subject's `exp`). `None` when nothing of it is left.
pub fn plan(now_ms: u64, end_ms: u64, jitter: u16) -> Option<Plan> {
    let lifetime = end_ms.checked_sub(now_ms).filter(|l| *l > 0)?;
    let skew = (lifetime / SKEW_DIVISOR).min(MAX_SKEW_MS);
    let expires_at_ms = end_ms - skew;
    let jitter_ms =
        lifetime * REFRESH_JITTER_PERCENT / 100 * u64::from(jitter) / u64::from(u16::MAX);
    let refresh_at_ms = (now_ms + lifetime * REFRESH_AT_PERCENT / 100)
        .saturating_sub(jitter_ms)
        .min(expires_at_ms);
    Some(Plan {
        expires_at_ms,
        refresh_at_ms,
    })
}

/// The end of an exchanged token's life: its `expires_in`, capped by the subject's `exp`.
pub fn token_end_ms(now_ms: u64, expires_in_s: u64, subject_exp_s: Option<u64>) -> u64 {
    let own = now_ms.saturating_add(expires_in_s.saturating_mul(1000));
    match subject_exp_s {
        Some(exp) => own.min(exp.saturating_mul(1000)),
        None => own,
    }
}

/// How long to wait before the next attempt after `failures` consecutive failures
/// (1 for the first): exponential from 1 s to 30 s, with up to 25 % taken off at random,
/// but never sooner than the server's `Retry-After`.
pub fn backoff_ms(failures: u32, retry_after_s: Option<u64>, jitter: u16) -> u64 {
    let exp = failures.saturating_sub(1).min(16);
    let base = BACKOFF_BASE_MS.saturating_mul(1 << exp).min(BACKOFF_MAX_MS);
    let jittered = base - base / 4 * u64::from(jitter) / u64::from(u16::MAX);
    let server = retry_after_s
        .map(|s| s.saturating_mul(1000).min(MAX_RETRY_AFTER_MS))
        .unwrap_or(0);
    jittered.max(server)
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whole seconds until `retry_at_ms`, at least 1: the value of a `Retry-After` header.
pub fn retry_after_s(retry_at_ms: u64, now_ms: u64) -> u64 {
    retry_at_ms.saturating_sub(now_ms).div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn an_hour_token_loses_thirty_seconds_and_refreshes_at_eighty_percent() {
        let p = plan(NOW, NOW + 3_600_000, 0).unwrap();
        assert_eq!(p.expires_at_ms, NOW + 3_600_000 - 30_000);
        assert_eq!(p.refresh_at_ms, NOW + 2_880_000);
        let j = plan(NOW, NOW + 3_600_000, u16::MAX).unwrap();
        assert_eq!(j.refresh_at_ms, NOW + 2_880_000 - 180_000);
    }

    #[test]
    fn skew_scales_down_for_short_lifetimes() {
        let p = plan(NOW, NOW + 3_000, u16::MAX).unwrap();
        assert_eq!(p.expires_at_ms, NOW + 2_700);
        assert!(p.refresh_at_ms > NOW && p.refresh_at_ms < p.expires_at_ms);
        let tiny = plan(NOW, NOW + 5, 0).unwrap();
        assert!(
            tiny.expires_at_ms > NOW,
            "a fresh token is always usable once"
        );
    }

    #[test]
    fn nothing_left_means_no_plan() {
        assert_eq!(plan(NOW, NOW, 0), None);
        assert_eq!(plan(NOW, NOW - 1, 0), None);
    }

    #[test]
    fn refresh_never_after_expiry() {
        for life in [1, 2, 10, 999, 60_000, 86_400_000] {
            for jitter in [0, 1, 30_000, u16::MAX] {
                let p = plan(NOW, NOW + life, jitter).unwrap();
                assert!(p.refresh_at_ms <= p.expires_at_ms, "{life} {jitter}");
                assert!(p.expires_at_ms <= NOW + life);
                assert!(p.expires_at_ms > NOW);
            }
        }
    }

    #[test]
    fn subject_exp_caps_the_token() {
        assert_eq!(token_end_ms(NOW, 3600, None), NOW + 3_600_000);
        assert_eq!(token_end_ms(NOW, 3600, Some(NOW / 1000 + 60)), NOW + 60_000);
        assert_eq!(token_end_ms(NOW, 60, Some(NOW / 1000 + 3600)), NOW + 60_000);
        assert_eq!(token_end_ms(NOW, 60, Some(0)), 0);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_s(NOW + 1, NOW), 1);
        assert_eq!(retry_after_s(NOW + 1_001, NOW), 2);
        assert_eq!(retry_after_s(NOW, NOW + 5), 1);
    }

    #[test]
    fn backoff_grows_is_bounded_and_honours_retry_after() {
        assert_eq!(backoff_ms(1, None, 0), 1_000);
        assert_eq!(backoff_ms(2, None, 0), 2_000);
        assert_eq!(backoff_ms(3, None, 0), 4_000);
        assert_eq!(backoff_ms(50, None, 0), 30_000);
        assert_eq!(backoff_ms(1, None, u16::MAX), 750);
        assert_eq!(backoff_ms(1, Some(10), 0), 10_000);
        assert_eq!(backoff_ms(1, Some(100_000), 0), 300_000);
        assert_eq!(backoff_ms(0, None, 0), 1_000);
    }
}
