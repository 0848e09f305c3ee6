//! What the benchmark reads from /proc: CPU time (of the proxy, of this process and of the
//! whole machine, so a phase can say how much of the box something else was using) and memory.

use std::time::{Duration, Instant};

/// Clock ticks per second of the `/proc` CPU counters (`getconf CLK_TCK`; 100 on Linux).
pub fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime of this process's threads whose name starts with `prefix`, in clock ticks.
fn own_threads_ticks(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter(|stat| {
            stat.split_once('(')
                .is_some_and(|(_, rest)| rest.starts_with(prefix))
        })
        .filter_map(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Context switches (voluntary and not) of the threads under `/proc/{pid}/task` whose name
/// starts with `prefix` (all of them with ""): each is a thread that went to sleep or was put
/// off the CPU, the cost of a hand-off between threads.
fn switches(pid: &str, prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter(|status| {
            status
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("Name:"))
                .is_some_and(|name| name.trim().starts_with(prefix))
        })
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Busy ticks of the whole machine (all CPUs, everything but idle and iowait).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3)? - v.get(4)?)
}

/// Microseconds all non-idle tasks have stalled on I/O at once since boot (the `full` line of
/// /proc/pressure/io; absent without PSI).
fn io_full_us() -> Option<u64> {
    let psi = std::fs::read_to_string("/proc/pressure/io").ok()?;
    let line = psi.lines().find(|l| l.starts_with("full"))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// (VmRSS, VmHWM) of a process in bytes.
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let [rss, hwm] = status_bytes(pid, ["VmRSS:", "VmHWM:"])?;
    Some((rss, hwm))
}

/// The resident set of a process split into (anonymous, file) bytes: what it allocated (heap,
/// stacks), and its executable's mapped pages, whose count depends on what the page cache
/// holds (the same binary reads a few MB apart with a warm or a dropped cache).
pub fn resident_split(pid: u32) -> Option<(u64, u64)> {
    let [anon, file] = status_bytes(pid, ["RssAnon:", "RssFile:"])?;
    Some((anon, file))
}

/// `kB` fields of one read of `/proc/PID/status`, in bytes.
fn status_bytes<const N: usize>(pid: u32, names: [&str; N]) -> Option<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut out = [0; N];
    for (slot, name) in out.iter_mut().zip(names) {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        *slot = kb * 1024;
    }
    Some(out)
}

/// CPU counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    at: Instant,
    machine: u64,
    own: u64,
    proxy: u64,
    relay: u64,
    db: u64,
    io_full_us: u64,
    proxy_switches: u64,
    relay_switches: u64,
}

/// CPU used between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuDelta {
    pub wall: Duration,
    /// CPU time of the proxy process.
    pub proxy: Duration,
    /// CPU time of this process (load generator and fake Bedrock, and the reference relay).
    pub own: Duration,
    /// CPU time of the reference relay's threads (part of `own`).
    pub relay: Duration,
    /// CPU time of the PostgreSQL cluster's processes, when the probe has a postmaster.
    pub db: Duration,
    /// Time every task of the machine waited for the disk at once (PSI `io full`); a shared
    /// disk busy with something else shows here, and slows every synced commit.
    pub io_full: Duration,
    /// CPU time of everything else on the machine (another build, say): noise.
    pub other: Duration,
    /// Context switches of the proxy's threads.
    pub proxy_switches: u64,
    /// Context switches of the reference relay's threads.
    pub relay_switches: u64,
}

impl CpuDelta {
    /// `other` as a share of one core.
    pub fn other_cores(&self) -> f64 {
        self.other.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// `io_full` as a share of the window.
    pub fn io_stalled(&self) -> f64 {
        self.io_full.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Takes snapshots of the machine, this process and (when set) the proxy.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub proxy_pid: Option<u32>,
    /// The postmaster of the PostgreSQL cluster a proxy writes to: its processes' CPU is the
    /// store's, not noise.
    pub db_pid: Option<u32>,
    tck: u64,
}

impl Probe {
    pub fn new(proxy_pid: Option<u32>) -> Probe {
        Probe {
            proxy_pid,
            db_pid: None,
            tck: clk_tck(),
        }
    }

    /// A probe of `proxy_pid` that also counts the cluster under `postmaster`.
    pub fn with_db(proxy_pid: u32, postmaster: Option<u32>) -> Probe {
        Probe {
            db_pid: postmaster,
            ..Probe::new(Some(proxy_pid))
        }
    }

    pub fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            machine: machine_busy_ticks().unwrap_or(0),
            own: process_ticks("self").unwrap_or(0),
            proxy: self
                .proxy_pid
                .and_then(|p| process_ticks(&p.to_string()))
                .unwrap_or(0),
            relay: own_threads_ticks(crate::relay::THREAD_PREFIX),
            db: self.db_pid.map_or(0, crate::pg::cluster_ticks),
            io_full_us: io_full_us().unwrap_or(0),
            proxy_switches: self.proxy_pid.map_or(0, |p| switches(&p.to_string(), "")),
            relay_switches: switches("self", crate::relay::THREAD_PREFIX),
        }
    }

    pub fn delta(&self, a: &CpuSnapshot, b: &CpuSnapshot) -> CpuDelta {
        let ticks = |t: u64| Duration::from_micros(t * 1_000_000 / self.tck);
        let proxy = b.proxy.saturating_sub(a.proxy);
        let own = b.own.saturating_sub(a.own);
        let machine = b.machine.saturating_sub(a.machine);
        let db = b.db.saturating_sub(a.db);
        CpuDelta {
            wall: b.at - a.at,
            proxy: ticks(proxy),
            own: ticks(own),
            relay: ticks(b.relay.saturating_sub(a.relay)),
            db: ticks(db),
            io_full: Duration::from_micros(b.io_full_us.saturating_sub(a.io_full_us)),
            other: ticks(machine.saturating_sub(proxy + own + db)),
            proxy_switches: b.proxy_switches.saturating_sub(a.proxy_switches),
            relay_switches: b.relay_switches.saturating_sub(a.relay_switches),
        }
    }
}

/// nproc, CPU model and load average, for the results header.
pub fn machine() -> (usize, String, String) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    (cpus, model, load)
}
