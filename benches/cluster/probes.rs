//! What the process and the machine spend, from procfs: resident memory, UDP datagrams sent,
//! CPU time, context switches, and the machine and load lines of the report.

use super::*;

pub(crate) fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// UDP datagrams sent by this host so far (`/proc/net/snmp`, all processes).
pub(crate) fn udp_out() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == "OutDatagrams")?;
    values.get(i)?.parse().ok()
}

/// CPU time used by this process so far, all threads (`/proc/self/stat`, 10 ms resolution).
pub(crate) fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Context switches of every thread of this process so far (`/proc/self/task/*/status`).
/// Threads that exited in between are not counted.
pub(crate) fn process_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// The calling thread's (voluntary, involuntary) context switches so far.
pub(crate) fn context_switches() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (
        field("voluntary_ctxt_switches:"),
        field("nonvoluntary_ctxt_switches:"),
    )
}

/// What one measured phase cost the machine: CPU time, context switches, UDP datagrams.
#[derive(Default)]
pub(crate) struct Cost {
    pub(crate) cpu: Duration,
    pub(crate) wall: Duration,
    pub(crate) switches: u64,
    pub(crate) udp: u64,
}

pub(crate) struct CostMeter {
    pub(crate) cpu: Duration,
    pub(crate) wall: Instant,
    pub(crate) switches: u64,
    pub(crate) udp: u64,
}

impl CostMeter {
    pub(crate) fn start() -> Self {
        CostMeter {
            cpu: cpu_time(),
            wall: Instant::now(),
            switches: process_switches(),
            udp: udp_out().unwrap_or(0),
        }
    }
    pub(crate) fn stop(&self) -> Cost {
        Cost {
            cpu: cpu_time().saturating_sub(self.cpu),
            wall: self.wall.elapsed(),
            switches: process_switches().saturating_sub(self.switches),
            udp: udp_out().unwrap_or(0).saturating_sub(self.udp),
        }
    }
}

impl Cost {
    pub(crate) fn add(&mut self, o: Cost) {
        self.cpu += o.cpu;
        self.wall += o.wall;
        self.switches += o.switches;
        self.udp += o.udp;
    }

    /// CPU, context switches and datagrams per op, and how many cores were busy.
    pub(crate) fn per(&self, ops: f64, what: &str) -> String {
        let ops = ops.max(1.0);
        format!(
            "per {what} (all nodes): {:.1} µs CPU, {:.1} context switches, {:.2} UDP datagrams; {:.2} cores busy",
            self.cpu.as_secs_f64() * 1e6 / ops,
            self.switches as f64 / ops,
            self.udp as f64 / ops,
            self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
        )
    }
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let out = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rustc = out("rustc", &["-V"]).unwrap_or_else(|| "?".into());
    let commit = out("git", &["rev-parse", "--short", "HEAD"])
        .map(|c| {
            let dirty = out("git", &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c} + uncommitted changes")
            } else {
                c
            }
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "Machine: {nproc} CPUs (nproc), {cpu}, {mem} RAM, Linux {kernel}; {rustc}; commit {commit}"
    )
}

/// The 1-minute load average.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
