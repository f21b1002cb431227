//! "Nothing lost, nothing doubled": the one place the whole-system invariant
//! of a run is defined and judged.

/// What a run left behind, counted after every order was decided (or the wait
/// gave up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Orders answered 2xx (after the client's retries).
    pub accepted: u64,
    /// Accepted order ids missing from `orders`.
    pub lost: u64,
    /// Orders without their Idempotency-Key's row: every request carries a key
    /// and the key is written in the order's transaction, so such an order is a
    /// second one for some key.
    pub doubled: u64,
    /// Events applied out of their aggregate's order: cancels the consumer
    /// applied before their order's OrderPlaced (reconcile's count of
    /// `orders.cancelled_from = 'PENDING'`).
    pub out_of_order: u64,
    /// SKUs whose stock is not what their received stock minus the COMPLETED
    /// lines says (reconcile's check; an effect applied twice shows here).
    pub stock_off: u64,
    /// Orders not decided: PENDING, or with an accepted cancel and not CANCELLED.
    pub stuck: u64,
    /// Dead outbox events plus messages in the dead-letter queue.
    pub dead: u64,
    /// Whether `order-service reconcile` passed.
    pub reconciled: bool,
}

impl Verdict {
    /// Whether the run kept every promise.
    pub fn holds(&self) -> bool {
        self.accepted > 0
            && self.lost == 0
            && self.doubled == 0
            && self.out_of_order == 0
            && self.stock_off == 0
            && self.stuck == 0
            && self.dead == 0
            && self.reconciled
    }
}

impl std::fmt::Display for Verdict {
    /// The `chaos:` line scripts and people read.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "chaos: accepted={} lost={} doubled={} out_of_order={} stock_off={} stuck={} dead={}",
            self.accepted,
            self.lost,
            self.doubled,
            self.out_of_order,
            self.stock_off,
            self.stuck,
            self.dead
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> Verdict {
        Verdict { accepted: 4000, reconciled: true, ..Verdict::default() }
    }

    #[test]
    fn a_clean_run_holds_and_prints_the_chaos_line() {
        assert!(clean().holds());
        assert_eq!(
            clean().to_string(),
            "chaos: accepted=4000 lost=0 doubled=0 out_of_order=0 stock_off=0 stuck=0 dead=0"
        );
    }

    #[test]
    fn any_count_or_a_failed_reconcile_breaks_it() {
        for broken in [
            Verdict { lost: 1, ..clean() },
            Verdict { doubled: 1, ..clean() },
            Verdict { out_of_order: 1, ..clean() },
            Verdict { stock_off: 1, ..clean() },
            Verdict { stuck: 1, ..clean() },
            Verdict { dead: 1, ..clean() },
            Verdict { reconciled: false, ..clean() },
            Verdict { accepted: 0, ..clean() },
        ] {
            assert!(!broken.holds(), "{broken:?}");
        }
    }
}
