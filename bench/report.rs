//! The results table: one row per (phase, metric), direct and through side by side, the
//! difference, the target and whether it was met. Rendered as markdown for stdout and
//! bench/RESULTS.md.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Whether a row has a target and met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    None,
    Pass,
    Fail,
}

impl Verdict {
    pub fn of(ok: bool) -> Verdict {
        if ok { Verdict::Pass } else { Verdict::Fail }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub phase: String,
    pub metric: String,
    pub direct: String,
    pub through: String,
    pub added: String,
    pub target: String,
    pub verdict: Verdict,
}

impl Row {
    pub fn new(phase: &str, metric: &str) -> Row {
        Row {
            phase: phase.to_string(),
            metric: metric.to_string(),
            direct: "–".into(),
            through: "–".into(),
            added: "–".into(),
            target: "–".into(),
            verdict: Verdict::None,
        }
    }

    pub fn direct(mut self, v: impl Into<String>) -> Row {
        self.direct = v.into();
        self
    }

    pub fn through(mut self, v: impl Into<String>) -> Row {
        self.through = v.into();
        self
    }

    pub fn added(mut self, v: impl Into<String>) -> Row {
        self.added = v.into();
        self
    }

    pub fn target(mut self, target: impl Into<String>, verdict: Verdict) -> Row {
        self.target = target.into();
        self.verdict = verdict;
        self
    }
}

/// Milliseconds with microsecond precision.
pub fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// A signed difference in milliseconds.
pub fn added_ms(through_us: u64, direct_us: u64) -> String {
    let d = through_us as f64 - direct_us as f64;
    format!("{:+.3} ms", d / 1000.0)
}

/// Bytes in MB (10^6 bytes), the unit of the targets.
pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// CPU time per request in microseconds.
pub fn cpu_per(cpu: Duration, requests: u64) -> String {
    if requests == 0 {
        return "–".into();
    }
    format!("{:.0} µs", cpu.as_secs_f64() * 1e6 / requests as f64)
}

/// Three rows (p50, p99, max) of a latency histogram pair, with a target on the added p99.
pub fn latency_rows(
    phase: &str,
    what: &str,
    direct: &Histogram<u64>,
    through: &Histogram<u64>,
    p99_target_us: Option<u64>,
    with_max: bool,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut quantiles = vec![("p50", 0.50), ("p99", 0.99)];
    if with_max {
        quantiles.push(("max", 1.0));
    }
    for (name, q) in quantiles {
        let (d, t) = if q >= 1.0 {
            (direct.max(), through.max())
        } else {
            (direct.value_at_quantile(q), through.value_at_quantile(q))
        };
        let mut row = Row::new(phase, &format!("{what} {name}"))
            .direct(ms(d))
            .through(ms(t))
            .added(added_ms(t, d));
        if let (Some(limit), "p99") = (p99_target_us, name) {
            let added = t.saturating_sub(d);
            row = row.target(format!("added < {}", ms(limit)), Verdict::of(added < limit));
        }
        rows.push(row);
    }
    rows
}

/// The markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| phase | metric | direct | through | added | target | result |\n|---|---|---:|---:|---:|---|---|\n",
    );
    let mut last_phase = "";
    for r in rows {
        // The phase is named on its first row only, so the table reads as groups.
        let phase = if r.phase == last_phase {
            ""
        } else {
            r.phase.as_str()
        };
        last_phase = &r.phase;
        let verdict = match r.verdict {
            Verdict::None => "",
            Verdict::Pass => "pass",
            Verdict::Fail => "**FAIL**",
        };
        let _ = writeln!(
            s,
            "| {phase} | {} | {} | {} | {} | {} | {verdict} |",
            r.metric, r.direct, r.through, r.added, r.target
        );
    }
    s
}
