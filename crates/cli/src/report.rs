//! Machine-readable output: the statistics as JSON (`--stats-json`, the control socket's
//! `stats`) and the per-call JSON trace (`--trace-json`), each to a file or `-` for stdout.

use crate::error::Error;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use vmcall_abi::ExitReason;
use vmcall_vmm::stats::{Latency, VcpuStats};
use vmcall_vmm::trace::{CallRecord, CallSink};

/// The statistics of a run (or of a running VM) as one JSON object (docs/control.md).
pub fn stats_json(total: &VcpuStats, per_vcpu: &[VcpuStats], elapsed: Duration) -> Value {
    let numbers: Vec<Value> = total
        .hypercalls
        .iter()
        .map(|(nr, lat)| {
            let vcpus: Vec<Value> = per_vcpu
                .iter()
                .enumerate()
                .filter_map(|(id, s)| {
                    let mut o = latency(s.hypercalls.get(nr)?);
                    o.insert("vcpu".into(), json!(id));
                    o.insert("handlers".into(), handlers(s, *nr));
                    Some(Value::Object(o))
                })
                .collect();
            let mut o = Map::new();
            o.insert("nr".into(), json!(nr));
            o.insert("nr_hex".into(), json!(format!("{nr:#x}")));
            o.insert("name".into(), json!(total.name_of(*nr)));
            o.extend(latency(lat));
            o.insert("handlers".into(), handlers(total, *nr));
            o.insert("vcpus".into(), Value::Array(vcpus));
            Value::Object(o)
        })
        .collect();
    let exits: Map<String, Value> = ExitReason::ALL
        .iter()
        .filter(|r| total.exits[**r as usize] > 0)
        .map(|r| (r.name().to_string(), json!(total.exits[*r as usize])))
        .collect();
    let mut all = Latency::default();
    for l in total.hypercalls.values() {
        all.merge(l);
    }
    json!({
        "elapsed_s": elapsed.as_secs_f64(),
        "vcpus": per_vcpu.len(),
        "hypercalls_total": total.total_hypercalls(),
        "hypercalls": numbers,
        "total": total_latency(&all, total),
        "exits": exits,
        "round_trip": latency(&total.round_trip),
    })
}

/// count, timed, sum, min, mean, median, p99, max (ns; all 0 without calls). Handling time is
/// sampled (docs/hypercalls.md): the latencies are those of the `timed` calls, and the sum is
/// theirs scaled up to `count`.
fn latency(l: &Latency) -> Map<String, Value> {
    let some = l.timed > 0;
    let mut o = Map::new();
    o.insert("count".into(), json!(l.count));
    o.insert("timed".into(), json!(l.timed));
    o.insert("sum_ns".into(), json!(l.time_ns().round() as u64));
    o.insert("min_ns".into(), json!(if some { l.min_ns } else { 0 }));
    o.insert("mean_ns".into(), json!(l.mean_ns()));
    o.insert("median_ns".into(), json!(l.quantile_ns(0.5)));
    o.insert("p99_ns".into(), json!(l.quantile_ns(0.99)));
    o.insert("max_ns".into(), json!(l.max_ns));
    o
}

/// [`latency`] of all numbers together (`all`, merged from `s`), with the sum of each number's
/// own scaled-up sum (numbers may have been sampled at different rates).
fn total_latency(all: &Latency, s: &VcpuStats) -> Map<String, Value> {
    let mut o = latency(all);
    let sum: f64 = s.hypercalls.values().map(Latency::time_ns).sum();
    o.insert("sum_ns".into(), json!(sum.round() as u64));
    o
}

/// `[{"name": ..., "count": ...}]`: calls to `nr` by the custom handler that answered them.
fn handlers(s: &VcpuStats, nr: u64) -> Value {
    Value::Array(s.handlers(nr).iter().map(|(n, c)| json!({"name": &**n, "count": c})).collect())
}

/// The `--stats` report (and `vmcall stats`'s): a summary line, then the table of
/// `vmcall_vmm::stats_table`, per number or (`per_vcpu`) per vCPU and number.
pub fn stats_text(
    per_vcpu: &[VcpuStats],
    elapsed: Duration,
    per_vcpu_view: bool,
    custom: Option<&vmcall_vmm::hypercall::HypercallTable>,
    exits: bool,
) -> String {
    let calls: u64 = per_vcpu.iter().map(VcpuStats::total_hypercalls).sum();
    let opts = vmcall_vmm::stats_table::TableOptions { per_vcpu: per_vcpu_view, custom, exits };
    format!(
        "{calls} hypercalls in {:.3} s on {} vCPU{}\n{}",
        elapsed.as_secs_f64(),
        per_vcpu.len(),
        if per_vcpu.len() == 1 { "" } else { "s" },
        vmcall_vmm::stats_table::table(per_vcpu, opts)
    )
}

/// Write `text` to `path`, `-` meaning stdout.
pub fn write_to(path: &Path, text: &str) -> Result<(), Error> {
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush())
    } else {
        std::fs::write(path, text)
    }
    .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// `--trace-json`: one JSON object per call, one per line.
pub struct JsonTrace {
    out: Mutex<Box<dyn Write + Send>>,
    failed: AtomicBool,
    path: String,
}

impl std::fmt::Debug for JsonTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonTrace").field("path", &self.path).finish()
    }
}

impl JsonTrace {
    /// A trace written to `path` (`-`: stdout), created now.
    pub fn create(path: &Path) -> Result<Arc<Self>, Error> {
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            let f = std::fs::File::create(path)
                .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
            Box::new(std::io::BufWriter::with_capacity(1 << 16, f))
        };
        Ok(Arc::new(Self {
            out: Mutex::new(out),
            failed: AtomicBool::new(false),
            path: path.display().to_string(),
        }))
    }

    /// Flush what is buffered.
    pub fn finish(&self) -> Result<(), Error> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.flush().map_err(|e| Error::io(format!("cannot write {}", self.path), e))
    }
}

/// One call as a JSON line.
pub fn call_json(c: &CallRecord<'_>) -> String {
    let [a0, a1, a2, a3] = c.args;
    let by = c.answered_by.name();
    let handler = c.handler.map_or_else(|| "null".to_string(), |h| json!(h).to_string());
    format!(
        "{{\"vcpu\":{},\"nr\":\"{:#x}\",\"args\":[\"{a0:#x}\",\"{a1:#x}\",\"{a2:#x}\",\"{a3:#x}\"],\
         \"result\":{},\"result_hex\":\"{:#x}\",\"cpl\":{},\"mode\":\"{}\",\"rip\":\"{:#x}\",\
         \"handler\":{handler},\"answered_by\":\"{by}\",\"latency_ns\":{}}}\n",
        c.vcpu,
        c.nr,
        c.ret as i64,
        c.ret,
        c.cpl,
        c.mode.name(),
        c.rip,
        c.latency_ns
    )
}

impl CallSink for JsonTrace {
    fn record(&self, c: &CallRecord<'_>) {
        let line = call_json(c);
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if out.write_all(line.as_bytes()).is_err() && !self.failed.swap(true, Ordering::Relaxed) {
            eprintln!("vmcall: cannot write the JSON trace to {}; later calls are lost", self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vmcall_vmm::hypercall::AnsweredBy;
    use vmcall_vmm::stats::Stamp;
    use vmcall_vmm::x86::CpuMode;

    #[test]
    fn stats_json_has_every_figure_per_number_and_vcpu() {
        let mut v0 = VcpuStats::default();
        let mut v1 = VcpuStats::default();
        let (c1, c2): (Arc<str>, Arc<str>) = ("const:1".into(), "const:2".into());
        let t = Stamp::now();
        v0.hypercall(20, t, Duration::from_nanos(100));
        v0.answered_by(20, &c1);
        v1.hypercall(20, t, Duration::from_nanos(300));
        v1.answered_by(20, &c2);
        v1.hypercall(1, t, Duration::from_nanos(50));
        let mut total = VcpuStats::default();
        total.merge(&v0);
        total.merge(&v1);
        let j = stats_json(&total, &[v0, v1], Duration::from_millis(1500));
        assert_eq!(j["hypercalls_total"], 3);
        let n20 = &j["hypercalls"][1];
        assert_eq!((n20["nr"].as_u64(), n20["nr_hex"].as_str()), (Some(20), Some("0x14")));
        assert_eq!(n20["count"], 2);
        assert_eq!((n20["min_ns"].as_u64(), n20["max_ns"].as_u64()), (Some(100), Some(300)));
        assert_eq!(n20["mean_ns"], 200);
        assert_eq!(n20["sum_ns"], 400);
        assert_eq!(
            (j["total"]["count"].as_u64(), j["total"]["sum_ns"].as_u64()),
            (Some(3), Some(450))
        );
        assert_eq!(
            (j["total"]["min_ns"].as_u64(), j["total"]["max_ns"].as_u64()),
            (Some(50), Some(300))
        );
        assert_eq!(
            n20["handlers"],
            json!([{"name":"const:1","count":1},{"name":"const:2","count":1}])
        );
        assert_eq!(n20["vcpus"][1]["vcpu"], 1);
        assert_eq!(n20["vcpus"][1]["handlers"], json!([{"name":"const:2","count":1}]));
        assert_eq!(j["hypercalls"][0]["name"], "KVM_HC_VAPIC_POLL_IRQ");
        assert_eq!(j["hypercalls"][0]["vcpus"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn trace_lines_are_json() {
        let rec = CallRecord {
            vcpu: 1,
            nr: 20,
            args: [1, 2, 3, u64::MAX],
            ret: (-14i64) as u64,
            cpl: 0,
            mode: CpuMode::Long64,
            rip: 0x20_1000,
            answered_by: AnsweredBy::Custom,
            handler: Some("exec:echo \"x\""),
            latency_ns: 1234,
        };
        let v: Value = serde_json::from_str(&call_json(&rec)).unwrap();
        assert_eq!(v["nr"], "0x14");
        assert_eq!(v["args"][3], "0xffffffffffffffff");
        assert_eq!(v["result"], -14);
        assert_eq!(v["rip"], "0x201000");
        assert_eq!(v["handler"], "exec:echo \"x\"");
        assert_eq!(v["mode"], "64-bit");
        let v: Value =
            serde_json::from_str(&call_json(&CallRecord { handler: None, ..rec })).unwrap();
        assert_eq!(v["handler"], Value::Null);
    }
}
