//! Shared pieces of the conformance suite: the list of backends to run every test on, and a
//! runner that boots a guest with a timeout and captures its console.
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmcall_kvm::{KvmHypervisor, Trap};
use vmcall_vmm::backend::Hypervisor;
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::{Call, HypercallResult, HypercallTable};
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
    /// KVM served by kvm_pvm, a software KVM with limits of its own (see [`PVM_NO_INT3`] and
    /// [`PVM_NO_PAGING32`]): what it cannot run is skipped on it, visibly, never passed.
    pub kvm_pvm: bool,
}

impl Backend {
    /// A `VMMCALL` at CPL 3 from a site vmcall never rewrote (code written at run time and
    /// only ever run at CPL 3) is refused by kvm_pvm itself with -KVM_EPERM — the answer vmcall
    /// gives — so the guest sees no difference but vmcall's statistics do not count it.
    pub fn misses_unrewritten_cpl3_vmmcall(&self) -> bool {
        self.kvm_pvm && self.name != "kvm/xen"
    }
}

/// kvm_pvm's instruction emulator cannot run INT3 (KVM_RUN returns "internal error 1").
pub const PVM_NO_INT3: &str = "kvm_pvm cannot emulate INT3 (KVM internal error 1)";
/// kvm_pvm raises #GP when a 32-bit protected-mode guest turns paging on (CR0.PG with
/// EFER.LME clear), with 2-level and PAE tables alike.
pub const PVM_NO_PAGING32: &str =
    "kvm_pvm raises #GP when a 32-bit protected-mode guest sets CR0.PG (no legacy paging)";

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
                kvm_pvm: hv.capabilities().pvm,
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
        kvm_pvm: false,
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

/// A console that keeps what the guest prints, for a test to read afterwards.
#[derive(Debug, Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

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

/// Hypercall 0x30 of the kernel guests: the sum of the a1 bytes (at most 4096) at the
/// guest-*virtual* address a0, read through the caller's own page tables (`Call::virt`); an
/// unmapped byte answers -KVM_EFAULT.
pub const HC_VIRT_SUM: u64 = 0x30;

/// What nr 21 answers in [`kernel_table`]: 64 bits, so that a 32-bit caller sees it truncated.
pub const WIDE_ANSWER: u64 = 0x1234_5678_9abc_def0;

/// The handler of [`HC_VIRT_SUM`].
pub fn virt_sum(c: &Call<'_>) -> HypercallResult {
    let mut buf = vec![0u8; c.args[1].min(4096) as usize];
    c.virt().read(c.args[0], &mut buf)?;
    Ok(buf.iter().map(|b| u64::from(*b)).sum())
}

/// The sum [`virt_sum`] answers for `s`.
pub fn byte_sum(s: &str) -> u64 {
    s.bytes().map(u64::from).sum()
}

/// The handlers the kernel guests (`kernel_*`) expect: 20 = echo, 21 = [`WIDE_ANSWER`],
/// 0x30 = [`virt_sum`].
pub fn kernel_table() -> Arc<HypercallTable> {
    let t = Arc::new(HypercallTable::new());
    t.register(20, "echo", Builtin::Echo).unwrap();
    t.register(21, "wide", Builtin::Const(WIDE_ANSWER)).unwrap();
    t.register(HC_VIRT_SUM, "virt-sum", virt_sum).unwrap();
    t
}

/// How a run ended, in one line.
pub fn ending(out: &Outcome) -> String {
    match &out.result {
        Ok(s) => format!("{s:?}"),
        Err(e) => e.to_string(),
    }
}

/// The console is exactly `want`, line for line; otherwise the first difference, in one line.
pub fn check_lines(console: &str, want: &[String]) -> Result<(), String> {
    let got: Vec<&str> = console.lines().collect();
    for i in 0..got.len().max(want.len()) {
        let (g, w) = (got.get(i), want.get(i));
        if g.copied() != w.map(String::as_str) {
            let show = |l: Option<&str>| l.map_or("<no line>".to_string(), |l| format!("`{l}`"));
            return Err(format!(
                "line {}: expected {}, got {}",
                i + 1,
                show(w.map(String::as_str)),
                show(g.copied())
            ));
        }
    }
    Ok(())
}

/// The run ended with `status`.
pub fn check_status(out: &Outcome, status: RunStatus) -> Result<(), String> {
    match &out.result {
        Ok(s) if *s == status => Ok(()),
        _ => Err(format!("run ended with {}, expected {status:?}", ending(out))),
    }
}

/// Where the backend sees every call, the statistics count exactly `want` (nr, calls).
pub fn check_counts(out: &Outcome, b: &Backend, want: &[(u64, u64)]) -> Result<(), String> {
    if !b.sees_every_call {
        return Ok(());
    }
    let got: Vec<(u64, u64)> = out.stats.hypercalls.iter().map(|(nr, l)| (*nr, l.count)).collect();
    if got == want {
        Ok(())
    } else {
        Err(format!("hypercall counts (nr, calls) {got:?}, expected {want:?}"))
    }
}

/// The usual verdict on a kernel guest's run: exactly these lines, exit status 0, these counts.
/// The status is reported first when the lines are wrong too: it usually says why.
pub fn check_run(
    out: &Outcome,
    b: &Backend,
    want: &[String],
    counts: &[(u64, u64)],
) -> Result<(), String> {
    let lines = check_lines(&out.console, want);
    let status = check_status(out, RunStatus::Exited(0));
    match (lines, status) {
        (Err(l), Err(s)) => Err(format!("{s}; {l}")),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => check_counts(out, b, counts),
    }
}

/// Verdicts on every backend (and case), collected so that one failing backend does not hide
/// the others: each is printed as it comes (`PASS`/`FAIL case on backend: why`), and
/// [`Verdicts::finish`] fails the test with all the failures and their consoles.
#[derive(Debug, Default)]
pub struct Verdicts {
    failures: Vec<String>,
}

impl Verdicts {
    pub fn record(
        &mut self,
        case: &str,
        backend: &str,
        verdict: Result<(), String>,
        console: &str,
    ) {
        match verdict {
            Ok(()) => visible(&format!("PASS {case} on {backend}")),
            Err(why) => {
                visible(&format!("FAIL {case} on {backend}: {why}"));
                self.failures.push(format!("{case} on {backend}: {why}\n--- console:\n{console}"));
            }
        }
    }

    pub fn finish(self) {
        if !self.failures.is_empty() {
            panic!("{} failure(s):\n{}", self.failures.len(), self.failures.join("\n"));
        }
    }
}

/// A backend for tests of what is refused before any VM exists: building a VM on it fails
/// only once everything before the backend has been accepted.
#[derive(Debug)]
pub struct NoVm;

impl Hypervisor for NoVm {
    fn name(&self) -> &'static str {
        "none"
    }
    fn create_vm(
        &self,
        _: Arc<vmcall_vmm::memory::GuestRam>,
        _: &vmcall_vmm::backend::GuestInfo,
    ) -> Result<Box<dyn vmcall_vmm::backend::VmBackend>, vmcall_vmm::backend::BackendError> {
        Err(vmcall_vmm::backend::BackendError::Unsupported("no VM in this test".into()))
    }
}

/// What `kernel_virt virtptr` prints when hypercall 0x30 answers the byte sum of the guest's
/// strings (guests/src/bin/kernel_virt.rs), read through its own page tables.
pub fn virtptr_lines() -> Vec<String> {
    let one = "a string only mapped at a high virtual address";
    let cross = "this string crosses from one page into the next";
    let identity = "an identity-mapped string";
    vec![
        "virtptr: own page tables, strings mapped only at 0x60000000000".to_string(),
        format!("virtptr one-page: va=0x60000000100 len={} ret={}", one.len(), byte_sum(one)),
        format!("virtptr cross-page: va=0x60000001ff0 len={} ret={}", cross.len(), byte_sum(cross)),
        format!("virtptr identity: len={} ret={}", identity.len(), byte_sum(identity)),
        "virtptr unmapped: va=0x70000000000 len=16 ret=-14".into(),
        "virtptr half-mapped: va=0x60000002ff8 len=16 ret=-14".into(),
        "virtptr: done".into(),
    ]
}
