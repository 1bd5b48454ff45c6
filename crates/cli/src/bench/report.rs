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
            limit: 0.9,
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

pub(super) fn render(b: &Bench) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let base1 = median_of(b, "kernel");
    let base2 = median_of(b, "bare-exit");
    let _ = writeln!(
        o,
        "per call (round trip)            median        p99      calls/s   ×line1  ×line2"
    );
    for s in &b.series {
        let med = s.median();
        let _ = writeln!(
            o,
            "{:<28} {:>10} {:>10} {:>12} {:>8} {:>7}   {}",
            s.key,
            opt(med, ns),
            opt(s.p99(), ns),
            opt(med, |m| format!("{:.0}", 1e9 / m)),
            opt(ratio(med, base1), |r| format!("{r:.2}")),
            opt(ratio(med, base2), |r| format!("{r:.2}")),
            s.unavailable.as_deref().unwrap_or(&s.what),
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
            s.unavailable.as_deref().unwrap_or(&s.what)
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
            Err(e) => writeln!(o, "{name:<28} unavailable: {e}"),
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
                    "ratio_to_line1": ratio(s.median(), median_of(b, "kernel")),
                    "ratio_to_line2": ratio(s.median(), median_of(b, "bare-exit")),
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
