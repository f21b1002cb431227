//! CPU time from /proc (read by the `procfs` crate): of a process tree, of the
//! whole machine, and of the children this process has reaped.
//!
//! A tree's time is, for the root and every live descendant, utime + stime
//! (all its threads) + cutime + cstime (the children it has reaped, with what
//! they had reaped). A process that exits between two readings moves from
//! "live" into its parent's cutime/cstime, so the difference of two readings
//! counts it whole: the backends Postgres forks and reaps, the helpers an
//! Erlang VM starts.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use procfs::CurrentSI;
use procfs::process::{FDTarget, Process};

/// What one process had used, as read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub ppid: i32,
    /// utime + stime + cutime + cstime, in clock ticks.
    pub ticks: i64,
    /// The command name (`postgres`, `beam.smp`).
    pub comm: String,
    /// When it started, in ticks after boot: the oldest has the smallest.
    pub starttime: u64,
}

/// Every process of the machine, as read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Processes(pub HashMap<i32, Proc>);

impl Processes {
    /// Reads /proc; processes that vanish while it reads are left out.
    pub fn read() -> anyhow::Result<Self> {
        let mut by_pid = HashMap::new();
        for process in procfs::process::all_processes().context("cannot read /proc")? {
            let Ok(stat) = process.and_then(|process| process.stat()) else { continue };
            let ticks = stat.utime as i64 + stat.stime as i64 + stat.cutime + stat.cstime;
            by_pid.insert(
                stat.pid,
                Proc { ppid: stat.ppid, ticks, comm: stat.comm, starttime: stat.starttime },
            );
        }
        Ok(Self(by_pid))
    }

    /// The ticks of `root` and its descendants; `None` when `root` does not
    /// run (any more), or is `None`.
    pub fn tree_ticks(&self, root: Option<i32>) -> Option<i64> {
        let root = root?;
        self.0.get(&root)?;
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for (&pid, process) in &self.0 {
            if pid != root && pid > 1 {
                children.entry(process.ppid).or_default().push(pid);
            }
        }
        let (mut total, mut stack, mut seen) = (0, vec![root], HashSet::new());
        while let Some(pid) = stack.pop() {
            if seen.insert(pid) {
                total += self.0[&pid].ticks;
                stack.extend(children.get(&pid).into_iter().flatten());
            }
        }
        Some(total)
    }

    /// The oldest process named `comm`.
    pub fn oldest(&self, comm: &str) -> Option<i32> {
        self.0
            .iter()
            .filter(|(_, process)| process.comm == comm)
            .min_by_key(|(pid, process)| (process.starttime, **pid))
            .map(|(pid, _)| *pid)
    }

    /// The processes named `comm`.
    pub fn named(&self, comm: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .0
            .iter()
            .filter(|(_, process)| process.comm == comm)
            .map(|(pid, _)| *pid)
            .collect();
        pids.sort_unstable();
        pids
    }
}

/// The difference of two readings of one tree; `None` when either lacks it.
pub fn delta(before: Option<i64>, after: Option<i64>) -> Option<i64> {
    Some(after? - before?)
}

/// Busy and total CPU time of the whole machine so far, in clock ticks, from
/// the first line of /proc/stat (busy excludes idle and iowait; guest time is
/// already in user and nice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineTicks {
    pub busy: i64,
    pub total: i64,
}

impl MachineTicks {
    pub fn read() -> anyhow::Result<Self> {
        let stat = procfs::KernelStats::current().context("cannot read /proc/stat")?;
        let cpu = &stat.total;
        Ok(Self::from_fields([
            cpu.user,
            cpu.nice,
            cpu.system,
            cpu.idle,
            cpu.iowait.unwrap_or(0),
            cpu.irq.unwrap_or(0),
            cpu.softirq.unwrap_or(0),
            cpu.steal.unwrap_or(0),
        ]))
    }

    /// From user, nice, system, idle, iowait, irq, softirq and steal.
    pub fn from_fields(fields: [u64; 8]) -> Self {
        let total: i64 = fields.iter().map(|&ticks| ticks as i64).sum();
        Self { busy: total - fields[3] as i64 - fields[4] as i64, total }
    }

    /// From `self` to `later`.
    pub fn until(self, later: Self) -> Self {
        Self { busy: later.busy - self.busy, total: later.total - self.total }
    }
}

/// The machine's clock ticks a second and its online cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub ticks_per_second: u64,
    pub cores: usize,
}

impl Clock {
    pub fn read() -> anyhow::Result<Self> {
        let stat = procfs::KernelStats::current().context("cannot read /proc/stat")?;
        Ok(Self { ticks_per_second: procfs::ticks_per_second(), cores: stat.cpu_time.len() })
    }
}

/// The CPU ticks (user + system) of the children this process has reaped so
/// far, with what they had reaped: getrusage(RUSAGE_CHILDREN), as cutime +
/// cstime. The difference around one child's run is that child's whole time,
/// exact even though it exits between two /proc readings, as long as no other
/// child is reaped meanwhile.
pub fn reaped_ticks() -> anyhow::Result<i64> {
    let stat = Process::myself().and_then(|me| me.stat()).context("cannot read /proc/self/stat")?;
    Ok(stat.cutime + stat.cstime)
}

/// The postmaster: the first line of `postmaster.pid` in the server's data
/// directory, else the oldest process named postgres.
pub fn postmaster_pid(data_directory: Option<&Path>, processes: &Processes) -> Option<i32> {
    let from_file = data_directory
        .and_then(|dir| std::fs::read_to_string(dir.join("postmaster.pid")).ok())
        .and_then(|text| parse_pid_file(&text))
        .filter(|pid| processes.0.contains_key(pid));
    from_file.or_else(|| processes.oldest("postgres"))
}

/// The pid on the first line of a `postmaster.pid`.
pub fn parse_pid_file(text: &str) -> Option<i32> {
    text.lines().next()?.trim().parse().ok().filter(|pid| *pid > 0)
}

/// The broker behind `port`: the process called `name` (`beam.smp` for a
/// RabbitMQ node, `tansu`) holding the socket that listens on it (root sees
/// every process's sockets), else the machine's only process of that name.
pub fn listening_pid(port: u16, name: &str, processes: &Processes) -> Option<i32> {
    let beams = processes.named(name);
    let listening: HashSet<u64> = [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .filter(|socket| {
            socket.state == procfs::net::TcpState::Listen && socket.local_address.port() == port
        })
        .map(|socket| socket.inode)
        .collect();
    let holder = beams.iter().copied().find(|&pid| {
        let Ok(fds) = Process::new(pid).and_then(|process| process.fd()) else { return false };
        fds.flatten()
            .any(|fd| matches!(fd.target, FDTarget::Socket(inode) if listening.contains(&inode)))
    });
    holder.or(match beams.as_slice() {
        [only] => Some(*only),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(ppid: i32, ticks: i64, comm: &str, starttime: u64) -> Proc {
        Proc { ppid, ticks, comm: comm.to_owned(), starttime }
    }

    /// init, a postmaster (100) with two backends and a grandchild, and an
    /// unrelated process.
    fn reading(backend_ticks: i64) -> Processes {
        Processes(HashMap::from([
            (1, proc(0, 1_000, "systemd", 1)),
            (100, proc(1, 50, "postgres", 10)),
            (101, proc(100, backend_ticks, "postgres", 20)),
            (102, proc(100, 7, "postgres", 21)),
            (103, proc(102, 3, "sh", 22)),
            (200, proc(1, 900, "cargo", 5)),
        ]))
    }

    #[test]
    fn a_tree_is_its_root_and_every_descendant_and_nothing_else() {
        assert_eq!(reading(40).tree_ticks(Some(100)), Some(50 + 40 + 7 + 3));
        assert_eq!(reading(40).tree_ticks(Some(102)), Some(7 + 3));
        assert_eq!(reading(40).tree_ticks(Some(200)), Some(900));
    }

    #[test]
    fn a_root_that_does_not_run_has_no_figure() {
        assert_eq!(reading(40).tree_ticks(Some(999)), None);
        assert_eq!(reading(40).tree_ticks(None), None);
        assert_eq!(delta(Some(10), None), None);
        assert_eq!(delta(None, Some(10)), None);
    }

    #[test]
    fn a_child_that_exits_between_readings_counts_whole_through_its_parent() {
        let before = reading(40);
        // Backend 101 used 25 more ticks, then exited and was reaped by the
        // postmaster: its 65 ticks are now in the postmaster's cutime.
        let mut after = reading(0);
        after.0.remove(&101);
        after.0.get_mut(&100).unwrap().ticks = 50 + 65;
        let used = delta(before.tree_ticks(Some(100)), after.tree_ticks(Some(100)));
        assert_eq!(used, Some(25));
    }

    #[test]
    fn a_cycle_of_parents_is_counted_once() {
        let mut processes = reading(40);
        processes.0.get_mut(&100).unwrap().ppid = 103; // pid reuse can make one
        assert_eq!(processes.tree_ticks(Some(100)), Some(100));
    }

    #[test]
    fn the_oldest_by_start_time() {
        assert_eq!(reading(40).oldest("postgres"), Some(100));
        assert_eq!(reading(40).oldest("beam.smp"), None);
        assert_eq!(reading(40).named("postgres"), vec![100, 101, 102]);
    }

    #[test]
    fn the_postmaster_from_its_pid_file_else_the_oldest_postgres() {
        assert_eq!(parse_pid_file("4242\n/var/lib/postgresql/15/main\n"), Some(4242));
        assert_eq!(parse_pid_file(""), None);
        assert_eq!(parse_pid_file("x\n"), None);
        let dir = std::env::temp_dir().join(format!("xtask-cpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("postmaster.pid"), "102\n").unwrap();
        assert_eq!(postmaster_pid(Some(&dir), &reading(40)), Some(102));
        // A stale file names a process that is gone.
        std::fs::write(dir.join("postmaster.pid"), "4242\n").unwrap();
        assert_eq!(postmaster_pid(Some(&dir), &reading(40)), Some(100));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(postmaster_pid(None, &reading(40)), Some(100));
    }

    #[test]
    fn the_machine_is_busy_but_for_idle_and_iowait() {
        // user nice system idle iowait irq softirq steal
        let before = MachineTicks::from_fields([100, 10, 50, 800, 40, 0, 5, 0]);
        assert_eq!(before, MachineTicks { busy: 165, total: 1005 });
        let after = MachineTicks::from_fields([300, 10, 90, 1000, 40, 0, 5, 5]);
        assert_eq!(before.until(after), MachineTicks { busy: 245, total: 445 });
    }

    #[test]
    fn this_machine_reads() {
        let processes = Processes::read().unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(processes.tree_ticks(Some(me)).is_some());
        assert!(MachineTicks::read().unwrap().total > 0);
        let clock = Clock::read().unwrap();
        assert!(clock.ticks_per_second > 0 && clock.cores > 0);
        assert!(reaped_ticks().unwrap() >= 0);
    }
}
