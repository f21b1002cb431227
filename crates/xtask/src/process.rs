//! The processes a command starts: each killed when its handle drops, so a
//! run that fails half-way leaves nothing running; readiness by `/readyz`, in
//! one place; free ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A free port of 127.0.0.1, chosen by the system.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a port")?;
    Ok(listener.local_addr()?.port())
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
