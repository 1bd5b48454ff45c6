//! The statistics report in the style of `perf kvm stat`: one row per hypercall number (or
//! per vCPU and number) with count, share of calls and of host time, min/mean/median/p99/max
//! host latency — each column in one unit, named in its heading — and a totals line.

use std::fmt::Write;

use vmcall_abi::ExitReason;

use crate::hypercall::HypercallTable;
use crate::stats::{Latency, VcpuStats};

/// What [`table`] shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableOptions<'a> {
    /// Rows per vCPU, then number (`--stats=vcpu`), instead of per number.
    pub per_vcpu: bool,
    /// Names custom numbers after their handler in this table (else after the handler that
    /// answered them, or Linux's name for a standard number).
    pub custom: Option<&'a HypercallTable>,
    /// Print the `exits:` line (a recording knows its hypercalls, not its other exits).
    pub exits: bool,
}

/// A unit for one column: the largest that keeps the column's values readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Ns,
    Us,
    Ms,
}

impl Unit {
    fn for_max(max_ns: u64) -> Self {
        match max_ns {
            0..=99_999 => Unit::Ns,
            100_000..=99_999_999 => Unit::Us,
            _ => Unit::Ms,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::Us => "µs",
            Unit::Ms => "ms",
        }
    }
    fn show(self, ns: u64) -> String {
        match self {
            Unit::Ns => ns.to_string(),
            Unit::Us => format!("{:.2}", ns as f64 / 1e3),
            Unit::Ms => format!("{:.2}", ns as f64 / 1e6),
        }
    }
}

/// The figures of one row: count, total host time and the latency distribution, in ns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Calls.
    pub count: u64,
    /// Their total host handling time (the timed calls' sum scaled up to `count` where
    /// handling time was sampled; the latencies are those of the timed calls).
    pub sum_ns: u64,
    /// Shortest.
    pub min_ns: u64,
    /// Mean.
    pub mean_ns: u64,
    /// Median.
    pub median_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// Longest.
    pub max_ns: u64,
}

impl From<&Latency> for Figures {
    fn from(l: &Latency) -> Self {
        if l.count == 0 {
            return Figures::default();
        }
        if l.timed == 0 {
            return Figures { count: l.count, ..Figures::default() };
        }
        Figures {
            count: l.count,
            // Handling time may be sampled: the sum of the timed calls, scaled up to all.
            sum_ns: l.time_ns().round() as u64,
            min_ns: l.min_ns,
            mean_ns: l.mean_ns(),
            median_ns: l.quantile_ns(0.5),
            p99_ns: l.quantile_ns(0.99),
            max_ns: l.max_ns,
        }
    }
}

impl Figures {
    fn latencies(&self) -> [u64; 5] {
        [self.min_ns, self.mean_ns, self.median_ns, self.p99_ns, self.max_ns]
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// A row of figures: what the `nr` column says (`0x14`, `total`), the name, the figures.
    Calls {
        /// The first column.
        nr: String,
        /// The name column.
        name: String,
        /// The figures.
        figures: Figures,
    },
    /// Calls to the number above by one of the handlers it had.
    By {
        /// The handler's name.
        name: String,
        /// Its calls.
        count: u64,
    },
    /// A heading line (`vCPU 0:` in the per-vCPU view).
    Heading(String),
}

/// Total handling time of every number's calls, each scaled up on its own (numbers may have
/// been sampled at different rates).
fn time_ns(s: &VcpuStats) -> u64 {
    s.hypercalls.values().map(Latency::time_ns).sum::<f64>().round() as u64
}

/// The report for the statistics of each vCPU (`per_vcpu[i]` is vCPU i's).
pub fn table(per_vcpu: &[VcpuStats], opts: TableOptions<'_>) -> String {
    let mut total = VcpuStats::default();
    for s in per_vcpu {
        total.merge(s);
    }
    let mut all = Latency::default();
    for l in total.hypercalls.values() {
        all.merge(l);
    }
    let name_of = |nr: u64| {
        opts.custom
            .and_then(|t| t.get(nr))
            .map(|e| e.name.to_string())
            .or_else(|| total.name_of(nr))
            .unwrap_or_else(|| "-".into())
    };
    let number_rows = |s: &VcpuStats, rows: &mut Vec<Row>| {
        for (nr, l) in &s.hypercalls {
            rows.push(Row::Calls { nr: format!("{nr:#x}"), name: name_of(*nr), figures: l.into() });
            // A number whose handler changed during the run: the calls each one answered.
            let names = s.handlers(*nr);
            if names.len() > 1 {
                for (name, count) in names {
                    rows.push(Row::By { name: name.to_string(), count });
                }
            }
        }
    };
    let mut rows = Vec::new();
    if opts.per_vcpu {
        for (id, s) in per_vcpu.iter().enumerate() {
            if s.hypercalls.is_empty() {
                continue;
            }
            rows.push(Row::Heading(format!("vCPU {id}")));
            number_rows(s, &mut rows);
            let mut sub = Latency::default();
            for l in s.hypercalls.values() {
                sub.merge(l);
            }
            let figures = Figures { sum_ns: time_ns(s), ..(&sub).into() };
            rows.push(Row::Calls { nr: format!("vCPU {id}"), name: "total".into(), figures });
        }
    } else {
        number_rows(&total, &mut rows);
    }
    let figures = Figures { sum_ns: time_ns(&total), ..(&all).into() };
    rows.push(Row::Calls { nr: "total".into(), name: String::new(), figures });
    let mut out = render(&rows);
    if opts.exits {
        let exits: Vec<String> = ExitReason::ALL
            .iter()
            .filter(|r| total.exits[**r as usize] > 0)
            .map(|r| format!("{}={}", r.name(), total.exits[*r as usize]))
            .collect();
        let _ = writeln!(out, "exits: {}", exits.join(" "));
    }
    out
}

/// Lay `rows` out as the report's table: a heading line, then one line per row. The last
/// [`Row::Calls`] is the total that shares are shares of.
pub fn render(rows: &[Row]) -> String {
    let total = rows
        .iter()
        .rev()
        .find_map(|r| match r {
            Row::Calls { figures, .. } => Some(*figures),
            _ => None,
        })
        .unwrap_or_default();
    // One unit per latency column, from the column's largest value.
    let mut max = [0u64; 5];
    for r in rows {
        if let Row::Calls { figures, .. } = r {
            for (m, v) in max.iter_mut().zip(figures.latencies()) {
                *m = (*m).max(v);
            }
        }
    }
    let units = max.map(Unit::for_max);
    let calls_total = total.count.max(1) as f64;
    let time_total = total.sum_ns.max(1) as f64;
    let mut out = String::new();
    let heads = ["min", "mean", "median", "p99", "max"];
    let _ =
        write!(out, "{:>10}  {:<24} {:>10} {:>7} {:>7}", "nr", "name", "calls", "calls%", "time%");
    for (h, u) in heads.iter().zip(units) {
        let _ = write!(out, " {:>11}", format!("{h}({})", u.name()));
    }
    out.push('\n');
    for r in rows {
        match r {
            Row::Heading(h) => {
                let _ = writeln!(out, "{h}:");
            }
            Row::By { name, count } => {
                let _ = writeln!(out, "{:>10}    by {:<21} {:>10}", "", name, count);
            }
            Row::Calls { nr, name, figures } => {
                let _ = write!(
                    out,
                    "{nr:>10}  {name:<24} {:>10} {:>7.2} {:>7.2}",
                    figures.count,
                    100.0 * figures.count as f64 / calls_total,
                    100.0 * figures.sum_ns as f64 / time_total,
                );
                for (u, v) in units.iter().zip(figures.latencies()) {
                    let _ = write!(out, " {:>11}", u.show(v));
                }
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stamp;
    use std::sync::Arc;
    use std::time::Duration;

    fn stats(calls: &[(u64, u64)]) -> VcpuStats {
        let mut s = VcpuStats::default();
        let t = Stamp::now();
        for (nr, ns) in calls {
            s.hypercall(*nr, t, Duration::from_nanos(*ns));
        }
        s
    }

    fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(first))
            .unwrap_or_else(|| panic!("no row {first}:\n{text}"))
            .split_whitespace()
            .collect()
    }

    #[test]
    fn sampled_handling_time_is_scaled_up_to_the_count() {
        // Number 20: 4 calls, 1 timed (100 ns): 400 ns in all. Number 1: 1 call of 400 ns.
        let mut s = stats(&[(1, 400), (20, 100)]);
        for _ in 0..3 {
            s.hypercall_untimed(20, Stamp::now());
        }
        let text = table(&[s], TableOptions::default());
        let r = row(&text, "0x14");
        assert_eq!(&r[2..5], ["4", "80.00", "50.00"], "{text}");
        assert_eq!((r[5], r[9]), ("100", "100"), "latencies of the timed call");
        let t = row(&text, "total");
        assert_eq!(&t[1..4], ["5", "100.00", "100.00"], "{text}");
    }

    #[test]
    fn one_unit_per_column_shares_and_a_totals_line() {
        // 3 calls to 20 (1000, 2000, 3000 ns) and one to 1 (4266 ns) on vCPU 0; vCPU 1 makes
        // one 12800 ns call to 20.
        let v0 = stats(&[(20, 1000), (20, 2000), (20, 3000), (1, 4266)]);
        let v1 = stats(&[(20, 12_800)]);
        let text = table(&[v0, v1], TableOptions { exits: true, ..Default::default() });
        let head: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            head,
            [
                "nr",
                "name",
                "calls",
                "calls%",
                "time%",
                "min(ns)",
                "mean(ns)",
                "median(ns)",
                "p99(ns)",
                "max(ns)"
            ]
        );
        let r = row(&text, "0x14");
        assert_eq!(&r[2..5], ["4", "80.00", "81.51"], "{text}"); // 18800 of 23066 ns
        assert_eq!((r[5], r[6], r[9]), ("1000", "4700", "12800"));
        let r = row(&text, "0x1");
        assert_eq!((r[1], r[2], r[3]), ("KVM_HC_VAPIC_POLL_IRQ", "1", "20.00"));
        let t = row(&text, "total");
        assert_eq!(&t[1..4], ["5", "100.00", "100.00"]);
        assert_eq!((t[4], t[5], t[8]), ("1000", "4613", "12800"));
        assert!(text.lines().last().unwrap().starts_with("exits:"));
        // A column whose values reach 100 µs switches to µs, for every row.
        let slow = stats(&[(20, 150_000), (21, 900)]);
        let text = table(&[slow], TableOptions::default());
        assert!(text.lines().next().unwrap().contains("max(µs)"), "{text}");
        assert_eq!(row(&text, "0x15")[8], "0.90", "{text}");
        assert!(!text.contains("exits:"));
    }

    #[test]
    fn the_vcpu_view_has_a_section_and_a_subtotal_per_vcpu() {
        let mut v0 = stats(&[(20, 100), (20, 100)]);
        let name: Arc<str> = "const:1".into();
        v0.answered_by(20, &name);
        let v1 = stats(&[(21, 200)]);
        let text = table(
            &[v0, VcpuStats::default(), v1],
            TableOptions { per_vcpu: true, ..Default::default() },
        );
        assert!(text.contains("vCPU 0:\n") && text.contains("vCPU 2:\n"), "{text}");
        assert!(!text.contains("vCPU 1:"), "a vCPU without calls has no section: {text}");
        let sub: Vec<&str> =
            text.lines().filter(|l| l.contains("vCPU") && l.contains(" total ")).collect();
        assert_eq!(sub.len(), 2, "{text}");
        assert!(sub[0].split_whitespace().collect::<Vec<_>>()[3..6] == ["2", "66.67", "50.00"]);
        assert_eq!(row(&text, "0x14")[1], "const:1");
        assert_eq!(&row(&text, "total")[1..4], ["3", "100.00", "100.00"]);
    }
}
