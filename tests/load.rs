//! A run cannot hang the process, even under load: a vCPU thread that panics (a backend double
//! that gives up) ends its run at once with an error naming the vCPU, timeout or not; a handler
//! that never returns is left behind once the timeout and the stop grace have passed, and the
//! run returns, naming the stuck vCPU. Each case runs among many other VMs at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcall_conformance::{backends, guest, run_image};
use vmcall_vmm::backend::{
    BackendError, GuestInfo, Hypervisor, InlineExits, Interrupter, Vcpu, VcpuExit, VmBackend,
};
use vmcall_vmm::boot::elf::minimal_elf;
use vmcall_vmm::boot::VcpuInit;
use vmcall_vmm::hypercall::{Call, HypercallTable};
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::vm::{RunError, RunStatus, VmBuilder};
use vmcall_vmm::x86::Regs;

/// A backend double: every vCPU writes to port 0x80 over and over; vCPU `panics_on` panics
/// after `after` of them.
struct Panicky {
    panics_on: u32,
    after: u64,
}

struct PanickyVm {
    panics_on: u32,
    after: u64,
}

struct PanickyVcpu {
    id: u32,
    panics_on: u32,
    left: u64,
}

struct NoInterrupt;

impl Interrupter for NoInterrupt {
    fn interrupt(&self) {}
}

impl Hypervisor for Panicky {
    fn name(&self) -> &'static str {
        "panicky"
    }
    fn create_vm(
        &self,
        _: Arc<GuestRam>,
        _: &GuestInfo,
    ) -> Result<Box<dyn VmBackend>, BackendError> {
        Ok(Box::new(PanickyVm { panics_on: self.panics_on, after: self.after }))
    }
}

impl VmBackend for PanickyVm {
    fn create_vcpu(&self, id: u32, _: &VcpuInit) -> Result<Box<dyn Vcpu>, BackendError> {
        Ok(Box::new(PanickyVcpu { id, panics_on: self.panics_on, left: self.after }))
    }
    fn describe(&self) -> String {
        "a backend double whose vCPU panics".into()
    }
}

impl Vcpu for PanickyVcpu {
    fn run(&mut self, _: &mut dyn InlineExits) -> Result<VcpuExit, BackendError> {
        if self.id == self.panics_on {
            if self.left == 0 {
                panic!("backend double: vCPU {} gives up", self.id);
            }
            self.left -= 1;
        }
        std::thread::yield_now();
        Ok(VcpuExit::IoOut { port: 0x80, size: 1, data: 0 })
    }
    fn complete_hypercall(&mut self, _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn complete_io_in(&mut self, _: u32) -> Result<(), BackendError> {
        Ok(())
    }
    fn complete_mmio_read(&mut self, _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn regs(&mut self) -> Result<Regs, BackendError> {
        Ok(Regs::default())
    }
    fn guest_tsc(&mut self) -> u64 {
        0
    }
    fn interrupter(&self) -> Arc<dyn Interrupter> {
        Arc::new(NoInterrupt)
    }
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
                    let hv = Panicky { panics_on: i % 4, after: 100 * u64::from(i) };
                    // Half with a timeout, half without: neither may wait for it.
                    let timeout = (i % 2 == 0).then_some(Duration::from_secs(120));
                    let start = Instant::now();
                    let vm = VmBuilder::new(minimal_elf(0x20_0000, &[0xf4]))
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
