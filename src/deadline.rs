//! Deadlines that cannot overflow. `Instant + Duration` panics when the sum does not fit;
//! configured durations are capped at 365 days, but no deadline in the gateway relies on
//! that: each is computed here, saturating at a far-future instant instead.

use std::time::Duration;

/// About 30 years: later than any deadline the gateway means, early enough to fit in every
/// platform's `Instant`.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `from + after`, or `from` + 30 years when that does not fit.
pub fn after(from: std::time::Instant, after: Duration) -> std::time::Instant {
    from.checked_add(after)
        .or_else(|| from.checked_add(FAR_FUTURE))
        .unwrap_or(from)
}

/// A tokio deadline `after` from now, saturating like [`after`].
pub fn from_now(after: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(self::after(std::time::Instant::now(), after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let now = std::time::Instant::now();
        assert!(after(now, Duration::MAX) > after(now, Duration::from_secs(86_400 * 365)));
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert!(from_now(Duration::MAX) > tokio::time::Instant::now());
    }
}
