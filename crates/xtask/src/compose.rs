//! `cargo xtask compose-smoke`: docker-compose.yml run for real, as a user
//! would: the stack up, orders posted over HTTP, each seen decided with psql
//! inside the postgres container, a short stress test, `order-service
//! reconcile`, everything down with its volumes; then the same for the cluster
//! of docker-compose.cluster.yml (three RabbitMQ nodes that must form one
//! cluster, two replicas of each service, orders to both APIs, a quorum queue).
//! The last line is
//!
//!   compose-smoke: posted=N completed=N
//!
//! and the run succeeds only when the two are equal.
//!
//! Two ways to run, chosen by what the machine has:
//! - a Docker engine answers and so does the registry: the compose files
//!   exactly as the README says (`up -d --build`), official images;
//! - otherwise (no registry, as on CI here), as root: Debian's docker.io,
//!   docker-compose and debootstrap installed when missing, a private dockerd
//!   ([`Engine`]: state under .run/docker, its own socket, no iptables, no
//!   bridge — the host's network is left alone; stopped by its pid when
//!   dropped), stand-in images from Debian's packages (deploy/standins; the
//!   debootstrap base cached in ~/.cache/outbox), the service image from
//!   binaries compiled on the host, and containers on the host's network
//!   through docker-compose.smoke.yml and docker-compose.smoke-cluster.yml,
//!   merged ([`host_network`]) on ports away from the services already running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::sync::OnceLock;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

/// The socket of the engine this run started, if it started one: every docker
/// and docker-compose command is pointed at it.
static DOCKER_HOST: OnceLock<String> = OnceLock::new();

/// `program`, aimed at this run's engine.
fn tool(program: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    if let Some(host) = DOCKER_HOST.get() {
        command.env("DOCKER_HOST", host);
    }
    command
}

/// Runs `program args` (see [`tool`]), failing with its stderr unless it succeeds.
async fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output =
        tool(program).args(args).output().await.with_context(|| format!("cannot run {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `cargo xtask compose-smoke`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Orders posted over HTTP to each stack.
    #[arg(long, default_value_t = 20)]
    orders: usize,
    /// Where no registry answers: the cargo profile of the binaries put into
    /// the service image. `dev` reuses what `cargo test` built (scripts/test.sh
    /// passes it, saving a release build); `release` is what the Dockerfile
    /// builds.
    #[arg(long, value_enum, default_value_t = Profile::Release)]
    profile: Profile,
}

/// A cargo profile of the service binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Dev,
    Release,
}

const PROJECT: &str = "outbox-smoke";
const SINGLE_SERVICES: [&str; 4] = ["postgres", "rabbitmq", "order-service", "inventory-consumer"];
const CLUSTER_SERVICES: [&str; 8] = [
    "postgres",
    "rabbitmq",
    "rabbitmq-b",
    "rabbitmq-c",
    "order-service",
    "order-service-2",
    "inventory-consumer",
    "inventory-consumer-2",
];

fn say(message: impl std::fmt::Display) {
    eprintln!("compose-smoke: {message}");
}

/// How this machine runs the stacks.
struct Mode {
    name: &'static str,
    /// The client binary.
    docker: &'static str,
    /// `-f` arguments of the one-of-each stack and of the cluster.
    single: Vec<String>,
    cluster: Vec<String>,
    /// The two APIs (the second only in the cluster).
    apis: [&'static str; 2],
    prometheus: &'static str,
    observability: &'static [&'static str],
    up_args: &'static [&'static str],
}

pub async fn run(args: Args) -> anyhow::Result<bool> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize()?;
    std::env::set_current_dir(&root)?;
    let run_dir = root.join(".run/compose");
    std::fs::create_dir_all(&run_dir)?;

    let mut engine = None;
    let mode = if docker_answers("docker").await && registry_answers().await {
        say("a Docker engine and the registry answer: the compose files as the README runs them");
        for port in [5432, 5672, 15672, 8080, 8081, 8082, 8083] {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                bail!(
                    "port {port} is in use; the compose files publish it (stop the local service first)"
                );
            }
        }
        Mode {
            name: "registry",
            docker: "docker",
            single: files(&["docker-compose.yml"]),
            cluster: files(&["docker-compose.yml", "docker-compose.cluster.yml"]),
            apis: ["http://127.0.0.1:8080", "http://127.0.0.1:8082"],
            prometheus: "http://127.0.0.1:9090",
            observability: &["prometheus", "grafana"],
            up_args: &["--build"],
        }
    } else {
        engine = Some(Engine::start(&root.join(".run/docker")).await?);
        prepare_host_network(&root, &run_dir).await?;
        build_standins("/usr/bin/docker").await?;
        build_service_image("/usr/bin/docker", &root, args.profile).await?;
        Mode {
            name: "standins",
            docker: "/usr/bin/docker",
            single: files(&[".run/compose/docker-compose.smoke-merged.yml"]),
            cluster: files(&[".run/compose/docker-compose.smoke-cluster-merged.yml"]),
            apis: ["http://127.0.0.1:18080", "http://127.0.0.1:18082"],
            prometheus: "http://127.0.0.1:19090",
            observability: &["prometheus"],
            up_args: &["--no-build"],
        }
    };

    let outcome = stacks(&mode, args.orders).await;
    drop(engine);
    let (posted, completed) = outcome?;
    println!("compose-smoke: posted={posted} completed={completed}");
    Ok(posted == completed)
}

fn files(names: &[&str]) -> Vec<String> {
    names.iter().flat_map(|name| ["-f".to_owned(), (*name).to_owned()]).collect()
}

/// Both stacks, each taken down with its volumes whatever happens.
async fn stacks(mode: &Mode, orders: usize) -> anyhow::Result<(usize, usize)> {
    let mut posted = 0;
    let mut completed = 0;

    let single = Stack::up(mode, &mode.single, &SINGLE_SERVICES, "the stack").await?;
    let outcome = async {
        single.wait_healthy(&["order-service", "inventory-consumer"]).await?;
        completed += single.post_and_decide("smoke", &mode.apis[..1], orders).await?;
        posted += orders;
        single.observability().await?;
        say("stress test: 500 orders, 8 in flight (docker compose run --rm stress-test)");
        single
            .compose_status(&[
                "run",
                "--rm",
                "stress-test",
                "--orders",
                "500",
                "--concurrency",
                "8",
            ])
            .await
            .context("the stress test failed")?;
        single.reconcile().await
    }
    .await;
    single.down(outcome.is_err()).await;
    outcome?;

    let cluster = Stack::up(mode, &mode.cluster, &CLUSTER_SERVICES, "the cluster").await?;
    let outcome = async {
        cluster.wait_healthy(&CLUSTER_SERVICES[1..]).await?;
        let status = cluster
            .compose_output(&["exec", "-T", "rabbitmq", "rabbitmqctl", "-q", "cluster_status", "--formatter", "json"])
            .await
            .context("cannot read the cluster's status (rabbitmqctl cluster_status)")?;
        let nodes = running_nodes(&status)?;
        ensure!(nodes == 3, "the cluster has {nodes} running nodes, not 3");
        say("the three RabbitMQ nodes form one cluster (rabbitmqctl cluster_status: 3 running nodes)");
        completed += cluster.post_and_decide("cluster", &mode.apis, orders).await?;
        posted += orders;
        let queues = cluster
            .compose_output(&["exec", "-T", "rabbitmq", "rabbitmqctl", "-q", "list_queues", "name", "type", "--formatter", "json"])
            .await?;
        let queue = "inventory.order-placed";
        let kind = queue_type(&queues, queue)?;
        ensure!(kind.as_deref() == Some("quorum"), "the queue {queue} is {kind:?}, not a quorum queue");
        say(format!("the queue {queue} is a quorum queue"));
        cluster.reconcile().await
    }
    .await;
    cluster.down(outcome.is_err()).await;
    outcome?;
    Ok((posted, completed))
}

/// One compose project brought up.
struct Stack<'a> {
    mode: &'a Mode,
    files: &'a [String],
}

impl<'a> Stack<'a> {
    async fn up(
        mode: &'a Mode,
        files: &'a [String],
        services: &[&str],
        what: &str,
    ) -> anyhow::Result<Self> {
        say(format!("docker compose up: {what} ({})", mode.name));
        let stack = Self { mode, files };
        let mut args = vec!["up", "-d"];
        args.extend(mode.up_args);
        args.extend(services);
        if let Err(error) = stack.compose_output(&args).await {
            stack.down(true).await;
            return Err(error.context(format!("docker compose up ({what}) failed")));
        }
        Ok(stack)
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tool(self.mode.docker);
        command.args(["compose", "-p", PROJECT]).args(self.files).args(args);
        command
    }

    /// Runs `docker compose <args>` (or docker-compose, where the client has no
    /// compose plugin), with its output on this process's stderr.
    async fn compose_status(&self, args: &[&str]) -> anyhow::Result<()> {
        let status = if compose_plugin(self.mode.docker).await {
            self.command(args).stdout(Stdio::from(std::io::stderr())).status().await?
        } else {
            tool("docker-compose")
                .args(["-p", PROJECT])
                .args(self.files)
                .args(args)
                .stdout(Stdio::from(std::io::stderr()))
                .status()
                .await?
        };
        ensure!(status.success(), "docker compose {} failed ({status})", args.join(" "));
        Ok(())
    }

    async fn compose_output(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = if compose_plugin(self.mode.docker).await {
            self.command(args).output().await?
        } else {
            tool("docker-compose")
                .args(["-p", PROJECT])
                .args(self.files)
                .args(args)
                .output()
                .await?
        };
        ensure!(
            output.status.success(),
            "docker compose {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    async fn healthy(&self, service: &str) -> bool {
        let Ok(id) = self.compose_output(&["ps", "-q", service]).await else { return false };
        let id = id.trim();
        if id.is_empty() {
            return false;
        }
        output(self.mode.docker, &["inspect", "-f", "{{.State.Health.Status}}", id])
            .await
            .is_ok_and(|status| status.trim() == "healthy")
    }

    async fn wait_healthy(&self, services: &[&str]) -> anyhow::Result<()> {
        let started = Instant::now();
        let within = Duration::from_secs(150);
        loop {
            let mut all = true;
            for service in services {
                all &= self.healthy(service).await;
            }
            if all {
                say(format!(
                    "{} healthy after {} s",
                    services.join(" "),
                    started.elapsed().as_secs()
                ));
                return Ok(());
            }
            ensure!(
                started.elapsed() < within,
                "{} were not healthy within 150 s",
                services.join(" ")
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.compose_output(&[
            "exec", "-T", "postgres", "psql", "-U", "postgres", "-d", "outbox", "-tAc", sql,
        ])
        .await
    }

    /// Posts `orders` orders, in turn to each of `apis`, then waits until psql
    /// in the postgres container shows each decided; how many were.
    async fn post_and_decide(
        &self,
        label: &str,
        apis: &[&str],
        orders: usize,
    ) -> anyhow::Result<usize> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let mut ids = Vec::with_capacity(orders);
        for n in 1..=orders {
            let api = apis[n % apis.len()];
            let body = serde_json::json!({
                "customer_id": format!("{label}-{n}"),
                "items": [{"sku": format!("SKU-{:03}", 1 + n % 20), "quantity": 1}],
            });
            let response = client
                .post(format!("{api}/orders"))
                .json(&body)
                .send()
                .await
                .with_context(|| format!("POST {api}/orders ({label} {n}) did not answer"))?;
            let status = response.status();
            let answer: Value = response.json().await.unwrap_or_default();
            ensure!(
                status.as_u16() == 201,
                "POST {api}/orders ({label} {n}) answered {status}: {answer}"
            );
            ids.push(answer["id"].as_str().context("the order has no id")?.to_owned());
        }
        say(format!("{label}: posted {orders} orders over HTTP to {}", apis.join(" ")));
        let list = ids.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",");
        let count = format!(
            "SELECT count(*) FROM orders WHERE id IN ({list}) AND status IN ('COMPLETED', 'REJECTED')"
        );
        let mut decided = 0;
        for _ in 0..60 {
            decided = self.psql(&count).await?.trim().parse().unwrap_or(0);
            if decided == orders {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        say(format!("{label}: psql in the postgres container: {decided} of {orders} decided"));
        self.compose_status(&[
            "exec",
            "-T",
            "postgres",
            "psql",
            "-U",
            "postgres",
            "-d",
            "outbox",
            "-c",
            &format!("SELECT status, count(*) FROM orders WHERE id IN ({list}) GROUP BY status"),
        ])
        .await?;
        ensure!(
            decided == orders,
            "{label}: {} orders were not decided within 30 s",
            orders - decided
        );
        Ok(decided)
    }

    /// The observability profile: Prometheus scrapes both services.
    async fn observability(&self) -> anyhow::Result<()> {
        say(format!("observability profile: {}", self.mode.observability.join(" ")));
        let mut args = vec!["--profile", "observability", "up", "-d"];
        args.extend(self.mode.up_args);
        args.extend(self.mode.observability);
        self.compose_output(&args)
            .await
            .context("docker compose --profile observability up failed")?;
        if self.mode.name == "standins" {
            say("!! grafana is not checked here: it has no Debian package, so no stand-in");
        }
        let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?;
        let url = format!("{}/api/v1/targets", self.mode.prometheus);
        for _ in 0..60 {
            if let Ok(response) = client.get(&url).send().await
                && let Ok(targets) = response.json::<Value>().await
                && both_targets_up(&targets)
            {
                say("Prometheus scrapes order-service and inventory-consumer (both targets up)");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        bail!("Prometheus does not scrape both services ({url})")
    }

    async fn reconcile(&self) -> anyhow::Result<()> {
        say("order-service reconcile");
        self.compose_status(&["exec", "-T", "order-service", "order-service", "reconcile"])
            .await
            .context("reconcile found a problem")
    }

    /// Down with its volumes; after a failure, the services' last logs first.
    async fn down(&self, failed: bool) {
        if failed {
            say("the services' last logs:");
            let _ = self.compose_status(&["logs", "--tail", "30"]).await;
        }
        let _ = self
            .compose_output(&[
                "--profile",
                "tools",
                "--profile",
                "observability",
                "down",
                "-v",
                "--remove-orphans",
            ])
            .await;
    }
}

/// Whether Prometheus's `/api/v1/targets` shows both services' jobs up.
fn both_targets_up(targets: &Value) -> bool {
    let Some(active) = targets["data"]["activeTargets"].as_array() else { return false };
    let up = |job: &str| {
        active.iter().any(|target| target["labels"]["job"] == job && target["health"] == "up")
    };
    up("order-service") && up("inventory-consumer")
}

/// The running nodes in `rabbitmqctl cluster_status --formatter json`.
fn running_nodes(status: &str) -> anyhow::Result<usize> {
    let status: Value = serde_json::from_str(status).context("cluster_status is not JSON")?;
    Ok(status["running_nodes"].as_array().map_or(0, Vec::len))
}

/// The type of `queue` in `rabbitmqctl list_queues name type --formatter json`.
fn queue_type(queues: &str, queue: &str) -> anyhow::Result<Option<String>> {
    let queues: Value = serde_json::from_str(queues).context("list_queues is not JSON")?;
    Ok(queues
        .as_array()
        .and_then(|queues| queues.iter().find(|entry| entry["name"] == queue))
        .and_then(|entry| entry["type"].as_str())
        .map(str::to_owned))
}

async fn docker_answers(docker: &str) -> bool {
    tool(docker)
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success())
}

async fn compose_plugin(docker: &str) -> bool {
    tool(docker)
        .args(["compose", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success())
}

/// Docker Hub answers (401 without credentials counts).
async fn registry_answers() -> bool {
    let Ok(client) = reqwest::Client::builder().timeout(Duration::from_secs(5)).build() else {
        return false;
    };
    client
        .get("https://registry-1.docker.io/v2/")
        .send()
        .await
        .is_ok_and(|response| response.status().is_success() || response.status().as_u16() == 401)
}

/// A private dockerd: state under `state`, its own socket, no iptables, no
/// bridge. Stopped by its pid, and its leftover mounts unmounted, when dropped.
struct Engine {
    state: PathBuf,
    child: std::process::Child,
}

impl Engine {
    async fn start(state: &Path) -> anyhow::Result<Self> {
        ensure!(is_root(), "no Docker engine answers, and starting one needs root");
        install_missing("dockerd", &["docker.io"])?;
        install_missing("docker-compose", &["docker-compose"])?;
        install_missing("debootstrap", &["debootstrap"])?;
        std::fs::create_dir_all(state)?;
        let pidfile = state.join("docker.pid");
        if let Ok(pid) = std::fs::read_to_string(&pidfile)
            && Path::new(&format!("/proc/{}", pid.trim())).exists()
        {
            bail!(
                "a private engine from an earlier run still runs (pid {}); stop it first",
                pid.trim()
            );
        }
        let socket = format!("unix://{}/docker.sock", state.display());
        DOCKER_HOST.set(socket.clone()).ok().context("one engine per run")?;
        say("starting a private Docker engine (logs: .run/docker/dockerd.log)");
        let log = std::fs::File::create(state.join("dockerd.log"))?;
        let child = std::process::Command::new("dockerd")
            .arg("--data-root")
            .arg(state.join("data"))
            .arg("--exec-root")
            .arg(state.join("exec"))
            .args(["--host", &socket])
            .arg("--pidfile")
            .arg(&pidfile)
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start dockerd")?;
        let mut engine = Self { state: state.to_owned(), child };
        for _ in 0..60 {
            if docker_answers("/usr/bin/docker").await {
                return Ok(engine);
            }
            if engine.child.try_wait()?.is_some() {
                bail!("dockerd exited; see .run/docker/dockerd.log");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!("dockerd did not answer within 30 s; see .run/docker/dockerd.log")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill").arg(&pid).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // dockerd leaves its bind of the host's network namespace mounted under
        // its exec root: unmounted, deepest first, so nothing is left behind.
        let prefix = format!("{}/", self.state.display());
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter(|mount| mount.starts_with(&prefix))
            .collect();
        ours.sort_unstable_by(|a, b| b.cmp(a));
        for mount in ours {
            let unmounted = std::process::Command::new("umount").arg(mount).status();
            if !unmounted.is_ok_and(|status| status.success()) {
                let _ = std::process::Command::new("umount").args(["-l", mount]).status();
            }
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
    })
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

/// Installs `packages` unless `command` is on the PATH, with a policy-rc.d that
/// keeps packages from starting services (docker.io would start the system's
/// engine) for the install only.
fn install_missing(command: &str, packages: &[&str]) -> anyhow::Result<()> {
    if on_path(command) {
        return Ok(());
    }
    say(format!("installing {}", packages.join(" ")));
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::process::Command::new("chmod").args(["+x", "/usr/sbin/policy-rc.d"]).status()?;
    }
    let install = |update: bool| {
        if update {
            let _ = std::process::Command::new("apt-get").args(["update", "-qq"]).status();
        }
        std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    let installed = install(false) || install(true);
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    ensure!(installed, "cannot install {}", packages.join(" "));
    Ok(())
}

/// The merged compose files of stand-in mode, Prometheus's config pointed at
/// 127.0.0.1, and the cluster's peer list with the smoke test's node names.
async fn prepare_host_network(root: &Path, run_dir: &Path) -> anyhow::Result<()> {
    let prometheus = std::fs::read_to_string(root.join("deploy/prometheus/prometheus.yml"))?
        .replace("\"order-service:8080\"", "\"127.0.0.1:18080\"")
        .replace("\"inventory-consumer:8081\"", "\"127.0.0.1:18081\"");
    std::fs::write(run_dir.join("prometheus.yml"), prometheus)?;
    let peers = (1..)
        .zip(["outbox-smoke", "outbox-smoke-b", "outbox-smoke-c"])
        .map(|(n, node)| format!("cluster_formation.classic_config.nodes.{n} = {node}@localhost\n"))
        .collect::<String>();
    std::fs::write(
        run_dir.join("rabbitmq-cluster.conf"),
        format!(
            "# Written by cargo xtask compose-smoke: the nodes of docker-compose.smoke-cluster.yml.\n\
             cluster_formation.peer_discovery_backend = classic_config\n{peers}"
        ),
    )?;
    for (merged_file, inputs) in [
        (
            "docker-compose.smoke-merged.yml",
            &["docker-compose.yml", "docker-compose.smoke.yml"][..],
        ),
        (
            "docker-compose.smoke-cluster-merged.yml",
            &[
                "docker-compose.yml",
                "docker-compose.cluster.yml",
                "docker-compose.smoke.yml",
                "docker-compose.smoke-cluster.yml",
            ][..],
        ),
    ] {
        let args: Vec<String> = files(inputs).into_iter().chain(["config".to_owned()]).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let config = output("docker-compose", &args)
            .await
            .with_context(|| format!("cannot merge {}", inputs.join(" ")))?;
        let merged = host_network(&config, root, run_dir)?;
        std::fs::write(run_dir.join(merged_file), merged)?;
    }
    Ok(())
}

/// `config` (the output of `docker-compose config`) for the host's network:
/// no published ports (host networking cannot publish them, and an override
/// cannot remove them: Compose merges lists), no hostnames, the cluster's
/// peer list and Prometheus's config replaced by the copies in `run_dir`, and
/// the host network as the default one (no bridge of its own).
fn host_network(config: &str, root: &Path, run_dir: &Path) -> anyhow::Result<String> {
    use yaml_serde::{Mapping, Value as Yaml};
    let mut config: Yaml =
        yaml_serde::from_str(config).context("docker-compose config is not YAML")?;
    let cluster_conf = format!("{}/deploy/rabbitmq-cluster.conf", root.display());
    let services = config
        .get_mut("services")
        .and_then(Yaml::as_mapping_mut)
        .context("the compose file has no services")?;
    for (name, service) in services.iter_mut() {
        let service = service.as_mapping_mut().context("a service is not a mapping")?;
        service.remove("ports");
        service.remove("hostname");
        let clustered = service
            .get("environment")
            .and_then(Yaml::as_mapping)
            .is_some_and(|environment| environment.contains_key("RABBITMQ_ERLANG_COOKIE"));
        let mut volumes: Vec<Yaml> = service
            .get("volumes")
            .and_then(Yaml::as_sequence)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|volume| {
                !volume.as_str().is_some_and(|volume| volume.starts_with(&cluster_conf))
            })
            .collect();
        if clustered {
            volumes.push(Yaml::from(format!(
                "{}/rabbitmq-cluster.conf:/etc/rabbitmq/conf.d/20-cluster.conf:ro",
                run_dir.display()
            )));
        }
        if name.as_str() == Some("prometheus") {
            volumes = vec![Yaml::from(format!(
                "{}/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
                run_dir.display()
            ))];
            if let Some(command) = service.get_mut("command").and_then(Yaml::as_sequence_mut) {
                command.push(Yaml::from("--web.listen-address=127.0.0.1:19090"));
            }
        }
        if volumes.is_empty() {
            service.remove("volumes");
        } else {
            service.insert(Yaml::from("volumes"), Yaml::Sequence(volumes));
        }
    }
    let mut host = Mapping::new();
    host.insert(Yaml::from("external"), Yaml::from(true));
    host.insert(Yaml::from("name"), Yaml::from("host"));
    let mut networks = Mapping::new();
    networks.insert(Yaml::from("default"), Yaml::Mapping(host));
    config
        .as_mapping_mut()
        .context("the compose file is not a mapping")?
        .insert(Yaml::from("networks"), Yaml::Mapping(networks));
    Ok(yaml_serde::to_string(&config)?)
}

async fn have_image(docker: &str, tag: &str) -> bool {
    output(docker, &["image", "inspect", tag]).await.is_ok()
}

/// The stand-in images, built once: a Debian base from debootstrap (its
/// tarball cached in ~/.cache/outbox), Postgres, RabbitMQ and Prometheus from
/// Debian's packages, tagged as the compose file names them.
async fn build_standins(docker: &str) -> anyhow::Result<()> {
    if !have_image(docker, "debian:bookworm-slim").await {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .context("no HOME")?
            .join("outbox");
        let base = cache.join("debian-bookworm-minbase.tar");
        if std::fs::metadata(&base).map_or(true, |file| file.len() == 0) {
            say(format!(
                "making a Debian base with debootstrap (once; cached in {})",
                base.display()
            ));
            std::fs::create_dir_all(&cache)?;
            let rootfs = tempdir()?;
            let log = std::fs::File::create(cache.join("debootstrap.log"))?;
            let made = std::process::Command::new("debootstrap")
                .args(["--variant=minbase", "bookworm"])
                .arg(&rootfs)
                .arg("http://deb.debian.org/debian")
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .status()?;
            if !made.success() {
                // It may leave /proc and /sys mounted in the root it was making.
                let _ = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "awk -v root='{}/' 'index($2, root) == 1 {{ print $2 }}' /proc/mounts | sort -r | xargs -r umount -l",
                        rootfs.display()
                    ))
                    .status();
                bail!("debootstrap failed; see {}", cache.join("debootstrap.log").display());
            }
            let partial = base.with_extension("tar.partial");
            let tarred = std::process::Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .args(["-cf"])
                .arg(&partial)
                .arg(".")
                .status()?;
            ensure!(tarred.success(), "cannot pack the Debian base");
            std::fs::rename(&partial, &base)?;
            std::fs::remove_dir_all(&rootfs)?;
        }
        let base = base.to_string_lossy().into_owned();
        output(docker, &["import", &base, "debian:bookworm-slim"]).await?;
    }
    for (tag, dir) in [
        ("postgres:15", "postgres"),
        ("rabbitmq:3-management", "rabbitmq"),
        ("prom/prometheus:v3.13.2", "prometheus"),
    ] {
        if !have_image(docker, tag).await {
            say(format!(
                "building the stand-in {tag} from Debian's packages (deploy/standins/{dir})"
            ));
            docker_build(
                docker,
                &["-q", "--network", "host", "-t", tag, &format!("deploy/standins/{dir}")],
            )
            .await?;
        }
    }
    Ok(())
}

/// The service image `outbox:dev`, from binaries compiled here (the
/// Dockerfile's `BINARIES` argument skips its Rust stage).
async fn build_service_image(docker: &str, root: &Path, profile: Profile) -> anyhow::Result<()> {
    const BINARIES: [&str; 3] = crate::process::SERVICE_BINARIES;
    let release = profile == Profile::Release;
    say(format!(
        "building the service image from binaries compiled here (cargo build{})",
        if release { " --release" } else { ", the dev profile" }
    ));
    crate::process::build_services(release, true).await?;
    let built = root.join(if release { "target/release" } else { "target/debug" });
    let context = root.join(".run/compose/prebuilt");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    for binary in BINARIES {
        let target = context.join(binary);
        std::fs::copy(built.join(binary), &target)?;
        output("strip", &["--strip-debug", &target.to_string_lossy()]).await?;
    }
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM scratch\nCOPY {} /out/\n", BINARIES.join(" ")),
    )?;
    docker_build(docker, &["-q", "-t", "outbox-prebuilt:smoke", &context.to_string_lossy()])
        .await?;
    docker_build(
        docker,
        &[
            "-q",
            "--network",
            "host",
            "--build-arg",
            "BINARIES=outbox-prebuilt:smoke",
            "-t",
            "outbox:dev",
            ".",
        ],
    )
    .await
}

async fn docker_build(docker: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = tool(docker).arg("build").args(args).env("DOCKER_BUILDKIT", "1").output().await?;
    ensure!(
        output.status.success(),
        "docker build {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("outbox-debootstrap-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
services:
  rabbitmq-b:
    image: rabbitmq:3-management
    hostname: rabbitmq-b
    environment:
      RABBITMQ_ERLANG_COOKIE: cookie
    volumes:
    - /repo/deploy/rabbitmq-cluster.conf:/etc/rabbitmq/conf.d/20-cluster.conf:ro
    ports:
    - 5673:5672
  order-service:
    image: outbox:dev
    ports:
    - 8080:8080
  prometheus:
    image: prom/prometheus:v3.13.2
    command: ["--config.file=/etc/prometheus/prometheus.yml"]
    volumes:
    - /repo/deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro
"#;

    #[test]
    fn the_host_network_file_has_no_ports_or_hostnames_and_its_own_peer_list() {
        let merged =
            host_network(CONFIG, Path::new("/repo"), Path::new("/repo/.run/compose")).unwrap();
        let merged: yaml_serde::Value = yaml_serde::from_str(&merged).unwrap();
        let services = &merged["services"];
        for service in ["rabbitmq-b", "order-service", "prometheus"] {
            assert!(services[service].get("ports").is_none(), "{service}");
            assert!(services[service].get("hostname").is_none(), "{service}");
        }
        assert_eq!(
            services["rabbitmq-b"]["volumes"][0],
            "/repo/.run/compose/rabbitmq-cluster.conf:/etc/rabbitmq/conf.d/20-cluster.conf:ro"
        );
        assert!(services["order-service"].get("volumes").is_none());
        assert_eq!(
            services["prometheus"]["volumes"][0],
            "/repo/.run/compose/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        );
        assert_eq!(services["prometheus"]["command"][1], "--web.listen-address=127.0.0.1:19090");
        assert_eq!(merged["networks"]["default"]["name"], "host");
        assert_eq!(merged["networks"]["default"]["external"], true);
    }

    #[test]
    fn prometheus_targets_count_only_when_both_jobs_are_up() {
        let targets = |health: &str| {
            serde_json::json!({"data": {"activeTargets": [
                {"labels": {"job": "order-service"}, "health": "up"},
                {"labels": {"job": "inventory-consumer"}, "health": health},
            ]}})
        };
        assert!(both_targets_up(&targets("up")));
        assert!(!both_targets_up(&targets("down")));
        assert!(!both_targets_up(&serde_json::json!({})));
    }

    #[test]
    fn rabbitmqctl_json_is_read() {
        let status =
            r#"{"running_nodes": ["a@localhost", "b@localhost", "c@localhost"], "disk_nodes": []}"#;
        assert_eq!(running_nodes(status).unwrap(), 3);
        let queues = r#"[{"name": "inventory.order-placed", "type": "quorum"}, {"name": "other", "type": "classic"}]"#;
        assert_eq!(
            queue_type(queues, "inventory.order-placed").unwrap().as_deref(),
            Some("quorum")
        );
        assert_eq!(queue_type(queues, "missing").unwrap(), None);
        assert!(running_nodes("not json").is_err());
    }
}
