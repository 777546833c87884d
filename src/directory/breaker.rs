//! A circuit breaker per remote directory: after `failure_threshold` consecutive failures the
//! directory is considered down for `cooldown`, and lookups fail at once (`directory_unavailable`,
//! or a stale cached user) instead of each waiting for a timeout. After the cool-down one probe
//! request at a time is let through; its success closes the breaker, its failure re-opens it.
//!
//! State sits behind a std mutex that is only ever held for a few instructions, never across an
//! await.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker; 0 disables it.
    pub failure_threshold: u32,
    pub cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings { failure_threshold: 5, cooldown: Duration::from_secs(5) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// Cool-down over; one probe is out.
    HalfOpen,
}

/// What the breaker allows for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Permit {
    /// Go ahead (closed).
    Normal,
    /// Go ahead as the single probe of a half-open breaker.
    Probe,
    /// The directory is considered down: do not call it.
    Rejected,
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<State>,
}

/// Public view of the state, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Breaker { settings, state: Mutex::new(State::Closed { failures: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of a Copy value.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if Instant::now() < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen => BreakerState::HalfOpen,
        }
    }

    pub fn acquire(&self) -> Permit {
        if self.settings.failure_threshold == 0 {
            return Permit::Normal;
        }
        let mut s = self.lock();
        match *s {
            State::Closed { .. } => Permit::Normal,
            State::Open { until } if Instant::now() < until => Permit::Rejected,
            State::Open { .. } => {
                *s = State::HalfOpen;
                Permit::Probe
            }
            State::HalfOpen => Permit::Rejected,
        }
    }

    /// Reports the outcome of a permitted request. Returns the new state when it changed.
    pub fn record(&self, permit: &Permit, success: bool) -> Option<BreakerState> {
        if self.settings.failure_threshold == 0 || *permit == Permit::Rejected {
            return None;
        }
        let mut s = self.lock();
        let before = *s;
        *s = match (before, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 >= self.settings.failure_threshold => {
                State::Open { until: Instant::now() + self.settings.cooldown }
            }
            (State::Closed { failures }, false) => State::Closed { failures: failures + 1 },
            (State::HalfOpen, false) => State::Open { until: Instant::now() + self.settings.cooldown },
            // A request started before the breaker opened finished late: stay open.
            (State::Open { until }, false) => State::Open { until },
        };
        let changed = |st: State| match st {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen => BreakerState::HalfOpen,
        };
        (changed(before) != changed(*s)).then(|| changed(*s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, cooldown_ms: u64) -> Breaker {
        Breaker::new(BreakerSettings {
            failure_threshold: threshold,
            cooldown: Duration::from_millis(cooldown_ms),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker(3, 60_000);
        for _ in 0..2 {
            let p = b.acquire();
            b.record(&p, false);
        }
        let p = b.acquire();
        b.record(&p, true); // a success resets the run
        for _ in 0..2 {
            let p = b.acquire();
            assert_eq!(p, Permit::Normal);
            b.record(&p, false);
        }
        let p = b.acquire();
        assert_eq!(b.record(&p, false), Some(BreakerState::Open));
        assert_eq!(b.acquire(), Permit::Rejected);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn one_probe_at_a_time_after_cooldown() {
        let b = breaker(1, 20);
        let p = b.acquire();
        b.record(&p, false);
        assert_eq!(b.acquire(), Permit::Rejected);
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.acquire();
        assert_eq!(probe, Permit::Probe);
        assert_eq!(b.acquire(), Permit::Rejected, "a second probe must wait");
        assert_eq!(b.record(&probe, false), Some(BreakerState::Open));
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.acquire();
        assert_eq!(probe, Permit::Probe);
        assert_eq!(b.record(&probe, true), Some(BreakerState::Closed));
        assert_eq!(b.acquire(), Permit::Normal);
    }

    #[test]
    fn threshold_zero_disables() {
        let b = breaker(0, 1000);
        for _ in 0..100 {
            let p = b.acquire();
            assert_eq!(p, Permit::Normal);
            b.record(&p, false);
        }
    }
}
