//! Time, as herald reads it: a monotonic clock for every deadline and
//! interval (a wall-clock step, from NTP or an operator, moves no close
//! deadline and no ping), and the wall clock only where a protocol speaks
//! in Unix time (token `exp`, signed-request timestamps, webhook
//! `time_ms`).
//!
//! The engine does not read a clock itself: it is handed [`now_ms`] as a
//! function (in its `Limits`), so its tests can run on a clock of their
//! own.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds on the monotonic clock since the process first asked,
/// starting at 1 (0 can mean "never" to a caller).
pub fn now_ms() -> u64 {
    start().elapsed().as_millis() as u64 + 1
}

/// Milliseconds since the Unix epoch (0 if the wall clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}

/// The monotonic time ([`now_ms`]) at which the wall clock will read
/// `at_unix_ms`, as far as can be told now: now if that is past.
pub fn monotonic_at(at_unix_ms: u64) -> u64 {
    now_ms().saturating_add(at_unix_ms.saturating_sub(unix_ms()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_wall_clocks_agree_on_intervals() {
        let a = now_ms();
        assert!(a >= 1);
        let in_a_minute = monotonic_at(unix_ms() + 60_000);
        assert!((a + 59_000..=now_ms() + 60_000).contains(&in_a_minute));
        assert!(monotonic_at(0) <= now_ms(), "a past instant is now");
        assert!(unix_secs() > 1_700_000_000);
    }
}
