//! The fault schedule: which faults, and when, as values.

use std::time::Duration;

/// One fault of a schedule. Those with a duration hold for it, then heal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL order-service, start it again at once.
    KillApi,
    /// SIGKILL inventory-consumer, start it again at once.
    KillConsumer,
    /// Stop RabbitMQ and start it again.
    RestartBroker,
    /// Restart Postgres in immediate mode: a crash and recovery.
    RestartDatabase,
    /// Every byte between the services and Postgres held, nothing closed.
    PartitionDatabase(Duration),
    /// Every byte between the services and RabbitMQ held, nothing closed.
    PartitionBroker(Duration),
    /// Both at once.
    PartitionBoth(Duration),
    /// A RabbitMQ memory alarm (`set_vm_memory_high_watermark 0`), then the
    /// watermark as it was.
    MemoryAlarm(Duration),
    /// The next COMMIT sent to Postgres takes effect but its answer is lost
    /// (the connection is cut right after it).
    AmbiguousCommit,
    /// SIGKILL the RabbitMQ node leading the inventory quorum queue (on the
    /// cluster of scripts/rabbitmq-cluster.sh).
    KillQueueLeader,
    /// Start the node killed by [`Fault::KillQueueLeader`] again: it rejoins
    /// the cluster with its data.
    RestartKilledNode,
}

impl Fault {
    /// How long it holds before it heals (zero for the instant ones).
    pub fn lasts(self) -> Duration {
        match self {
            Self::PartitionDatabase(d)
            | Self::PartitionBroker(d)
            | Self::PartitionBoth(d)
            | Self::MemoryAlarm(d) => d,
            _ => Duration::ZERO,
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::KillApi => write!(f, "SIGKILL order-service, restart it"),
            Self::KillConsumer => write!(f, "SIGKILL inventory-consumer, restart it"),
            Self::RestartBroker => write!(f, "restart RabbitMQ"),
            Self::RestartDatabase => write!(f, "restart Postgres (immediate: crash and recovery)"),
            Self::PartitionDatabase(d) => write!(f, "partition Postgres away for {d:?}"),
            Self::PartitionBroker(d) => write!(f, "partition RabbitMQ away for {d:?}"),
            Self::PartitionBoth(d) => write!(f, "partition Postgres and RabbitMQ away for {d:?}"),
            Self::MemoryAlarm(d) => write!(f, "RabbitMQ memory alarm for {d:?}"),
            Self::AmbiguousCommit => write!(f, "lose the answer to the next COMMIT"),
            Self::KillQueueLeader => write!(f, "SIGKILL the quorum queue's leader node"),
            Self::RestartKilledNode => write!(f, "bring the killed node back"),
        }
    }
}

/// Faults at times from the start of the load, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<(Duration, Fault)>);

impl Schedule {
    /// The chaos run's schedule over a load of `duration`: crashes, restarts
    /// and stalls, each stall lasting `stall`, spread evenly (one every
    /// `duration / (faults + 1)`).
    pub fn chaos(duration: Duration, stall: Duration) -> Self {
        use Fault::*;
        let faults = [
            KillApi,
            KillConsumer,
            RestartBroker,
            PartitionDatabase(stall),
            KillApi,
            AmbiguousCommit,
            RestartDatabase,
            PartitionBroker(stall),
            KillConsumer,
            MemoryAlarm(stall),
            RestartBroker,
            PartitionBoth(stall),
            KillApi,
            AmbiguousCommit,
            KillConsumer,
        ];
        Self::spread(duration, &faults)
    }

    /// The cluster proof's schedule (the load lasts 45 s by default): the
    /// queue's leader killed, then one order-service and one consumer, then
    /// the leader's node back; at fixed times, whatever the load's length.
    pub fn cluster_proof() -> Self {
        use Fault::*;
        let at = Duration::from_secs;
        Self(vec![
            (at(8), KillQueueLeader),
            (at(14), KillApi),
            (at(20), KillConsumer),
            (at(26), RestartKilledNode),
        ])
    }

    /// `faults` at even intervals over `duration`, none at its start or end.
    pub fn spread(duration: Duration, faults: &[Fault]) -> Self {
        let slots = u32::try_from(faults.len() + 1).unwrap_or(u32::MAX);
        let step = duration / slots;
        Self(faults.iter().zip(1u32..).map(|(fault, slot)| (step * slot, *fault)).collect())
    }

    /// When the last fault has healed, if every fault starts at its time or
    /// when the one before it healed, whichever is later.
    pub fn ends(&self) -> Duration {
        self.0.iter().fold(Duration::ZERO, |end, (at, fault)| end.max(*at) + fault.lasts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_spread_evenly_inside_the_run() {
        let schedule = Schedule::spread(
            Duration::from_secs(40),
            &[Fault::KillApi, Fault::KillConsumer, Fault::RestartBroker],
        );
        let times: Vec<u64> = schedule.0.iter().map(|(at, _)| at.as_secs()).collect();
        assert_eq!(times, [10, 20, 30]);
    }

    #[test]
    fn the_chaos_schedule_has_every_kind_of_fault_in_order() {
        let schedule = Schedule::chaos(Duration::from_secs(160), Duration::from_secs(5));
        assert_eq!(schedule.0.len(), 15);
        assert!(schedule.0.windows(2).all(|pair| pair[0].0 < pair[1].0), "in time order");
        for kind in [
            Fault::PartitionDatabase(Duration::from_secs(5)),
            Fault::PartitionBroker(Duration::from_secs(5)),
            Fault::PartitionBoth(Duration::from_secs(5)),
            Fault::MemoryAlarm(Duration::from_secs(5)),
            Fault::AmbiguousCommit,
            Fault::RestartDatabase,
        ] {
            assert!(schedule.0.iter().any(|(_, fault)| *fault == kind), "{kind}");
        }
        assert_eq!(schedule.0.iter().filter(|(_, f)| *f == Fault::KillApi).count(), 3);
    }

    #[test]
    fn the_cluster_proof_kills_the_leader_first_and_brings_it_back_last() {
        let schedule = Schedule::cluster_proof();
        let faults: Vec<Fault> = schedule.0.iter().map(|(_, fault)| *fault).collect();
        assert_eq!(
            faults,
            [Fault::KillQueueLeader, Fault::KillApi, Fault::KillConsumer, Fault::RestartKilledNode]
        );
        assert_eq!(schedule.ends(), Duration::from_secs(26));
    }

    #[test]
    fn a_stall_longer_than_its_slot_pushes_the_next_fault_back() {
        let stall = Duration::from_secs(25);
        let schedule =
            Schedule::spread(Duration::from_secs(30), &[Fault::MemoryAlarm(stall), Fault::KillApi]);
        // The alarm from 10 s to 35 s; the kill, due at 20 s, at 35 s.
        assert_eq!(schedule.ends(), Duration::from_secs(35));
    }
}
