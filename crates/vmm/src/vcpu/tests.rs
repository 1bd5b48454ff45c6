//! The run loop against scripted vCPUs (`crate::testing`): dispatch, port I/O, HLT and kicks,
//! stop, timeouts, panics, interrupts and errors, with no hypervisor. Every run is bounded by
//! [`run`]'s own deadline, so a regression fails instead of hanging the test binary.

use std::error::Error;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use vmcall_abi::errno::{KVM_ENOSYS, KVM_EPERM};
use vmcall_abi::hc::{KVM_HC_KICK_CPU, KVM_HC_VAPIC_POLL_IRQ};
use vmcall_abi::{mmio, ports, ExitReason};

use crate::backend::{BackendError, GuestFault, VcpuExit};
use crate::hypercall::{neg, Call, HypercallTable};
use crate::testing::{
    exit_with, hypercall, hypercall_at_cpl, image, Capture, Completion, Scripted, Step,
};
use crate::vm::{Blame, RunError, RunReport, RunStatus, Vm, VmBuilder};

/// Longer than any run here should take, even on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(60);
/// What "promptly" means for a run that should end by itself, well under its timeout.
const PROMPT: Duration = Duration::from_secs(10);

/// Build a VM with `vcpus` scripted vCPUs (after `f` configured the builder).
fn build(hv: &Scripted, vcpus: u32, f: impl FnOnce(VmBuilder) -> VmBuilder) -> Vm {
    f(VmBuilder::new(image()).vcpus(vcpus).console(Box::new(std::io::sink())))
        .build(hv)
        .expect("build")
}

/// Run `vm` on another thread; panic if it has not returned within [`DEADLINE`].
fn run(vm: Vm) -> RunReport {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vm.run());
    });
    rx.recv_timeout(DEADLINE).expect("the run returned in time")
}

#[test]
fn hypercalls_reach_the_table_and_kvm_emulation() {
    let table = Arc::new(HypercallTable::new());
    table.register(20, "double", |c: &Call<'_>| Ok(c.args[0] * 2)).unwrap();
    let hv = Scripted::new(vec![vec![
        Step::Exit(hypercall(20, [21, 0, 0, 0])),
        Step::Exit(hypercall(KVM_HC_VAPIC_POLL_IRQ, [0; 4])),
        Step::Exit(hypercall(0x1234, [0; 4])),
        Step::Exit(hypercall_at_cpl(20, [1, 0, 0, 0], 3)),
        Step::Exit(exit_with(5)),
    ]]);
    let report = run(build(&hv, 1, |b| b.table(table.clone())));
    assert_eq!(report.result.unwrap(), RunStatus::Exited(5));
    assert_eq!(
        hv.completions(0),
        [42, 0, neg(KVM_ENOSYS), neg(KVM_EPERM)].map(Completion::Hypercall),
        "custom handler, KVM's answer, unknown number, CPL 3"
    );
    assert_eq!(report.stats.exits[ExitReason::Hypercall as usize], 4);
    assert_eq!(report.stats.exits[ExitReason::Io as usize], 1);
    assert_eq!(report.stats.handlers(20), vec![(Arc::from("double"), 1)]);
    assert_eq!(report.stats.total_hypercalls(), 4);
}

#[test]
fn port_io_reaches_the_devices() {
    let out = |b: u8| Step::Exit(VcpuExit::IoOut { port: ports::COM1, size: 1, data: b.into() });
    let hv = Scripted::new(vec![vec![
        out(b'h'),
        out(b'i'),
        out(b'\n'),
        // The UART's line status register: transmitter empty.
        Step::Exit(VcpuExit::IoIn { port: ports::COM1 + 5, size: 1 }),
        // Nothing behind this port: it reads as all ones.
        Step::Exit(VcpuExit::IoIn { port: 0x1234, size: 2 }),
        Step::Exit(exit_with(0)),
    ]]);
    let console = Capture::default();
    let c = console.clone();
    let report = run(build(&hv, 1, |b| b.console(Box::new(c))));
    assert_eq!(report.result.unwrap(), RunStatus::Exited(0));
    assert_eq!(console.text(), "hi\n");
    match hv.completions(0)[..] {
        [Completion::IoIn(lsr), Completion::IoIn(absent)] => {
            assert_ne!(lsr & 0x20, 0, "THR empty in LSR {lsr:#x}");
            assert_eq!(absent, 0xffff);
        }
        ref other => panic!("expected two port reads, got {other:?}"),
    }
    assert_eq!(report.stats.exits[ExitReason::Io as usize], 6);
}

#[test]
fn mmio_reaches_each_vcpus_apic() {
    let read =
        |offset| VcpuExit::Mmio { gpa: mmio::APIC_BASE + offset, write: false, len: 4, data: 0 };
    // Each vCPU reads its own APIC's ID register and the version register.
    let script = || vec![Step::Exit(read(0x20)), Step::Exit(read(0x30)), Step::Exit(VcpuExit::Hlt)];
    let hv = Scripted::new(vec![script(), script()]);
    let report = run(build(&hv, 2, |b| b));
    assert_eq!(report.result.unwrap(), RunStatus::AllHalted);
    for id in 0..2u32 {
        assert_eq!(
            hv.completions(id),
            [u64::from(id) << 24, 0x0005_0014].map(Completion::MmioRead),
            "vCPU {id}"
        );
    }
    assert_eq!(report.stats.exits[ExitReason::Mmio as usize], 4);
}

#[test]
fn a_kick_wakes_a_halted_vcpu() {
    // vCPU 1 halts; vCPU 0 kicks it (most likely once it is parked, else its HLT returns at
    // once) and halts itself. Without the wake-up both would halt and the run end AllHalted.
    let kick = hypercall(KVM_HC_KICK_CPU, [0, 1, 0, 0]);
    let hv = Scripted::new(vec![
        vec![Step::Sleep(Duration::from_millis(50)), Step::Exit(kick), Step::Exit(VcpuExit::Hlt)],
        vec![Step::Exit(VcpuExit::Hlt), Step::Exit(exit_with(7))],
    ]);
    let report = run(build(&hv, 2, |b| b));
    assert_eq!(report.result.unwrap(), RunStatus::Exited(7));
    assert_eq!(hv.completions(0), vec![Completion::Hypercall(0)]);
}

#[test]
fn a_kick_before_hlt_makes_it_return_at_once() {
    let kick = hypercall(KVM_HC_KICK_CPU, [0, 1, 0, 0]);
    let hv = Scripted::new(vec![
        vec![Step::Exit(kick), Step::Exit(VcpuExit::Hlt)],
        vec![
            Step::Sleep(Duration::from_millis(50)),
            Step::Exit(VcpuExit::Hlt),
            Step::Exit(exit_with(8)),
        ],
    ]);
    assert_eq!(run(build(&hv, 2, |b| b)).result.unwrap(), RunStatus::Exited(8));
}

#[test]
fn every_vcpu_halted_ends_the_run() {
    let hv = Scripted::new(vec![vec![], vec![Step::Exit(VcpuExit::Hlt)], vec![]]);
    let report = run(build(&hv, 3, |b| b));
    assert_eq!(report.result.unwrap(), RunStatus::AllHalted);
    assert_eq!(report.stats.exits[ExitReason::Hlt as usize], 3);
}

#[test]
fn a_monitor_stops_the_run_from_another_thread() {
    // Both vCPUs are inside `run` before the stop, so each must be interrupted out of it.
    let running = Arc::new(Barrier::new(3));
    let spin = || vec![Step::Wait(running.clone()), Step::Spin];
    let hv = Scripted::new(vec![spin(), spin()]);
    let vm = build(&hv, 2, |b| b);
    let monitor = vm.monitor();
    let barrier = running.clone();
    let stopper = std::thread::spawn(move || {
        barrier.wait();
        monitor.stop();
        monitor.stopping()
    });
    let start = Instant::now();
    let report = run(vm);
    assert_eq!(report.result.unwrap(), RunStatus::Stopped);
    assert!(stopper.join().unwrap());
    assert!(start.elapsed() < PROMPT, "{:?}", start.elapsed());
    for id in 0..2 {
        assert!(hv.interrupts(id) >= 1, "vCPU {id} was never interrupted");
        assert!(report.per_vcpu[id as usize].exits[ExitReason::Interrupted as usize] >= 1);
    }
    assert_eq!(report.stats.exits[ExitReason::Unknown as usize], 0);
    assert!(report.stuck_vcpus.is_empty());
}

#[test]
fn the_timeout_ends_a_run_that_never_does() {
    let hv = Scripted::new(vec![vec![Step::Spin]]);
    let start = Instant::now();
    let report = run(build(&hv, 1, |b| b.timeout(Some(Duration::from_millis(100)))));
    let took = start.elapsed();
    let err = report.result.unwrap_err();
    assert!(matches!(err, RunError::Timeout(t) if t == Duration::from_millis(100)), "{err}");
    assert_eq!(err.blame(), Blame::Timeout);
    assert!(took >= Duration::from_millis(100) && took < PROMPT, "{took:?}");
}

/// A vCPU that panics while another spins ends the run at once, naming it — whether or not a
/// timeout is set (a long one here, which the run must not wait for).
#[test]
fn a_panicking_vcpu_ends_the_run_naming_it() {
    for timeout in [None, Some(Duration::from_secs(120))] {
        // vCPU 1 panics only once vCPU 0 is inside `run`, which must then be interrupted.
        let running = Arc::new(Barrier::new(2));
        let hv = Scripted::new(vec![
            vec![Step::Wait(running.clone()), Step::Spin],
            vec![
                Step::Exit(VcpuExit::IoOut { port: 0x80, size: 1, data: 0 }),
                Step::Wait(running),
                Step::Panic("scripted vCPU gives up"),
            ],
        ]);
        let start = Instant::now();
        let report = run(build(&hv, 2, |b| b.timeout(timeout)));
        let took = start.elapsed();
        match &report.result {
            Err(e @ RunError::VcpuPanicked { vcpu: 1, message }) => {
                assert!(message.contains("gives up"), "{e}");
                assert!(e.to_string().starts_with("vCPU 1: "), "{e}");
                assert_eq!(e.blame(), Blame::Host);
                assert_eq!(e.vcpu(), Some(1));
            }
            other => panic!("timeout {timeout:?}: expected vCPU 1 panicked, got {other:?}"),
        }
        assert!(took < PROMPT, "timeout {timeout:?}: took {took:?}");
        assert!(report.stuck_vcpus.is_empty(), "{:?}", report.stuck_vcpus);
        // The other vCPU stopped normally and kept its statistics.
        assert!(report.per_vcpu[0].exits[ExitReason::Interrupted as usize] >= 1);
    }
}

#[test]
fn an_interrupt_is_its_own_exit_not_an_unknown_one() {
    let hv = Scripted::new(vec![vec![
        Step::Exit(VcpuExit::Interrupted),
        Step::Exit(VcpuExit::Interrupted),
        Step::Exit(exit_with(3)),
    ]]);
    let report = run(build(&hv, 1, |b| b));
    // Outside a stop, the vCPU runs on after an interrupt.
    assert_eq!(report.result.unwrap(), RunStatus::Exited(3));
    assert_eq!(report.stats.exits[ExitReason::Interrupted as usize], 2);
    assert_eq!(report.stats.exits[ExitReason::Unknown as usize], 0);
    assert!(report.stats.table(None).contains("interrupted=2"), "{}", report.stats.table(None));
}

/// Each exit that ends a run with an error, and whose fault it is.
#[test]
fn failing_exits_are_told_apart_as_guest_or_host_faults() {
    let fault = GuestFault { vector: 13, error_code: Some(0), rip: 0x20_1000, cs: 0x8, cr2: None };
    let cases: Vec<(VcpuExit, Blame, &str)> = vec![
        (VcpuExit::Fault(fault), Blame::Guest, "general protection"),
        (VcpuExit::Shutdown { rip: 0x20_0010 }, Blame::Guest, "triple fault"),
        (
            VcpuExit::Mmio { gpa: 0xdead_0000, write: true, len: 4, data: 1 },
            Blame::Guest,
            "write of 4 bytes at guest-physical 0xdead0000",
        ),
        (
            VcpuExit::IoOut { port: ports::PORT_EXIT, size: 1, data: 0 },
            Blame::Guest,
            "1-byte write of 0x0 to the exit port",
        ),
        (VcpuExit::Unknown("mystery exit".into()), Blame::Host, "mystery exit"),
        (VcpuExit::Debug { rip: 0x20_0000 }, Blame::Host, "debug exit at RIP 0x200000"),
    ];
    for (exit, blame, text) in cases {
        let hv = Scripted::new(vec![vec![Step::Exit(exit.clone())]]);
        let err = run(build(&hv, 1, |b| b)).result.unwrap_err();
        assert_eq!(err.blame(), blame, "{exit:?}: {err}");
        assert_eq!(err.is_guest_fault(), blame == Blame::Guest);
        assert_eq!(err.vcpu(), Some(0), "{err}");
        assert!(err.to_string().contains(text), "{exit:?}: {err}");
        if let RunError::UnhandledExit { exit: e, .. } = &err {
            assert_eq!(*e, exit, "the error carries the exit itself");
        }
    }
}

/// The messages of `e` and its sources, outermost first.
fn chain(e: &(dyn Error + 'static)) -> Vec<String> {
    let mut messages = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        messages.push(e.to_string());
        next = e.source();
    }
    messages
}

#[test]
fn backend_errors_end_the_run_with_their_source_chain() {
    let efault = BackendError::hypervisor("KVM_RUN", libc::EFAULT);
    let hv = Scripted::new(vec![vec![Step::Spin], vec![Step::Fail(efault)]]);
    let err = run(build(&hv, 2, |b| b)).result.unwrap_err();
    assert!(
        matches!(
            &err,
            RunError::Backend { vcpu: 1, source: BackendError::Hypervisor { op: "KVM_RUN", source } }
                if source.raw_os_error() == Some(libc::EFAULT)
        ),
        "{err:?}"
    );
    assert_eq!(err.blame(), Blame::Host);
    let messages = chain(&err);
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert_eq!(messages[..2], ["vCPU 1: backend failure", "KVM_RUN failed"]);
    assert!(messages[2].contains("os error 14"), "{messages:?}");

    // An emulator's error keeps its own type under the backend's.
    #[derive(Debug, thiserror::Error)]
    #[error("UC_ERR_EXCEPTION")]
    struct UcLike;
    let hv = Scripted::new(vec![vec![Step::Fail(BackendError::emulator("run", UcLike))]]);
    let err = run(build(&hv, 1, |b| b)).result.unwrap_err();
    assert_eq!(
        chain(&err),
        ["vCPU 0: backend failure", "emulator call failed (run)", "UC_ERR_EXCEPTION"]
    );
    let mut source = err.source();
    while let Some(e) = source {
        if e.is::<UcLike>() {
            break;
        }
        source = e.source();
    }
    assert!(source.is_some(), "the emulator's error is reachable by type");
}

/// No message repeats its source's: the CLI prints the whole chain.
#[test]
fn messages_do_not_repeat_their_sources() {
    let errors: Vec<Box<dyn Error>> = vec![
        Box::new(RunError::Backend { vcpu: 0, source: BackendError::hypervisor("KVM_RUN", 4) }),
        Box::new(BackendError::setup("reading code", std::io::Error::other("short read"))),
    ];
    for e in &errors {
        let messages = chain(e.as_ref());
        for pair in messages.windows(2) {
            assert!(!pair[0].contains(&pair[1]), "{messages:?}");
        }
    }
}
