//! The processes a command starts: each killed when its handle drops, so a
//! run that fails half-way leaves nothing running; readiness by `/readyz`, in
//! one place; free ports; where the local Postgres and RabbitMQ are.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A free port of 127.0.0.1, chosen by the system.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a port")?;
    Ok(listener.local_addr()?.port())
}

/// Where the local services are: as scripts/services.sh says (PG_HOST,
/// PG_PORT, AMQP_HOST, AMQP_PORT), else the defaults.
pub struct Local {
    /// `host:port` of Postgres.
    pub pg: String,
    /// `host:port` of RabbitMQ.
    pub amqp: String,
}

impl Local {
    pub fn from_env() -> Self {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        Self {
            pg: format!("{}:{}", var("PG_HOST", "127.0.0.1"), var("PG_PORT", "5432")),
            amqp: format!("{}:{}", var("AMQP_HOST", "127.0.0.1"), var("AMQP_PORT", "5672")),
        }
    }

    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://postgres:postgres@{}/{database}", self.pg)
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp)
    }
}

/// The broker a run of the whole system uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Rabbitmq,
    Kafka,
}

/// Where the binaries of `profile` are (`$CARGO_TARGET_DIR`, else `target`).
pub fn bin_dir(profile: &str) -> PathBuf {
    PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or("target".into())).join(profile)
}

/// Runs `work` until it ends or SIGINT or SIGTERM arrives; then `work` is
/// dropped, and with it every [`Service`] and guard it holds, so an
/// interrupted run leaves nothing behind either.
pub async fn until_signal<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        outcome = work => outcome,
        _ = tokio::signal::ctrl_c() => bail!("interrupted (SIGINT)"),
        _ = terminate.recv() => bail!("terminated (SIGTERM)"),
    }
}

/// One of the project's services, run from its binary with its environment,
/// logging to a file; SIGKILLed when dropped.
pub struct Service {
    name: &'static str,
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// `http://127.0.0.1:<port>`, where `/readyz` answers.
    pub url: String,
    child: Option<Child>,
}

impl Service {
    /// `binary` listening on 127.0.0.1:`port`, with `env`, logging (appending)
    /// to `<logs>/<name>.log`. Not started yet.
    pub fn new(
        name: &'static str,
        bin_dir: &Path,
        port: u16,
        env: Vec<(String, String)>,
        logs: &Path,
    ) -> Self {
        let mut env = env;
        env.push(("LISTEN_ADDR".to_owned(), format!("127.0.0.1:{port}")));
        Self {
            name,
            binary: bin_dir.join(name),
            env,
            log: logs.join(format!("{name}.log")),
            url: format!("http://127.0.0.1:{port}"),
            child: None,
        }
    }

    /// Logs to `log` (appending) instead, for two of the same service.
    pub fn logging_to(mut self, log: PathBuf) -> Self {
        self.log = log;
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// How it ended, if it has (without waiting).
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// The last `lines` lines of its log, for an error message.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM (a graceful stop finishes the in-flight batch), then SIGKILL
    /// if it still runs after `within`. Whether it stopped on the SIGTERM.
    pub async fn stop(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        if let Some(pid) = child.id() {
            // std has no SIGTERM and this workspace forbids unsafe code: kill(1).
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        match tokio::time::timeout(within, child.wait()).await {
            Ok(_) => true,
            Err(_) => {
                let _ = child.kill().await;
                false
            }
        }
    }

    /// Starts it (again).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let child = Command::new(&self.binary)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts it and prints `   <name>: pid <pid>, <url>, log <file>`.
    pub fn start_announced(&mut self) -> anyhow::Result<()> {
        self.start()?;
        println!(
            "   {}: pid {}, {}, log {}",
            self.name,
            self.pid().unwrap_or_default(),
            self.url,
            self.log.display()
        );
        Ok(())
    }

    /// SIGKILL, and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Waits until `/readyz` answers 200; fails if it exits first or `within` passes.
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let ready = client.get(format!("{}/readyz", self.url)).send().await;
            if ready.is_ok_and(|response| response.status().is_success()) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited ({status}) before it was ready; see {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("{} was not ready within {within:?}; see {}", self.name, self.log.display())
    }
}

/// The binaries every run of the whole system uses.
pub const SERVICE_BINARIES: [&str; 3] = ["order-service", "inventory-consumer", "stress-test"];

/// `cargo build --release --locked` of [`SERVICE_BINARIES`] (with `-q` when
/// `quiet`), failing unless it succeeds. Uses `$CARGO`, the cargo running the
/// xtask, when set.
pub async fn build_release(quiet: bool) -> anyhow::Result<()> {
    build_services(true, quiet).await
}

/// `cargo build` of the service binaries, `--release` or in the dev profile.
///
/// With `OUTBOX_PREBUILT=1` (scripts/test.sh) the dev-profile binaries are
/// taken as they are: test.sh built them with the tests' features, and a
/// `cargo build` here would resolve other features and compile the workspace
/// a second time.
pub async fn build_services(release: bool, quiet: bool) -> anyhow::Result<()> {
    if !release && std::env::var("OUTBOX_PREBUILT").is_ok_and(|value| value == "1") {
        let dir = bin_dir("debug");
        for binary in SERVICE_BINARIES {
            if !dir.join(binary).is_file() {
                bail!("OUTBOX_PREBUILT=1 but {} is not built", dir.join(binary).display());
            }
        }
        println!("(OUTBOX_PREBUILT=1: the binaries in {} as they are)", dir.display());
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    build.args(["build", "--locked"]);
    if release {
        build.arg("--release");
    }
    if quiet {
        build.arg("-q");
    }
    for binary in SERVICE_BINARIES {
        build.args(["-p", binary]);
    }
    let status = build.status().await.context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    Ok(())
}

/// Runs `program args`, failing with its output unless it succeeds.
pub async fn command(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
