//! Per-hypercall-number and per-exit-reason statistics.
//!
//! Each vCPU thread owns its [`VcpuStats`] (no lock, no atomics on the hot path); the run loop
//! merges them when the VM stops. While it runs, each vCPU publishes a copy at most every
//! [`PUBLISH_EVERY`] (on a call that arrives after that long, and when it halts or stops), for
//! readers such as the control socket's `stats`. Latencies go into a log-linear histogram
//! (about 3 % precision) next to exact count, min, max and sum. Calls a custom handler answered
//! are also counted by the handler's name at the time of the call.
//!
//! Times come from [`Stamp`], the statistics clock: the CPU's invariant TSC scaled to
//! nanoseconds (`quanta`), about 20 ns a read where `std::time::Instant` costs about 50 on these
//! machines, which on the software CPU's ~100 ns hypercall path is what the two reads per call
//! cost. It is calibrated against the monotonic clock once per process, at its first use
//! (about 0.6 ms here), to well under the histogram's precision; where the TSC is not invariant
//! it is the monotonic clock itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use vmcall_abi::ExitReason;

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (SUB as usize) * (64 - SUB_BITS as usize + 1);

/// A point in time on the statistics clock (see the module's documentation).
pub type Stamp = quanta::Instant;

/// How often a vCPU that keeps making hypercalls publishes a copy of its statistics.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(20);

/// Latency distribution of one hypercall number.
#[derive(Debug, Clone)]
pub struct Latency {
    /// Number of events (calls), timed or not.
    pub count: u64,
    /// Number of timed samples: the histogram, min, max, sum and mean are over these. Equal to
    /// `count` unless timing was sampled ([`Latency::count_untimed`]).
    pub timed: u64,
    /// Smallest sample, in ns.
    pub min_ns: u64,
    /// Largest sample, in ns.
    pub max_ns: u64,
    /// Sum of the samples, in ns.
    pub sum_ns: u64,
    buckets: Box<[u64]>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            count: 0,
            timed: 0,
            min_ns: u64::MAX,
            max_ns: 0,
            sum_ns: 0,
            buckets: vec![0; BUCKETS].into(),
        }
    }
}

fn bucket(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros(); // >= SUB_BITS
    let sub = (ns >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

fn bucket_floor(index: usize) -> u64 {
    let (group, sub) = ((index as u64) / SUB, (index as u64) % SUB);
    if group == 0 {
        sub
    } else {
        (SUB + sub) << (group - 1)
    }
}

impl Latency {
    /// Add one sample of `ns` nanoseconds.
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.timed += 1;
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.buckets[bucket(ns)] += 1;
    }

    /// Count one event that was not timed (see [`VcpuStats::time_next`]).
    pub fn count_untimed(&mut self) {
        self.count += 1;
    }

    /// Add all of `other`'s samples.
    pub fn merge(&mut self, other: &Latency) {
        self.count += other.count;
        self.timed += other.timed;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
    }

    /// The `q`-quantile (0.0..=1.0), to the histogram's precision, clamped to [min, max].
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.timed == 0 {
            return 0;
        }
        let rank = ((q * self.timed as f64).ceil() as u64).clamp(1, self.timed);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_floor(i).clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }

    /// Total time of all `count` events, in ns: the sum of the samples, scaled up by
    /// `count / timed` when timing was sampled.
    pub fn time_ns(&self) -> f64 {
        if self.timed == 0 {
            return 0.0;
        }
        self.sum_ns as f64 * (self.count as f64 / self.timed as f64)
    }

    /// Mean sample, in ns (0 without samples).
    pub fn mean_ns(&self) -> u64 {
        self.sum_ns.checked_div(self.timed).unwrap_or(0)
    }
}

/// One vCPU's counters.
#[derive(Debug, Clone, Default)]
pub struct VcpuStats {
    /// Exits by reason, indexed by [`ExitReason`].
    pub exits: [u64; ExitReason::COUNT],
    /// Host handling time per hypercall number.
    pub hypercalls: BTreeMap<u64, Latency>,
    /// Round trip: time from one hypercall's arrival at the host to the next one's on the same
    /// vCPU — the resume, the guest's code in between and the next exit. In a guest that only
    /// makes hypercalls this is the full cost of one call.
    pub round_trip: Latency,
    /// Calls answered by custom handlers: (number, the handler's name at the time of the
    /// call, calls), in the order each pair first answered. See [`VcpuStats::handlers`].
    by_handler: Vec<(u64, Arc<str>, u64)>,
    /// Index in `by_handler` of the pair counted last: the next call usually counts there too.
    last_handler: usize,
    last_arrival: Option<Stamp>,
    next_publish: Option<Stamp>,
    /// Calls to let go untimed before the next timed one (see [`VcpuStats::time_next`]).
    untimed_left: u32,
}

/// One call in this many has its handling time measured while calls are fast (see
/// [`VcpuStats::time_next`]).
pub const TIME_EVERY: u32 = 16;

/// A timed call that took at least this long makes the next call timed too: where handling
/// costs microseconds, the clock read it saves is noise.
pub const TIME_ALL_ABOVE: Duration = Duration::from_micros(1);

impl VcpuStats {
    /// Count one exit for `reason`.
    pub fn exit(&mut self, reason: ExitReason) {
        self.exits[reason as usize] += 1;
    }

    /// Whether the next hypercall's handling time should be measured. Reading the statistics
    /// clock costs about 20 ns here, a fifth of a software-CPU hypercall, so while calls are
    /// fast only one in [`TIME_EVERY`] is timed (the first of each vCPU among them); after a
    /// timed call that took [`TIME_ALL_ABOVE`] or more, every call is until one is fast again.
    /// Counts and round trips are always exact: they need only the arrival stamp.
    pub fn time_next(&self) -> bool {
        self.untimed_left == 0
    }

    /// Count a hypercall that arrived at `arrived` and took `took` to answer.
    pub fn hypercall(&mut self, nr: u64, arrived: Stamp, took: Duration) {
        self.hypercalls.entry(nr).or_default().record(took.as_nanos() as u64);
        self.untimed_left = if took >= TIME_ALL_ABOVE { 0 } else { TIME_EVERY - 1 };
        self.arrived(arrived);
    }

    /// Count a hypercall that arrived at `arrived` whose handling was not timed.
    pub fn hypercall_untimed(&mut self, nr: u64, arrived: Stamp) {
        self.hypercalls.entry(nr).or_default().count_untimed();
        self.untimed_left = self.untimed_left.saturating_sub(1);
        self.arrived(arrived);
    }

    fn arrived(&mut self, arrived: Stamp) {
        if let Some(prev) = self.last_arrival.replace(arrived) {
            self.round_trip.record(arrived.saturating_duration_since(prev).as_nanos() as u64);
        }
    }

    /// Count a call to `nr` that the handler called `name` answered.
    pub fn answered_by(&mut self, nr: u64, name: &Arc<str>) {
        self.answered_by_n(nr, name, 1);
    }

    fn answered_by_n(&mut self, nr: u64, name: &Arc<str>, n: u64) {
        // The same number and handler as last time is the common case: one compare of each.
        if let Some(slot) = self.by_handler.get_mut(self.last_handler) {
            if slot.0 == nr && Arc::ptr_eq(&slot.1, name) {
                slot.2 += n;
                return;
            }
        }
        // A handler replaced by one of the same name (const:1 again) matches by text, and its
        // `Arc` is kept for next time.
        let found = self
            .by_handler
            .iter()
            .position(|(k, seen, _)| *k == nr && (Arc::ptr_eq(seen, name) || **seen == **name));
        match found {
            Some(i) => {
                let slot = &mut self.by_handler[i];
                if !Arc::ptr_eq(&slot.1, name) {
                    slot.1 = name.clone();
                }
                slot.2 += n;
                self.last_handler = i;
            }
            None => {
                self.by_handler.push((nr, name.clone(), n));
                self.last_handler = self.by_handler.len() - 1;
            }
        }
    }

    /// Calls to `nr` answered by custom handlers, by the handler's name at the time of each
    /// call, in the order the names first answered.
    pub fn handlers(&self, nr: u64) -> Vec<(Arc<str>, u64)> {
        self.by_handler
            .iter()
            .filter(|(k, _, _)| *k == nr)
            .map(|(_, name, n)| (name.clone(), *n))
            .collect()
    }

    /// Whether a copy is due for publication at `now` (and if so, the next one is due
    /// [`PUBLISH_EVERY`] later).
    pub fn publish_due(&mut self, now: Stamp) -> bool {
        match self.next_publish {
            Some(due) if now < due => false,
            _ => {
                self.next_publish = Some(now + PUBLISH_EVERY);
                true
            }
        }
    }

    /// Add all of `other`'s counts and latencies.
    pub fn merge(&mut self, other: &VcpuStats) {
        for (a, b) in self.exits.iter_mut().zip(other.exits) {
            *a += b;
        }
        for (nr, l) in &other.hypercalls {
            self.hypercalls.entry(*nr).or_default().merge(l);
        }
        for (nr, name, n) in &other.by_handler {
            self.answered_by_n(*nr, name, *n);
        }
        self.round_trip.merge(&other.round_trip);
    }

    /// The name calls to `nr` are reported under: the name of a custom handler that answered
    /// one (the latest to appear, when it changed), else Linux's name for a standard number.
    pub fn name_of(&self, nr: u64) -> Option<String> {
        self.by_handler
            .iter()
            .rfind(|(k, _, _)| *k == nr)
            .map(|(_, n, _)| n.to_string())
            .or_else(|| vmcall_abi::hc::name(nr).map(String::from))
    }

    /// Hypercalls answered, all numbers together.
    pub fn total_hypercalls(&self) -> u64 {
        self.hypercalls.values().map(|l| l.count).sum()
    }

    /// A table in the style of `perf kvm stat` (see [`crate::stats_table`]): number, name,
    /// count, shares, latencies, a totals line and the exits. Custom numbers are named after
    /// their handler in `custom`, if given.
    pub fn table(&self, custom: Option<&crate::hypercall::HypercallTable>) -> String {
        let opts = crate::stats_table::TableOptions { custom, exits: true, per_vcpu: false };
        crate::stats_table::table(std::slice::from_ref(self), opts)
    }
}

/// `1.23µs`-style duration.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns}ns"),
        10_000..=9_999_999 => format!("{:.2}µs", ns as f64 / 1e3),
        _ => format!("{:.2}ms", ns as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_close() {
        let mut l = Latency::default();
        for ns in 1..=1000 {
            l.record(ns * 100);
        }
        let med = l.quantile_ns(0.5) as f64;
        assert!((med - 50_000.0).abs() / 50_000.0 < 0.04, "median {med}");
        let p99 = l.quantile_ns(0.99) as f64;
        assert!((p99 - 99_000.0).abs() / 99_000.0 < 0.04, "p99 {p99}");
        assert_eq!((l.min_ns, l.max_ns, l.count), (100, 100_000, 1000));
        for ns in [0, 1, 31, 32, 33, 1000, u64::MAX / 3, u64::MAX] {
            assert!(bucket_floor(bucket(ns)) <= ns && bucket(ns) < BUCKETS, "{ns}");
        }
    }

    #[test]
    fn handling_time_is_sampled_while_calls_are_fast() {
        let mut s = VcpuStats::default();
        let t0 = Stamp::now();
        let mut timed = Vec::new();
        for i in 0..40u64 {
            let at = t0 + Duration::from_nanos(100 * i);
            // Calls 20.. are slow (2 µs) when timed.
            let took = Duration::from_nanos(if i >= 20 { 2000 } else { 50 });
            if s.time_next() {
                timed.push(i);
                s.hypercall(20, at, took);
            } else {
                s.hypercall_untimed(20, at);
            }
        }
        // The first call, then one in 16; after the first slow one (32), every call.
        let expected: Vec<u64> = [0, 16].into_iter().chain(32..40).collect();
        assert_eq!(timed, expected);
        let l = &s.hypercalls[&20];
        assert_eq!((l.count, l.timed), (40, 10), "counts stay exact");
        assert_eq!((l.min_ns, l.max_ns, l.mean_ns()), (50, 2000, (2 * 50 + 8 * 2000) / 10));
        assert_eq!(l.time_ns(), (2.0 * 50.0 + 8.0 * 2000.0) * 4.0, "scaled up to every call");
        assert_eq!((s.round_trip.count, s.round_trip.timed, s.round_trip.min_ns), (39, 39, 100));
        let mut merged = VcpuStats::default();
        merged.merge(&s);
        assert_eq!((merged.hypercalls[&20].count, merged.hypercalls[&20].timed), (40, 10));
    }

    #[test]
    fn merge_adds_up() {
        let mut a = VcpuStats::default();
        let mut b = VcpuStats::default();
        let t0 = Stamp::now();
        a.hypercall(1, t0, Duration::from_nanos(10));
        b.hypercall(1, t0, Duration::from_nanos(30));
        b.hypercall(20, t0 + Duration::from_micros(2), Duration::from_nanos(5));
        b.exit(ExitReason::Hlt);
        a.merge(&b);
        assert_eq!(a.hypercalls[&1].count, 2);
        assert_eq!(a.hypercalls[&1].min_ns, 10);
        assert_eq!(a.total_hypercalls(), 3);
        assert_eq!((a.round_trip.count, a.round_trip.min_ns), (1, 2000), "one gap, on b's vCPU");
        assert!(a.table(None).contains("KVM_HC_VAPIC_POLL_IRQ"));
        let t = crate::hypercall::HypercallTable::new();
        t.register(20, "my-handler", |_: &crate::hypercall::Call<'_>| Ok(0)).unwrap();
        assert!(a.table(Some(&t)).contains("my-handler"));
    }

    #[test]
    fn calls_are_counted_by_the_name_of_the_handler_that_answered() {
        let (v1, v2, v1_again): (Arc<str>, Arc<str>, Arc<str>) =
            ("const:1".into(), "const:2".into(), "const:1".into());
        let mut a = VcpuStats::default();
        a.answered_by(20, &v1);
        a.answered_by(20, &v2);
        a.answered_by(20, &v1_again);
        let mut b = VcpuStats::default();
        b.answered_by(20, &v2);
        b.answered_by(21, &v1);
        a.merge(&b);
        let names = |nr| -> Vec<(String, u64)> {
            a.handlers(nr).iter().map(|(n, c)| (n.to_string(), *c)).collect()
        };
        assert_eq!(names(20), vec![("const:1".into(), 2), ("const:2".into(), 2)]);
        assert_eq!(names(21), vec![("const:1".into(), 1)]);
        assert_eq!(a.name_of(20).as_deref(), Some("const:2"));
        a.hypercall(20, Stamp::now(), Duration::from_nanos(1));
        assert!(a.table(None).contains("by const:1"), "{}", a.table(None));
        assert_eq!(a.name_of(1).as_deref(), Some("KVM_HC_VAPIC_POLL_IRQ"));
        assert!(a.publish_due(Stamp::now()) && !a.publish_due(Stamp::now()));
    }
}
