//! How long to wait before reconnecting. Pure: the attempt number in, a delay out.

/// Delay before the first reconnect attempt, in milliseconds.
pub const RECONNECT_DELAY_MS_MIN: u64 = 250;

/// Longest delay between reconnect attempts, in milliseconds.
pub const RECONNECT_DELAY_MS_MAX: u64 = 30_000;

const _: () =
    assert!(RECONNECT_DELAY_MS_MIN > 0 && RECONNECT_DELAY_MS_MIN <= RECONNECT_DELAY_MS_MAX);

/// Delay before reconnect attempt `attempt` (0 for the first after a drop): doubling from
/// [`RECONNECT_DELAY_MS_MIN`] up to [`RECONNECT_DELAY_MS_MAX`].
///
/// There is no jitter: one person's terminal does not make a thundering herd, and a fixed
/// sequence is easier to follow on screen.
pub fn reconnect_delay_ms(attempt: u32) -> u64 {
    // 2^16 * MIN is far beyond MAX, so capping the exponent loses nothing and cannot overflow.
    let factor = 1u64 << attempt.min(16);
    RECONNECT_DELAY_MS_MIN
        .saturating_mul(factor)
        .min(RECONNECT_DELAY_MS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_then_stay_at_the_cap() {
        let delays: Vec<u64> = (0..10).map(reconnect_delay_ms).collect();
        assert_eq!(
            delays,
            [
                250, 500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000
            ]
        );
        assert_eq!(reconnect_delay_ms(u32::MAX), RECONNECT_DELAY_MS_MAX);
    }
}
