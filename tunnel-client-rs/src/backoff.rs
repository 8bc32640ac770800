//! Exponential reconnect backoff with jitter.
//!
//! The first retry comes quickly (the runner restarting is the common case and users are waiting on their
//! forwards), later ones double up to a cap. Jitter spreads the reconnects of the many containers of one
//! runner so a runner restart is not met by a synchronized storm.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub struct Backoff {
    initial: Duration,
    cap: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(initial: Duration, cap: Duration) -> Self {
        // Jitter needs no cryptographic randomness: time and pid make containers started together differ.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
        Self { initial, cap, next: initial, rng: seed | 1 }
    }

    /// Back to the initial delay (after a connection was established).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The delay before the next attempt: the current step scaled by a random factor in [0.5, 1.0), then the
    /// step doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next.min(self.cap);
        self.next = (self.next * 2).min(self.cap);
        let factor = 0.5 + 0.5 * self.random_unit();
        base.mul_f64(factor)
    }

    fn random_unit(&mut self) -> f64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(100), "{first:?}");
        for _ in 0..10 {
            assert!(b.next_delay() < Duration::from_secs(1));
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(500), "{late:?}");
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(100));
    }
}
