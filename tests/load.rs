//! A run cannot hang the process, even under load: a vCPU thread that panics (a scripted
//! backend that gives up, `vmcall_vmm::testing`) ends its run at once with an error naming the
//! vCPU, timeout or not; a handler that never returns is left behind once the timeout and the
//! stop grace have passed, and the run returns, naming the stuck vCPU. Each case runs among
//! many other VMs at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcall_conformance::{backends, guest, run_image};
use vmcall_vmm::backend::VcpuExit;
use vmcall_vmm::hypercall::{Call, HypercallTable};
use vmcall_vmm::testing::{image, Scripted, Step};
use vmcall_vmm::vm::{RunError, RunStatus, VmBuilder};

/// A scripted backend whose vCPU `panics_on` panics after `after` port writes, while the
/// others run on until interrupted.
fn panicky(vcpus: u32, panics_on: u32, after: u64) -> Scripted {
    let write = || Step::Exit(VcpuExit::IoOut { port: 0x80, size: 1, data: 0 });
    Scripted::new(
        (0..vcpus)
            .map(|id| {
                if id == panics_on {
                    let writes = (0..after).map(|_| write());
                    writes.chain([Step::Panic("backend double: the vCPU gives up")]).collect()
                } else {
                    vec![write(), Step::Spin]
                }
            })
            .collect(),
    )
}

/// A busy soak VM on the software CPU (or KVM where that is all there is), as background load.
fn background_load(stop: &AtomicU64) {
    let table = Arc::new(HypercallTable::new());
    table.register(20, "tag1", |c: &Call<'_>| Ok(1 << 32 | c.args[0] & 0xffff_ffff)).unwrap();
    let b = backends("background load").pop().expect("some backend");
    while stop.load(Ordering::Relaxed) == 0 {
        let out = run_image(b.hv.as_ref(), guest("soak"), "20000", table.clone(), |v| v.vcpus(2));
        out.expect_status(RunStatus::AllHalted, "background soak VM");
    }
}

#[test]
fn a_panicking_vcpu_ends_its_run_naming_it_among_many_vms() {
    let stop = AtomicU64::new(0);
    std::thread::scope(|s| {
        let load: Vec<_> = (0..2).map(|_| s.spawn(|| background_load(&stop))).collect();
        let runs: Vec<_> = (0..16u32)
            .map(|i| {
                s.spawn(move || {
                    let hv = panicky(4, i % 4, 100 * u64::from(i));
                    // Half with a timeout, half without: neither may wait for it.
                    let timeout = (i % 2 == 0).then_some(Duration::from_secs(120));
                    let start = Instant::now();
                    let vm = VmBuilder::new(image())
                        .vcpus(4)
                        .timeout(timeout)
                        .build(&hv)
                        .expect("build");
                    let report = vm.run();
                    (i, report, start.elapsed())
                })
            })
            .collect();
        for r in runs {
            let (i, report, took) = r.join().unwrap();
            match &report.result {
                Err(e @ RunError::VcpuPanicked { vcpu, message }) => {
                    assert_eq!(*vcpu, i % 4, "{e}");
                    assert!(message.contains("gives up"), "{e}");
                    assert!(e.to_string().contains(&format!("vCPU {vcpu}: its thread panicked")));
                }
                other => panic!("run {i}: expected a panicked vCPU, got {other:?}"),
            }
            assert!(report.stuck_vcpus.is_empty(), "run {i}: {:?}", report.stuck_vcpus);
            assert!(took < Duration::from_secs(30), "run {i} took {took:?}");
        }
        stop.store(1, Ordering::Relaxed);
        for l in load {
            l.join().unwrap();
        }
    });
}

#[test]
fn a_handler_that_never_returns_cannot_hang_a_run_with_a_timeout() {
    let stop = AtomicU64::new(0);
    std::thread::scope(|s| {
        let load: Vec<_> = (0..2).map(|_| s.spawn(|| background_load(&stop))).collect();
        for b in backends("a_handler_that_never_returns_cannot_hang_a_run_with_a_timeout") {
            let table = Arc::new(HypercallTable::new());
            table
                .register(20, "never returns", |_: &Call<'_>| loop {
                    std::thread::park();
                })
                .unwrap();
            let start = Instant::now();
            let out = run_image(b.hv.as_ref(), guest("demo"), "", table, |v| {
                v.timeout(Some(Duration::from_secs(2))).stop_grace(Duration::from_millis(300))
            });
            let took = start.elapsed();
            assert!(
                matches!(out.result, Err(RunError::Timeout(_))),
                "{}: {:?}",
                b.name,
                out.result
            );
            assert!(took < Duration::from_secs(10), "{}: took {took:?}", b.name);
            // run_image has no report; the stuck vCPU is checked through the builder below.
        }
        // The report names the stuck vCPU.
        let b = backends("stuck vCPU report").pop().expect("some backend");
        let table = Arc::new(HypercallTable::new());
        table
            .register(20, "never returns", |_: &Call<'_>| loop {
                std::thread::park()
            })
            .unwrap();
        let vm = VmBuilder::new(guest("demo"))
            .table(table)
            .timeout(Some(Duration::from_secs(1)))
            .stop_grace(Duration::from_millis(200))
            .console(Box::new(std::io::sink()))
            .build(b.hv.as_ref())
            .expect("build");
        let report = vm.run();
        assert!(matches!(report.result, Err(RunError::Timeout(_))), "{:?}", report.result);
        assert_eq!(report.stuck_vcpus, vec![0], "{}", b.name);
        stop.store(1, Ordering::Relaxed);
        for l in load {
            l.join().unwrap();
        }
    });
}
