//! `Vm::start` and `RunningVm::wait`: a VM runs while its caller does other things, with no
//! thread of the caller's per VM, and its end is collected later — a stop from another
//! thread, and a timeout counted from `start` however late `wait` is called.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcall_conformance::{backends, guest, visible};
use vmcall_vmm::hypercall::{Call, HypercallTable};
use vmcall_vmm::vm::{RunError, RunStatus, VmBuilder};

/// A table whose hypercall 20 counts its calls and answers 8.
fn counting() -> (Arc<HypercallTable>, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let table = Arc::new(HypercallTable::new());
    let c = calls.clone();
    table
        .register(20, "count", move |_: &Call<'_>| {
            c.fetch_add(1, Ordering::Relaxed);
            Ok(8)
        })
        .expect("empty table");
    (table, calls)
}

#[test]
fn started_vms_run_while_the_caller_works_and_wait_collects_each() {
    for b in backends("started_vms_run_while_the_caller_works_and_wait_collects_each") {
        // Four VMs calling hypercall 20 forever, started from this one thread.
        let mut running = Vec::new();
        let mut counters = Vec::new();
        for _ in 0..4 {
            let (table, calls) = counting();
            let vm = VmBuilder::new(guest("hcloop"))
                .memory(4 << 20)
                .cmdline("0 20 7 quiet")
                .table(table)
                .timeout(Some(Duration::from_secs(60)))
                .console(Box::new(std::io::sink()))
                .build(b.hv.as_ref())
                .expect("build");
            running.push(vm.start().expect("start"));
            counters.push(calls);
        }
        // Every one of them makes calls while this thread only watches.
        let deadline = Instant::now() + Duration::from_secs(30);
        while counters.iter().any(|c| c.load(Ordering::Relaxed) < 10) {
            assert!(Instant::now() < deadline, "{}: a started VM made no calls", b.name);
            std::thread::sleep(Duration::from_millis(5));
        }
        for r in &running {
            r.stopper().stop();
        }
        for (r, calls) in running.into_iter().zip(&counters) {
            let report = r.wait();
            assert!(matches!(report.result, Ok(RunStatus::Stopped)), "{}: {report:?}", b.name);
            assert!(report.stuck_vcpus.is_empty(), "{}", b.name);
            let counted = report.stats.hypercalls.get(&20).map_or(0, |l| l.count);
            assert_eq!(counted, calls.load(Ordering::Relaxed), "{}: stats = handler", b.name);
            assert!(counted >= 10, "{}", b.name);
        }
    }
}

#[test]
fn the_timeout_counts_from_start_however_late_wait_comes() {
    for b in backends("the_timeout_counts_from_start_however_late_wait_comes") {
        let (table, calls) = counting();
        let vm = VmBuilder::new(guest("hcloop"))
            .memory(4 << 20)
            .cmdline("0 20 7 quiet")
            .table(table)
            .timeout(Some(Duration::from_millis(300)))
            .console(Box::new(std::io::sink()))
            .build(b.hv.as_ref())
            .expect("build");
        let started = Instant::now();
        let running = vm.start().expect("start");
        std::thread::sleep(Duration::from_millis(600));
        let report = running.wait();
        assert!(
            matches!(report.result, Err(RunError::Timeout(t)) if t == Duration::from_millis(300)),
            "{}: {report:?}",
            b.name
        );
        // `wait` found it past its timeout and stopped it then: well within the stop grace
        // (10 s) of the moment it was called.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "{}: wait took {took:?}", b.name);
        assert!(calls.load(Ordering::Relaxed) > 0, "{}: the guest ran meanwhile", b.name);
        visible(&format!("{}: timed out VM collected {took:?} after start", b.name));
    }
}
