//! Shared pieces of the conformance suite: the list of backends to run every test on, and a
//! runner that boots a guest with a timeout and captures its console.
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmcall_kvm::{KvmHypervisor, Trap};
use vmcall_vmm::backend::Hypervisor;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::stats::VcpuStats;
use vmcall_vmm::vm::{RunError, RunStatus, VmBuilder};

/// Every test VM stops after this long, so a hung guest fails a test instead of hanging CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One backend configuration under test.
#[allow(missing_debug_implementations)]
pub struct Backend {
    pub name: String,
    pub hv: Box<dyn Hypervisor>,
    /// Whether vmcall itself sees every hypercall, CPL 3 ones included. Under `--trap ud`
    /// (and `hwbp`'s #UD fallback) kvm_pvm answers a CPL 3 VMMCALL -KVM_EPERM in the kernel,
    /// so the guest gets the same answer but vmcall's statistics never count it. Under `xen`
    /// the kernel hands every call, at any CPL, to user space.
    pub sees_every_call: bool,
}

/// Print a line that `cargo test` shows even for passing tests (it captures only the print
/// macros, not direct writes to stderr).
pub fn visible(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Every backend configuration available here: KVM with each trap strategy, and the software
/// CPU. Unavailable ones (e.g. `kvm/xen` on a kernel without the Xen intercept, which
/// `KvmHypervisor::open` refuses) are skipped with a visible message saying why.
pub fn backends(test: &str) -> Vec<Backend> {
    let mut out = Vec::new();
    for trap in [Trap::Rewrite, Trap::Ud, Trap::Hwbp, Trap::Xen] {
        match KvmHypervisor::open(trap) {
            Ok(hv) => out.push(Backend {
                name: format!("kvm/{}", trap.name()),
                hv: Box::new(hv),
                sees_every_call: matches!(trap, Trap::Rewrite | Trap::Xen),
            }),
            Err(e) => {
                visible(&format!("SKIP {test} on kvm/{}: {e}", trap.name()));
            }
        }
    }
    #[cfg(feature = "emu")]
    out.push(Backend {
        name: "emu".into(),
        hv: Box::new(vmcall_emu::EmuHypervisor::new()),
        sees_every_call: true,
    });
    #[cfg(not(feature = "emu"))]
    visible(&format!("SKIP {test} on emu: built without the `emu` feature"));
    if out.is_empty() {
        visible(&format!("SKIP {test}: no backend available on this machine"));
    }
    out
}

/// The captured result of one guest run.
#[derive(Debug)]
pub struct Outcome {
    pub console: String,
    pub result: Result<RunStatus, RunError>,
    pub stats: VcpuStats,
}

impl Outcome {
    /// Console lines starting with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<&str> {
        self.console.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    /// The run ended with `status` (panics with the console otherwise).
    pub fn expect_status(&self, status: RunStatus, ctx: &str) {
        match &self.result {
            Ok(s) if *s == status => {}
            other => {
                panic!("{ctx}: expected {status:?}, got {other:?}\nconsole:\n{}", self.console)
            }
        }
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A guest image by name (see crates/test-guests).
pub fn guest(name: &str) -> Vec<u8> {
    let path = vmcall_test_guests::path(name).unwrap_or_else(|| panic!("no guest named {name}"));
    std::fs::read(path).unwrap()
}

/// Run `image` on `hv` with `table` and `cmdline`, letting `tweak` adjust the builder.
pub fn run_image(
    hv: &dyn Hypervisor,
    image: Vec<u8>,
    cmdline: &str,
    table: Arc<HypercallTable>,
    tweak: impl FnOnce(VmBuilder) -> VmBuilder,
) -> Outcome {
    let capture = Capture::default();
    let builder = VmBuilder::new(image)
        .cmdline(cmdline)
        .table(table)
        .timeout(Some(TEST_TIMEOUT))
        .console(Box::new(capture.clone()));
    let vm = tweak(builder).build(hv).expect("build VM");
    let report = vm.run();
    let console = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    Outcome { console, result: report.result, stats: report.stats }
}

/// Run the guest called `name`.
pub fn run(hv: &dyn Hypervisor, name: &str, cmdline: &str, table: Arc<HypercallTable>) -> Outcome {
    run_image(hv, guest(name), cmdline, table, |b| b)
}
