//! The report of `vmcall bench`: the targets, the table and the JSON.

use vmcall_vmm::stats::fmt_ns;

use super::{Bench, Series};

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

fn ns(v: f64) -> String {
    fmt_ns(v.round() as u64)
}

/// A target: its description, the measured value, the limit, and whether lower is better.
struct Target {
    what: String,
    value: Option<f64>,
    limit: f64,
    at_most: bool,
}

impl Target {
    fn verdict(&self) -> &'static str {
        match self.value {
            None => "n/a",
            Some(v) if (self.at_most && v <= self.limit) || (!self.at_most && v >= self.limit) => {
                "met"
            }
            Some(_) => "MISSED",
        }
    }
}

fn find<'a>(b: &'a Bench, key: &str) -> Option<&'a Series> {
    b.series.iter().chain(&b.cold).find(|s| s.key == key)
}

fn median_of(b: &Bench, key: &str) -> Option<f64> {
    find(b, key).and_then(Series::median)
}

/// A wasm handler against the native closure on the same path, in this run.
pub(super) struct WasmCost {
    pub backend: &'static str,
    pub native_ns: Option<f64>,
    pub wasm_ns: Option<f64>,
}

impl WasmCost {
    /// What the wasm handler adds to a call.
    pub fn extra_ns(&self) -> Option<f64> {
        Some(self.wasm_ns? - self.native_ns?)
    }
    pub fn ratio(&self) -> Option<f64> {
        ratio(self.wasm_ns, self.native_ns)
    }
}

pub(super) fn wasm_costs(b: &Bench) -> [WasmCost; 2] {
    let cost = |backend, native, wasm| WasmCost {
        backend,
        native_ns: median_of(b, native),
        wasm_ns: median_of(b, wasm),
    };
    [cost("kvm/rewrite", "vmcall-kvm/rewrite", "wasm-kvm"), cost("emu", "vmcall-emu", "wasm-emu")]
}

fn targets(b: &Bench) -> Vec<Target> {
    let bare = median_of(b, "bare-exit");
    let best_kvm = ["vmcall-kvm/rewrite", "vmcall-kvm/ud", "vmcall-kvm/hwbp"]
        .iter()
        .filter_map(|k| median_of(b, k))
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
    let single_kvm = median_of(b, "vmcall-kvm/rewrite");
    let single_emu = median_of(b, "vmcall-emu");
    let memory = |name: &str| {
        b.memory.iter().find(|(n, _)| n == name).and_then(|(_, r)| r.as_ref().ok().copied())
    };
    vec![
        Target {
            what: "kvm: best strategy / bare exit".into(),
            value: ratio(best_kvm, bare),
            limit: 1.25,
            at_most: true,
        },
        Target {
            what: "kvm: vmcall's own work over the raw out loop (rewrite / bare exit - 1)".into(),
            value: ratio(single_kvm, bare).map(|r| r - 1.0),
            limit: 0.10,
            at_most: true,
        },
        Target {
            what: "emu: vmcall rate / raw unicorn loop rate".into(),
            value: ratio(median_of(b, "emu-raw"), single_emu),
            limit: 1.0,
            at_most: false,
        },
        Target {
            what: "emu: vmcall custom hypercalls per second (millions)".into(),
            value: single_emu.map(|ns| 1e3 / ns),
            limit: 10.0,
            at_most: false,
        },
        Target {
            what: "emu: a wasm handler's extra cost per call over a native closure (ns)".into(),
            value: wasm_costs(b)[1].extra_ns(),
            limit: 100.0,
            at_most: true,
        },
        Target {
            what: "cold start: vmcall on kvm / raw KVM".into(),
            value: ratio(median_of(b, "cold-kvm"), median_of(b, "cold-raw")),
            limit: 1.5,
            at_most: true,
        },
        Target {
            what: "memory: kvm VM overhead (MiB)".into(),
            value: memory("kvm").map(|k| k / 1024.0),
            limit: 5.0,
            at_most: true,
        },
        Target {
            what: "memory: emu VM overhead (MiB)".into(),
            value: memory("emu").map(|k| k / 1024.0),
            limit: 5.0,
            at_most: true,
        },
        Target {
            what: "kvm: batch-64 per call / single custom hypercall".into(),
            value: ratio(median_of(b, "batch64-kvm"), single_kvm),
            limit: 1.0 / 20.0,
            at_most: true,
        },
        Target {
            what: "emu: batch-64 per call / single custom hypercall".into(),
            value: ratio(median_of(b, "batch64-emu"), single_emu),
            limit: 1.0 / 20.0,
            at_most: true,
        },
        Target {
            what: "emu: ctl set to the first call by the new handler (ms)".into(),
            value: median_of(b, "ctl-set-emu").map(|v| v / 1e6),
            limit: 1.0,
            at_most: true,
        },
        Target {
            what: "kvm: ctl set to the first call by the new handler (ms)".into(),
            value: median_of(b, "ctl-set-kvm").map(|v| v / 1e6),
            limit: 1.0,
            at_most: true,
        },
        Target {
            what: "kvm: batch-64 per call / in-kernel VMCALL".into(),
            value: ratio(median_of(b, "batch64-kvm"), median_of(b, "kernel")),
            limit: 1.0,
            at_most: true,
        },
    ]
}

/// The baseline a line is compared with: its own backend's. KVM's lines against the bare
/// user-space exit (the least any KVM path that leaves the kernel can cost), the software
/// CPU's against the raw unicorn loop; none for the in-kernel path and lines of neither.
fn baseline_of(key: &str) -> Option<&'static str> {
    if key == "emu-raw" || key.ends_with("-emu") {
        Some("emu-raw")
    } else if key == "bare-exit" || key.ends_with("-kvm") || key.contains("-kvm/") {
        Some("bare-exit")
    } else {
        None
    }
}

/// "unavailable: why", with the word once even when the reason starts with it.
fn unavailable(why: &str) -> String {
    let why = why.strip_prefix("unavailable: ").unwrap_or(why);
    if why.contains("unavailable") {
        why.to_string()
    } else {
        format!("unavailable: {why}")
    }
}

fn describe(s: &Series) -> String {
    s.unavailable.as_deref().map_or_else(|| s.what.clone(), unavailable)
}

/// The targets this run missed (not those it could not measure), for `--check`.
pub(super) fn missed(b: &Bench) -> Vec<String> {
    targets(b).into_iter().filter(|t| t.verdict() == "MISSED").map(|t| t.what).collect()
}

pub(super) fn render(b: &Bench) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "per call (round trip)            median        p99      calls/s    ×base  base        what"
    );
    for s in &b.series {
        let med = s.median();
        let base = baseline_of(&s.key);
        let _ = writeln!(
            o,
            "{:<28} {:>10} {:>10} {:>12} {:>8}  {:<10}  {}",
            s.key,
            opt(med, ns),
            opt(s.p99(), ns),
            opt(med, |m| format!("{:.0}", 1e9 / m)),
            opt(base.and_then(|k| ratio(med, median_of(b, k))), |r| format!("{r:.2}")),
            base.unwrap_or("—"),
            describe(s),
        );
    }
    let _ = writeln!(
        o,
        "
wasm handler over a native closure (same path, same run)
backend                         native       wasm      extra    ratio"
    );
    for c in wasm_costs(b) {
        let _ = writeln!(
            o,
            "{:<28} {:>10} {:>10} {:>10} {:>8}",
            c.backend,
            opt(c.native_ns, ns),
            opt(c.wasm_ns, ns),
            opt(c.extra_ns(), |d| format!("{d:+.0}ns")),
            opt(c.ratio(), |r| format!("{r:.2}")),
        );
    }
    let _ = writeln!(
        o,
        "
cold start                      median        p99"
    );
    for s in &b.cold {
        let _ = writeln!(
            o,
            "{:<28} {:>10} {:>10}   {}",
            s.key,
            opt(s.median(), ns),
            opt(s.p99(), ns),
            describe(s)
        );
    }
    let _ = writeln!(
        o,
        "
memory: host RSS of one idle VM beyond its guest RAM"
    );
    for (name, r) in &b.memory {
        let _ = match r {
            Ok(kib) => writeln!(o, "{name:<28} {:>10.2} MiB", kib / 1024.0),
            Err(e) => writeln!(o, "{name:<28} {}", unavailable(e)),
        };
    }
    let _ = writeln!(
        o,
        "
targets"
    );
    for t in targets(b) {
        let _ = writeln!(
            o,
            "{:<70} {:>8} {} {:<6} {}",
            t.what,
            opt(t.value, |v| format!("{v:.3}")),
            if t.at_most { "≤" } else { "≥" },
            format!("{:.3}", t.limit),
            t.verdict()
        );
    }
    o
}

pub(super) fn json(b: &Bench) -> String {
    let series = |list: &[Series]| -> Vec<serde_json::Value> {
        list.iter()
            .map(|s| {
                serde_json::json!({
                    "key": s.key,
                    "what": s.what,
                    "median_ns": s.median(),
                    "p99_ns": s.p99(),
                    "calls_per_round_trip": s.per,
                    "samples": s.lat.count,
                    "baseline": baseline_of(&s.key),
                    "ratio_to_baseline": baseline_of(&s.key).and_then(|k| ratio(s.median(), median_of(b, k))),
                    "unavailable": s.unavailable,
                })
            })
            .collect()
    };
    let memory: Vec<_> = b
        .memory
        .iter()
        .map(|(n, r)| serde_json::json!({"backend": n, "overhead_kib": r.as_ref().ok(), "unavailable": r.as_ref().err()}))
        .collect();
    let targets: Vec<_> = targets(b)
        .iter()
        .map(|t| serde_json::json!({"what": t.what, "value": t.value, "limit": t.limit, "at_most": t.at_most, "verdict": t.verdict()}))
        .collect();
    let wasm: Vec<_> = wasm_costs(b)
        .iter()
        .map(|c| serde_json::json!({"backend": c.backend, "native_ns": c.native_ns, "wasm_ns": c.wasm_ns, "extra_ns": c.extra_ns(), "ratio": c.ratio()}))
        .collect();
    let doc = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "per_call": series(&b.series),
        "wasm_over_native": wasm,
        "cold_start": series(&b.cold),
        "memory": memory,
        "targets": targets,
    });
    serde_json::to_string_pretty(&doc).expect("serialisable") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(key: &str, mean_ns: Option<f64>) -> Series {
        Series { mean_ns, ..Series::new(key, key) }
    }

    fn bench(emu_ns: f64) -> Bench {
        let mut kernel = Series::new("kernel", "in-kernel");
        kernel.unavailable = Some("unavailable: KVM_RUN hangs".into());
        let mut batch = series("batch64-emu", Some(1.0));
        batch.per = 64;
        Bench {
            series: vec![
                kernel,
                series("bare-exit", Some(10_000.0)),
                series("vmcall-kvm/rewrite", Some(10_500.0)),
                series("emu-raw", Some(80.0)),
                series("vmcall-emu", Some(emu_ns)),
                batch,
            ],
            cold: Vec::new(),
            memory: vec![("kvm".into(), Err("KVM backend unavailable: no /dev/kvm".into()))],
        }
    }

    #[test]
    fn each_backend_is_compared_with_its_own_baseline() {
        assert_eq!(baseline_of("vmcall-kvm/hwbp"), Some("bare-exit"));
        assert_eq!(baseline_of("batch64-kvm"), Some("bare-exit"));
        assert_eq!(baseline_of("ctl-set-emu"), Some("emu-raw"));
        assert_eq!(baseline_of("emu-raw"), Some("emu-raw"));
        assert_eq!(baseline_of("kernel"), None);
        let out = render(&bench(40.0));
        let line = |key: &str| out.lines().find(|l| l.starts_with(key)).unwrap().to_string();
        assert!(line("vmcall-kvm/rewrite").contains(" 1.05  bare-exit"), "{out}");
        assert!(line("vmcall-emu ").contains(" 0.50  emu-raw"), "{out}");
        assert!(!out.contains("line1") && !out.contains("line2"), "{out}");
    }

    #[test]
    fn unavailable_is_said_once() {
        let out = render(&bench(40.0));
        assert!(out.contains("unavailable: KVM_RUN hangs"), "{out}");
        assert!(out.contains("KVM backend unavailable: no /dev/kvm"), "{out}");
        assert!(!out.contains("unavailable: unavailable"), "{out}");
        assert!(!out.contains("unavailable: KVM backend unavailable"), "{out}");
    }

    #[test]
    fn missed_lists_only_missed_targets() {
        // 40 ns: twice the raw loop's rate and 25 M calls/s; batch-64 is 1/40 of a call.
        let fast = missed(&bench(40.0));
        assert!(!fast.iter().any(|t| t.starts_with("emu:")), "{fast:?}");
        // 200 ns: below the raw loop's rate and 10 M calls/s.
        let slow = missed(&bench(200.0));
        assert!(slow.iter().any(|t| t.contains("raw unicorn loop")), "{slow:?}");
        assert!(slow.iter().any(|t| t.contains("per second")), "{slow:?}");
        // Unmeasured targets (the in-kernel VMCALL) are not missed.
        assert!(!slow.iter().any(|t| t.contains("in-kernel")), "{slow:?}");
    }
}
