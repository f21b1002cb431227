//! Supervision of background tasks (relay workers, consumers, sweepers): a task
//! that panics is logged with its panic message, counted, and started again
//! after a growing pause, so a pool never runs one short until the process
//! restarts.
//!
//! [`Health`] tells readiness checks whether a task is down: only a task that
//! crashed and is not running again counts. A task that is running but waiting
//! (for the broker, say) is healthy here; its own status says what it waits for.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// Starts supervised tasks that run until `shutdown`. Cheap to clone.
#[derive(Clone, Default)]
pub struct Supervisor {
    shutdown: CancellationToken,
    health: Health,
    panics: Family<TaskLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: String,
}

/// How many supervised tasks are down (crashed, waiting to be restarted).
#[derive(Clone, Debug, Default)]
pub struct Health {
    crashed: Arc<AtomicUsize>,
}

impl Health {
    /// Supervised tasks that panicked and have not been restarted yet.
    pub fn crashed_tasks(&self) -> usize {
        self.crashed.load(Ordering::Relaxed)
    }
}

impl Supervisor {
    /// A supervisor whose panic counter is registered in `registry`.
    pub fn new(registry: &mut Registry, shutdown: CancellationToken) -> Self {
        let supervisor = Self { shutdown, ..Self::default() };
        registry.register(
            "task_panics",
            "Background tasks that panicked and were restarted, by task",
            supervisor.panics.clone(),
        );
        supervisor
    }

    /// A supervisor with metrics nobody reads, for tests and tools.
    pub fn unregistered(shutdown: CancellationToken) -> Self {
        Self { shutdown, ..Self::default() }
    }

    /// The token that stops every task this supervisor started.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The count of crashed tasks, for readiness checks.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// How often the task `name` has panicked so far.
    pub fn panics(&self, name: &str) -> u64 {
        self.panics.get_or_create(&TaskLabels { task: name.to_owned() }).get()
    }

    /// Runs `make()` in `tasks`, and again after each panic, until it returns
    /// (which a task does once the shutdown token is cancelled).
    pub fn spawn<F, Fut>(&self, tasks: &mut JoinSet<()>, name: impl Into<String>, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let supervisor = self.clone();
        let name = name.into();
        tasks.spawn(async move { supervisor.supervise(name, make).await });
    }

    async fn supervise<F, Fut>(self, name: String, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut backoff = Backoff::new();
        loop {
            let started = tokio::time::Instant::now();
            // A task of its own, so that its panic ends it and not the
            // supervisor; aborted if the supervisor is (its JoinSet dropped),
            // so that no task outlives the one that owns it.
            let task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(make()));
            let panic = match task.await {
                Ok(()) => return,
                Err(error) if error.is_panic() => panic_message(error.into_panic()),
                Err(_) => return, // cancelled: the runtime is shutting down
            };
            // A task that ran a good while before panicking starts its pauses afresh.
            if started.elapsed() > Backoff::MAX * 6 {
                backoff.reset();
            }
            let restart_in = backoff.next_pause();
            self.panics.get_or_create(&TaskLabels { task: name.clone() }).inc();
            self.health.crashed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(task = %name, panic = %panic,
                restart_in_ms = restart_in.as_millis() as u64, "task panicked; restarting it");
            let stopping = tokio::select! {
                () = self.shutdown.cancelled() => true,
                () = tokio::time::sleep(restart_in) => false,
            };
            self.health.crashed.fetch_sub(1, Ordering::Relaxed);
            if stopping {
                return;
            }
            tracing::info!(task = %name, "task restarted");
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => (*message).to_owned(),
            Err(_) => "(a panic without a message)".to_owned(),
        },
    }
}

/// Counts itself in a shared counter while it lives, and uncounts itself when
/// dropped, also when a panic unwinds the task holding it: a readiness counter
/// such as "workers connected to the broker" cannot stay wrong after a crash.
#[derive(Debug)]
pub struct CountGuard(Arc<AtomicUsize>);

impl CountGuard {
    /// Counts itself in `counter` until dropped.
    pub fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A test hook: makes the next `n` calls of [`CrashSwitch::check`] panic, to show
/// that a crashed task is restarted. Inert unless a test arms it.
#[derive(Clone, Debug, Default)]
pub struct CrashSwitch(Arc<AtomicUsize>);

impl CrashSwitch {
    /// Arms the switch: the next `n` checks panic.
    pub fn crash_next(&self, n: usize) {
        self.0.store(n, Ordering::SeqCst);
    }

    /// Panics if armed (and disarms by one).
    pub fn check(&self, task: &str) {
        let armed = self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if armed.is_ok() {
            panic!("injected panic in {task}");
        }
    }
}

/// The pause before a first restart, for tests that wait for one.
pub const FIRST_RESTART: Duration = Backoff::FIRST;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_restarted_and_counted() {
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor::unregistered(shutdown.clone());
        let switch = CrashSwitch::default();
        switch.crash_next(2);
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let (task_switch, task_runs, task_shutdown) =
            (switch.clone(), runs.clone(), shutdown.clone());
        supervisor.spawn(&mut tasks, "flaky", move || {
            let (switch, runs, shutdown) =
                (task_switch.clone(), task_runs.clone(), task_shutdown.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                switch.check("flaky");
                shutdown.cancelled().await;
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3, "two crashes, then a run that lasts");
        assert_eq!(supervisor.panics("flaky"), 2);
        assert_eq!(supervisor.health().crashed_tasks(), 0, "running again");
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
    }

    #[test]
    fn a_count_guard_uncounts_itself_when_a_panic_unwinds() {
        let counter = Arc::new(AtomicUsize::new(0));
        let inner = counter.clone();
        let result = std::panic::catch_unwind(move || {
            let _guard = CountGuard::new(&inner);
            assert_eq!(inner.load(Ordering::SeqCst), 1);
            panic!("boom");
        });
        assert!(result.is_err());
        assert_eq!(counter.load(Ordering::SeqCst), 0);
    }
}
