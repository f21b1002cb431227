//! Growing pauses after infrastructure errors (broker or database unreachable),
//! so a service that lost a dependency retries quickly at first and then calmly.

use std::time::Duration;

/// The pause before the next retry: [`Backoff::FIRST`], doubling up to
/// [`Backoff::MAX`], back to the first after [`Backoff::reset`].
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// The first pause, and the pause after a reset.
    pub const FIRST: Duration = Duration::from_millis(100);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(10);

    /// Starts at [`Backoff::FIRST`].
    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The pause to take now; each call doubles the next one, up to [`Self::MAX`].
    pub fn next_pause(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        current
    }

    /// Called after a success: the next trouble starts with a short pause again.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_pause()).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[9], Backoff::MAX);
        backoff.reset();
        assert_eq!(backoff.next_pause(), Backoff::FIRST);
    }
}
