//! Kafka for the runs of the whole system: where the broker is ([`brokers`]),
//! the services' settings ([`service_env`]), and [`Broker`].
//!
//! [`Broker`] is the Kafka-protocol broker of a chaos run: the tansu of `scripts/kafka-broker.sh`
//! on durable storage (a SQLite file), run here as a child so that a run can
//! SIGKILL it and start it again on the same port with the same records. It
//! listens on one port and tells clients another, where a fault proxy in
//! front of it listens: every client connection goes through the proxy.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// KAFKA_BROKERS, else the address of the broker `scripts/kafka-broker.sh
/// start` starts, in memory (the last line it prints).
pub async fn brokers() -> anyhow::Result<String> {
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS")
        && !brokers.is_empty()
    {
        return Ok(brokers);
    }
    println!("== KAFKA_BROKERS is unset: scripts/kafka-broker.sh start (topics in memory)");
    let output = Command::new("scripts/kafka-broker.sh")
        .arg("start")
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("cannot run scripts/kafka-broker.sh")?;
    let printed = String::from_utf8_lossy(&output.stdout);
    match printed.lines().last().and_then(|line| line.strip_prefix("KAFKA_BROKERS=")) {
        Some(brokers) if output.status.success() => Ok(brokers.trim().to_owned()),
        _ => bail!("scripts/kafka-broker.sh start failed ({})", output.status),
    }
}

/// A topic prefix of a run's own: `<prefix>.<unix seconds>.`.
pub fn run_prefix(prefix: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    format!("{prefix}.{}.", now.map_or(0, |since| since.as_secs()))
}

/// The settings that put both services on Kafka at `brokers`, on the topics
/// of `prefix`.
pub fn service_env(brokers: &str, prefix: &str) -> Vec<(String, String)> {
    [
        ("RELAY_TRANSPORT", "kafka"),
        ("CONSUMER_TRANSPORT", "kafka"),
        ("KAFKA_BROKERS", brokers),
        ("KAFKA_TOPIC_PREFIX", prefix),
    ]
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .to_vec()
}

/// The broker, SIGKILLed when dropped.
pub struct Broker {
    binary: PathBuf,
    storage: PathBuf,
    log: PathBuf,
    /// Where it listens.
    pub address: String,
    /// What it advertises: where clients reach it.
    advertised: String,
    child: Option<Child>,
}

impl Broker {
    /// The durable broker's binary, built by `scripts/kafka-broker.sh` when
    /// missing (once, into a cache outside the checkout).
    pub async fn binary() -> anyhow::Result<PathBuf> {
        println!("== the durable Kafka broker (scripts/kafka-broker.sh binary --durable)");
        let output = Command::new("scripts/kafka-broker.sh")
            .args(["binary", "--durable"])
            .stderr(Stdio::inherit())
            .output()
            .await
            .context("cannot run scripts/kafka-broker.sh")?;
        if !output.status.success() {
            bail!("scripts/kafka-broker.sh binary --durable failed ({})", output.status);
        }
        let path = String::from_utf8(output.stdout)?.trim().to_owned();
        Ok(PathBuf::from(path))
    }

    /// A broker with its storage in `storage` (emptied: a fresh cluster),
    /// listening on `port` and advertising `advertised_port`. Not started.
    pub fn new(
        binary: PathBuf,
        storage: &Path,
        port: u16,
        advertised_port: u16,
    ) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(storage);
        std::fs::create_dir_all(storage)
            .with_context(|| format!("cannot make {}", storage.display()))?;
        Ok(Self {
            binary,
            storage: storage.to_owned(),
            log: storage.join("broker.log"),
            address: format!("127.0.0.1:{port}"),
            advertised: format!("127.0.0.1:{advertised_port}"),
            child: None,
        })
    }

    /// Starts it and waits until it accepts connections.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.binary)
            .arg("broker")
            .args(["--listener-url", &format!("tcp://{}", self.address)])
            .args(["--advertised-listener-url", &format!("tcp://{}", self.advertised)])
            // Relative to the working directory: the file is storage/tansu.db.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.storage)
            .env_remove("STORAGE_ENGINE")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if tokio::net::TcpStream::connect(&self.address).await.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("the Kafka broker exited ({status}); see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the Kafka broker did not listen within 20 s; see {}", self.log.display())
    }

    /// SIGKILL (a crash: what it acknowledged is in its storage), then starts
    /// it again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        self.start().await
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}
