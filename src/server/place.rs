//! A place under a limit: taken by counting up a shared counter, refused when the limit is
//! reached, and given back when dropped (also when the future holding it is cancelled).
//!
//! The limits that can change on reload (`max_in_flight_checks`) or that other code reads
//! (the drain waits for checks in flight to reach zero) are counters rather than semaphores.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One place counted in `C`'s counter (`&AtomicUsize` to borrow it, `Arc<AtomicUsize>` to own it).
#[must_use = "the place is given back as soon as it is dropped"]
pub struct Place<C: Deref<Target = AtomicUsize>>(C);

impl<C: Deref<Target = AtomicUsize>> Place<C> {
    /// A place in `counter`, or `None` when `limit` places are taken already.
    pub fn take(counter: C, limit: usize) -> Option<Self> {
        if counter.fetch_add(1, Ordering::AcqRel) >= limit {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Place(counter))
    }
}

impl<C: Deref<Target = AtomicUsize>> Drop for Place<C> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::Place;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn places_are_limited_and_given_back() {
        let n = AtomicUsize::new(0);
        let a = Place::take(&n, 2).unwrap();
        let b = Place::take(&n, 2).unwrap();
        assert!(Place::take(&n, 2).is_none());
        assert_eq!(n.load(Ordering::SeqCst), 2, "a refused place is not counted");
        drop(a);
        let c = Place::take(&n, 2);
        assert!(c.is_some());
        drop((b, c));
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_owned_place_outlives_its_taker_and_a_lower_limit_refuses_at_once() {
        let n = Arc::new(AtomicUsize::new(0));
        let held: Vec<_> = (0..3).map(|_| Place::take(n.clone(), 3).unwrap()).collect();
        // A limit lowered under what is held (a reload) refuses new places and keeps the old ones.
        assert!(Place::take(n.clone(), 1).is_none());
        assert_eq!(n.load(Ordering::SeqCst), 3);
        let moved = std::thread::spawn(move || drop(held)).join();
        assert!(moved.is_ok());
        assert_eq!(n.load(Ordering::SeqCst), 0);
        assert!(Place::take(n, 1).is_some());
    }
}
