//! The VM: builder, one thread per vCPU, timeout and the end of a run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcall_abi::layout::{CMDLINE_MAX, GUEST_LOAD_MIN, MAX_VCPUS};

use crate::backend::{BackendError, GuestInfo, Hypervisor, VmBackend};
use crate::boot::elf::{ElfError, ElfImage};
use crate::boot::multiboot::{self, MultibootError};
use crate::boot::{self, BootParams, VcpuInit};
use crate::devices::{Console, ConsoleWriter, Devices};
use crate::hypercall::{ForeignInsn, HypercallTable};
use crate::memory::{GuestRam, RamError};
use crate::seccomp::{self, Allowed, Seccomp, SeccompError, ThreadKind};
use crate::stats::VcpuStats;
use crate::trace::{CallSink, TraceSwitch};
pub use crate::vcpu::{Blame, RunError, RunStatus};
use crate::vcpu::{Shared, Threads};
use crate::x86::cpuid::PvCpuid;

/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 32 << 20;
/// How long a run waits for its vCPU threads to stop, once it has ended and its timeout has
/// passed, before it leaves behind those that do not (a handler that never returns).
/// Generous: on a loaded machine a thread only waiting for a CPU is not a stuck one.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a finished run waits for its gdb thread to tell gdb how it ended.
#[cfg(feature = "gdb")]
const GDB_GRACE: Duration = Duration::from_secs(2);

/// Errors building a VM: bad input (the image or the settings; [`BuildError::is_host_fault`]
/// is false) or a host that cannot run it (true).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The guest ELF was refused.
    #[error("invalid guest ELF")]
    Elf(#[from] ElfError),
    /// The multiboot kernel was refused.
    #[error("invalid multiboot kernel")]
    Multiboot(#[from] MultibootError),
    /// Guest RAM could not be created.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// An unsupported number of vCPUs.
    #[error("{0} vCPUs requested; vmcall supports 1..={MAX_VCPUS}")]
    VcpuCount(u32),
    /// The command line (its length) does not fit.
    #[error("guest command line is {0} bytes; at most {CMDLINE_MAX} fit")]
    CmdlineTooLong(usize),
    /// Writing the boot state into guest RAM failed.
    #[error("guest memory setup failed")]
    Memory(#[from] crate::memory::OutOfBounds),
    /// The backend could not create the VM.
    #[error("{backend} backend")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// The cause.
        source: BackendError,
    },
    /// A seccomp filter could not be built.
    #[error("seccomp filter")]
    Seccomp(#[from] SeccompError),
}

impl BuildError {
    /// Whether the host is to blame (the backend, the filters, mapping RAM) rather than the
    /// image or the settings. Every variant is classified here, without a wildcard.
    pub fn is_host_fault(&self) -> bool {
        match self {
            BuildError::Elf(_)
            | BuildError::Multiboot(_)
            | BuildError::Ram(RamError::BadSize(_))
            | BuildError::VcpuCount(_)
            | BuildError::CmdlineTooLong(_)
            | BuildError::Memory(_) => false,
            BuildError::Ram(RamError::Mmap(_))
            | BuildError::Backend { .. }
            | BuildError::Seccomp(_) => true,
        }
    }
}

/// The result of [`Vm::run`].
#[derive(Debug)]
pub struct RunReport {
    /// How the run ended.
    pub result: Result<RunStatus, RunError>,
    /// Every vCPU's statistics, merged.
    pub stats: VcpuStats,
    /// Each vCPU's own, by vCPU id.
    pub per_vcpu: Vec<VcpuStats>,
    /// How long it ran.
    pub elapsed: Duration,
    /// vCPUs whose threads had not stopped when the stop grace ran out (held by a handler
    /// that never returned): left running, detached, their statistics not counted.
    /// See [`VmBuilder::stop_grace`].
    pub stuck_vcpus: Vec<u32>,
    /// When an error of one vCPU ended the run (a guest fault, say): that vCPU and its last
    /// hypercalls, oldest first (at most [`crate::trace::RECENT_CALLS`]).
    pub last_calls: Option<(u32, Vec<crate::trace::RecentCall>)>,
}

/// Builds a [`Vm`].
pub struct VmBuilder {
    image: Vec<u8>,
    memory: u64,
    vcpus: u32,
    cmdline: Vec<u8>,
    timeout: Option<Duration>,
    table: Arc<HypercallTable>,
    console: Option<ConsoleWriter>,
    boot: BootOptions,
    trace: TraceSwitch,
    sink: Option<Arc<dyn CallSink>>,
    seccomp: Seccomp,
    seccomp_allow: Vec<Allowed>,
    stop_grace: Duration,
    #[cfg(feature = "gdb")]
    gdb: Option<crate::gdb::GdbSession>,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("memory", &self.memory)
            .field("vcpus", &self.vcpus)
            .finish()
    }
}

impl VmBuilder {
    /// A VM for the ELF image `image`, with 32 MiB, one vCPU, no timeout, an empty table and
    /// console output to stdout.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use vmcall_vmm::backend::Hypervisor;
    /// use vmcall_vmm::vm::{RunStatus, VmBuilder};
    ///
    /// fn run(hv: &dyn Hypervisor) -> Result<(), Box<dyn std::error::Error>> {
    ///     let vm = VmBuilder::new(std::fs::read("guest.elf")?)
    ///         .memory(64 << 20)
    ///         .vcpus(2)
    ///         .timeout(Some(Duration::from_secs(10)))
    ///         .build(hv)?;
    ///     match vm.run().result? {
    ///         RunStatus::Exited(status) => println!("guest exited with {status}"),
    ///         other => println!("{other:?}"),
    ///     }
    ///     Ok(())
    /// }
    /// ```
    pub fn new(image: Vec<u8>) -> Self {
        Self {
            image,
            memory: DEFAULT_MEMORY,
            vcpus: 1,
            cmdline: Vec::new(),
            timeout: None,
            table: Arc::new(HypercallTable::new()),
            console: None,
            boot: BootOptions::default(),
            trace: TraceSwitch::default(),
            sink: None,
            seccomp: Seccomp::default(),
            seccomp_allow: Vec::new(),
            stop_grace: DEFAULT_STOP_GRACE,
            #[cfg(feature = "gdb")]
            gdb: None,
        }
    }
    /// Debug the guest with gdb over `session`'s connection: every vCPU waits for gdb before
    /// its first instruction (`docs/gdb.md`).
    #[cfg(feature = "gdb")]
    pub fn gdb(mut self, session: crate::gdb::GdbSession) -> Self {
        self.gdb = Some(session);
        self
    }
    /// How the guest boots (default: multiboot if the image has a multiboot header, else
    /// vmcall's ELF64 contract).
    pub fn boot(mut self, boot: Boot) -> Self {
        self.boot.boot = boot;
        self
    }
    /// The PV features the KVM CPUID leaf advertises (default: what vmcall implements), and
    /// whether hypercalls and PV MSRs the guest was not offered are refused
    /// (`KVM_CAP_ENFORCE_PV_FEATURE_CPUID`; default off, as in KVM).
    pub fn pv_cpuid(mut self, pv: PvCpuid) -> Self {
        self.boot.pv = pv;
        self
    }
    /// What the other vendor's hypercall instruction does (default: KVM's, patched to the
    /// native one and answered).
    pub fn foreign_hypercall(mut self, foreign: ForeignInsn) -> Self {
        self.boot.foreign = foreign;
        self
    }
    /// The image's name, for a multiboot kernel's command line.
    pub fn image_name(mut self, name: impl Into<String>) -> Self {
        self.boot.image_name = name.into();
        self
    }
    /// Guest RAM in bytes (a multiple of 2 MiB, 2 MiB to 64 GiB; default 32 MiB).
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }
    /// Number of vCPUs (1 to 64; default 1).
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }
    /// The guest's command line (`BootInfo::cmdline_gpa`, or the multiboot command line).
    pub fn cmdline(mut self, cmdline: impl Into<Vec<u8>>) -> Self {
        self.cmdline = cmdline.into();
        self
    }
    /// Stop the run with [`RunError::Timeout`] after this long (`None`: never).
    pub fn timeout(mut self, t: Option<Duration>) -> Self {
        self.timeout = t;
        self
    }
    /// How long [`Vm::run`] waits for vCPU threads to stop after the run has ended — and,
    /// with a timeout, after the timeout too: threads always get until the timeout, however
    /// early the run ends. A thread still running then (held by a handler that does not
    /// return) is left behind and named in [`RunReport::stuck_vcpus`], so `run` returns
    /// within the timeout plus this grace. Default [`DEFAULT_STOP_GRACE`].
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }
    /// Use `table` (keep a clone of the `Arc` to change it while the VM runs).
    pub fn table(mut self, table: Arc<HypercallTable>) -> Self {
        self.table = table;
        self
    }
    /// Where the guest's console output goes (default: stdout).
    pub fn console(mut self, console: ConsoleWriter) -> Self {
        self.console = Some(console);
        self
    }
    /// The switch of the per-call text trace (default: on, and the `tracing` subscriber's
    /// filter decides what is shown); keep a clone to turn it on and off while the VM runs.
    pub fn trace(mut self, switch: TraceSwitch) -> Self {
        self.trace = switch;
        self
    }
    /// Give every answered hypercall to `sink` (e.g. a JSON trace writer).
    pub fn sink(mut self, sink: Arc<dyn CallSink>) -> Self {
        self.sink = Some(sink);
        self
    }
    /// Which threads run under seccomp filters (default: the vCPU threads; see
    /// [`crate::seccomp`]).
    pub fn seccomp(mut self, seccomp: Seccomp) -> Self {
        self.seccomp = seccomp;
        self
    }
    /// Let vCPU threads make these syscalls too: what the handlers this VM will run need
    /// beyond vmcall's own list (a handler that spawns a process needs pipes, polling and
    /// more). Handlers run on the vCPU thread that made the call, so declare here everything
    /// a handler installed at any time during the run may do.
    pub fn seccomp_allow(mut self, syscalls: impl IntoIterator<Item = Allowed>) -> Self {
        self.seccomp_allow.extend(syscalls);
        self
    }

    /// Check everything, load the image, set up boot state and create the VM on `hv`.
    pub fn build(self, hv: &dyn Hypervisor) -> Result<Vm, BuildError> {
        let prepared =
            prepare_guest(&self.image, self.memory, self.vcpus, &self.cmdline, &self.boot)?;
        let backend = hv
            .create_vm(prepared.ram.clone(), &prepared.guest)
            .map_err(|source| BuildError::Backend { backend: hv.name(), source })?;
        #[cfg(feature = "gdb")]
        let with_gdb = self.gdb.is_some();
        #[cfg(not(feature = "gdb"))]
        let with_gdb = false;
        let filters =
            Filters::compile(self.seccomp, backend.as_ref(), &self.seccomp_allow, with_gdb)?;
        let console = Console::new(self.console.unwrap_or_else(|| Box::new(std::io::stdout())));
        let devices = Devices::new(console, self.vcpus, prepared.ram.size());
        #[cfg_attr(not(feature = "gdb"), allow(unused_mut))]
        let mut shared = Shared::new(
            prepared.ram,
            self.table,
            devices,
            self.vcpus,
            prepared.guest.pv,
            self.trace,
            self.sink,
        );
        #[cfg(feature = "gdb")]
        if self.gdb.is_some() {
            shared.debug = Some(crate::debug::DebugHub::new(self.vcpus));
        }
        Ok(Vm {
            #[cfg(feature = "gdb")]
            gdb: self.gdb,
            filters,
            stop_grace: self.stop_grace,
            backend,
            inits: prepared.inits,
            timeout: self.timeout,
            shared: Arc::new(shared),
            backend_name: hv.name(),
        })
    }
}

/// Guest RAM with an image loaded and every vCPU's boot state set up, before any backend.
#[derive(Debug)]
pub struct PreparedGuest {
    /// The guest's RAM, loaded.
    pub ram: Arc<GuestRam>,
    /// What the backend needs to know about the guest.
    pub guest: GuestInfo,
    /// Each vCPU's state at entry.
    pub inits: Vec<VcpuInit>,
}

/// How a guest boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Boot {
    /// Multiboot when the image carries a multiboot header in its first 8 KiB, else vmcall's
    /// own ELF64 contract.
    #[default]
    Auto,
    /// vmcall's contract (`docs/guest-abi.md`): an ELF64 image entered in 64-bit long mode.
    Elf64,
    /// Multiboot v1: an ELF32, ELF64 or raw image entered in 32-bit protected mode.
    Multiboot,
}

impl std::str::FromStr for Boot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Boot::Auto),
            "elf64" => Ok(Boot::Elf64),
            "multiboot" => Ok(Boot::Multiboot),
            _ => Err(format!("unknown boot protocol '{s}' (auto, elf64, multiboot)")),
        }
    }
}

/// How the VM is set up besides its size: the boot protocol, and the KVM behaviours a user may
/// choose as on KVM itself.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// The boot protocol.
    pub boot: Boot,
    /// The image's name, which multiboot puts first on the kernel's command line (as QEMU
    /// does for `-kernel NAME -append ARGS`); "kernel" if empty.
    pub image_name: String,
    /// The PV features CPUID advertises, and whether they are enforced.
    pub pv: PvCpuid,
    /// What the other vendor's hypercall instruction does.
    pub foreign: ForeignInsn,
}

/// Check the settings and the image, allocate RAM, load the image and write the boot
/// structures: everything [`VmBuilder::build`] does before it asks a backend for a VM.
pub fn prepare_guest(
    image: &[u8],
    memory: u64,
    vcpus: u32,
    cmdline: &[u8],
    options: &BootOptions,
) -> Result<PreparedGuest, BuildError> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(BuildError::VcpuCount(vcpus));
    }
    if cmdline.len() as u64 > CMDLINE_MAX {
        return Err(BuildError::CmdlineTooLong(cmdline.len()));
    }
    let ram = Arc::new(GuestRam::new(memory)?);
    let limit = boot::load_limit(ram.size(), vcpus);
    let header = match options.boot {
        Boot::Elf64 => None,
        Boot::Auto => multiboot::find_header(image).transpose()?,
        Boot::Multiboot => {
            Some(multiboot::find_header(image).unwrap_or(Err(MultibootError::NoHeader))?)
        }
    };
    let (elf, inits) = match header {
        None => {
            let elf = ElfImage::parse(image, GUEST_LOAD_MIN, limit)?;
            elf.load(image, &ram)?;
            let params = BootParams {
                entry: elf.entry,
                image_end: elf.end(),
                vcpus,
                cmdline,
                amd: host_is_amd(),
            };
            let inits = boot::setup(&ram, &params)?;
            (elf, inits)
        }
        Some(header) => {
            let elf = multiboot::parse_image(image, &header, GUEST_LOAD_MIN, limit)?;
            elf.load(image, &ram)?;
            let name = if options.image_name.is_empty() { "kernel" } else { &options.image_name };
            let info = multiboot::write_info(&ram, name, cmdline)?;
            let inits = multiboot::setup(&ram, vcpus, elf.entry, info)?;
            (elf, inits)
        }
    };
    let guest = GuestInfo {
        vcpus,
        entry: elf.entry,
        segments: elf.segments,
        code_roots: elf.code_roots,
        pv: options.pv,
        foreign: options.foreign,
    };
    Ok(PreparedGuest { ram, guest, inits })
}

/// Whether the host CPU is AMD or Hygon (its native hypercall instruction is VMMCALL).
pub fn host_is_amd() -> bool {
    let ebx = std::arch::x86_64::__cpuid(0).ebx;
    ebx == vmcall_abi::cpuid::VENDOR_AMD_EBX || ebx == vmcall_abi::cpuid::VENDOR_HYGON_EBX
}

/// Stops a running VM from another thread: [`Vm::run`] then returns [`RunStatus::Stopped`]
/// (unless the run had already ended some other way).
#[derive(Clone)]
pub struct VmStopper(Arc<Shared>);

impl std::fmt::Debug for VmStopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VmStopper")
    }
}

impl VmStopper {
    /// Stop the VM: every vCPU leaves its run loop and the run ends with [`RunStatus::Stopped`].
    pub fn stop(&self) {
        self.0.finish(Ok(RunStatus::Stopped));
    }
}

/// Watches and steers a VM from other threads while it runs: its table, its statistics as the
/// vCPUs last published them, the text trace's switch, and stopping it.
#[derive(Clone)]
pub struct VmMonitor(Arc<Shared>);

impl std::fmt::Debug for VmMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VmMonitor")
    }
}

/// A VM's statistics while it runs ([`VmMonitor::stats`]).
#[derive(Debug, Clone)]
pub struct LiveStats {
    /// Every vCPU's, merged.
    pub total: VcpuStats,
    /// Each vCPU's, by id, as of its last publication (docs/control.md).
    pub per_vcpu: Vec<VcpuStats>,
    /// Time since the run started (zero before).
    pub elapsed: Duration,
}

impl VmMonitor {
    /// The VM's hypercall table (change it at any time).
    pub fn table(&self) -> &Arc<HypercallTable> {
        &self.0.table
    }
    /// Each vCPU's statistics as it last published them: every [`crate::stats::PUBLISH_EVERY`]
    /// while it makes hypercalls, and when it halts or stops.
    pub fn stats(&self) -> LiveStats {
        let per_vcpu = self.0.published();
        let mut total = VcpuStats::default();
        for s in &per_vcpu {
            total.merge(s);
        }
        let elapsed = self.0.started.get().map_or(Duration::ZERO, Instant::elapsed);
        LiveStats { total, per_vcpu, elapsed }
    }
    /// The per-call trace switch.
    pub fn trace(&self) -> &TraceSwitch {
        &self.0.trace
    }
    /// Stop the VM, as [`VmStopper::stop`] does.
    pub fn stop(&self) {
        self.0.finish(Ok(RunStatus::Stopped));
    }
    /// Whether the run has ended (or is ending).
    pub fn stopping(&self) -> bool {
        self.0.stopping()
    }
}

/// The compiled filters of a run's threads.
#[derive(Default)]
struct Filters {
    vcpu: Option<Arc<seccompiler::BpfProgram>>,
    main: Option<seccompiler::BpfProgram>,
    /// The gdb stub's thread's, when the VM has one (under any mode but `Off`: like the vCPU
    /// threads, it acts on input from outside the process).
    #[cfg_attr(not(feature = "gdb"), allow(dead_code))]
    gdb: Option<seccompiler::BpfProgram>,
}

impl Filters {
    fn compile(
        mode: Seccomp,
        backend: &dyn VmBackend,
        allow: &[Allowed],
        with_gdb: bool,
    ) -> Result<Self, SeccompError> {
        let audit = seccomp::audit_requested();
        let program = |kind: ThreadKind, extra: &[Allowed]| {
            let mut extra = extra.to_vec();
            extra.extend(backend.syscalls(kind));
            seccomp::compile(&seccomp::rules(kind, &extra), audit)
        };
        if mode == Seccomp::Off {
            return Ok(Self::default());
        }
        Ok(Self {
            vcpu: Some(Arc::new(program(ThreadKind::Vcpu, allow)?)),
            main: match mode {
                Seccomp::AllThreads => Some(program(ThreadKind::Main, &[])?),
                _ => None,
            },
            gdb: if with_gdb { Some(program(ThreadKind::Gdb, &[])?) } else { None },
        })
    }
}

/// A VM ready to run.
pub struct Vm {
    filters: Filters,
    stop_grace: Duration,
    backend: Box<dyn VmBackend>,
    inits: Vec<VcpuInit>,
    timeout: Option<Duration>,
    shared: Arc<Shared>,
    backend_name: &'static str,
    #[cfg(feature = "gdb")]
    gdb: Option<crate::gdb::GdbSession>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("backend", &self.backend_name)
            .field("vcpus", &self.inits.len())
            .finish()
    }
}

impl Vm {
    /// Guest RAM (for inspection in tests and tools).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.shared.ram
    }

    /// The hypercall table this VM dispatches through.
    pub fn table(&self) -> &Arc<HypercallTable> {
        &self.shared.table
    }

    /// A handle that stops this VM from any thread while it runs.
    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.shared.clone())
    }

    /// A handle that watches and steers this VM from any thread while it runs.
    pub fn monitor(&self) -> VmMonitor {
        VmMonitor(self.shared.clone())
    }

    /// Start the gdb thread of `--gdb`, if any.
    #[cfg(feature = "gdb")]
    fn start_gdb(&mut self) -> Option<std::thread::JoinHandle<crate::gdb::SessionEnd>> {
        let session = self.gdb.take()?;
        let hub = self.shared.debug.clone()?;
        let shared = self.shared.clone();
        let on_kill = move || shared.finish(Ok(RunStatus::Stopped));
        let filter = self.filters.gdb.take();
        match crate::gdb::start(session, hub.clone(), self.shared.ram.clone(), filter, on_kill) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("cannot start the gdb thread: {e}; the guest runs without it");
                hub.detach();
                None
            }
        }
    }

    /// How this VM traps hypercalls.
    pub fn describe(&self) -> String {
        format!("{} backend: {}", self.backend_name, self.backend.describe())
    }

    /// Run every vCPU on its own thread until the guest exits, all vCPUs halt, an error stops
    /// it (a vCPU thread that panics among them), or the timeout fires. Returns once every
    /// vCPU thread has stopped, or the stop grace has passed for those that did not.
    /// The same as [`Vm::start`] followed by [`RunningVm::wait`].
    pub fn run(self) -> RunReport {
        match self.start() {
            Ok(running) => running.wait(),
            Err(report) => *report,
        }
    }

    /// Create the vCPUs and start their threads, and return at once: the VM runs while the
    /// caller does something else, such as starting more VMs, and [`RunningVm::wait`] collects
    /// its end. No thread of the caller's is needed per VM, only the vCPU threads. The
    /// timeout is enforced by `wait`: a VM past its timeout before `wait` is called runs on
    /// until then. Under [`Seccomp::AllThreads`] the calling thread is confined here, as in
    /// `run`. If a vCPU cannot be created, the report of that failed run.
    #[cfg_attr(not(feature = "gdb"), allow(unused_mut))]
    pub fn start(mut self) -> Result<RunningVm, Box<RunReport>> {
        let start = Instant::now();
        let _ = self.shared.started.set(start);
        let mut vcpus = Vec::new();
        for (id, init) in self.inits.iter().enumerate() {
            match self.backend.create_vcpu(id as u32, init) {
                Ok(v) => vcpus.push(v),
                Err(source) => {
                    let err = RunError::Backend { vcpu: id as u32, source };
                    return Err(Box::new(RunReport {
                        result: Err(err),
                        stats: VcpuStats::default(),
                        per_vcpu: Vec::new(),
                        elapsed: start.elapsed(),
                        stuck_vcpus: Vec::new(),
                        last_calls: None,
                    }));
                }
            }
        }
        // The gdb thread starts before the vCPUs (which wait for it) and before this thread
        // may be confined.
        #[cfg(feature = "gdb")]
        let gdb = self.start_gdb();
        let threads = Threads::start(vcpus, &self.shared, self.filters.vcpu.clone());
        // The vCPU threads are confined; this one follows (only under Seccomp::AllThreads).
        if let Some(Err(source)) = self.filters.main.as_ref().map(seccomp::install) {
            let thread = "the thread running the VM".into();
            self.shared.finish(Err(RunError::Seccomp { thread, source }));
        }
        Ok(RunningVm {
            vm: self,
            threads,
            start,
            #[cfg(feature = "gdb")]
            gdb,
        })
    }

    fn wait_for_end(&self, start: Instant) {
        let mut end = self.shared.end.lock().unwrap_or_else(|p| p.into_inner());
        while end.is_none() {
            match self.timeout {
                Some(t) => {
                    let left = t.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        drop(end);
                        self.shared.finish(Err(RunError::Timeout(t)));
                        return;
                    }
                    end = self
                        .shared
                        .end_cv
                        .wait_timeout(end, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                None => end = self.shared.end_cv.wait(end).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// A VM whose vCPUs are running ([`Vm::start`]).
pub struct RunningVm {
    vm: Vm,
    threads: Threads,
    start: Instant,
    /// The gdb thread of `--gdb`, if one runs.
    #[cfg(feature = "gdb")]
    gdb: Option<std::thread::JoinHandle<crate::gdb::SessionEnd>>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm").field("vm", &self.vm).finish()
    }
}

impl RunningVm {
    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.vm.ram()
    }

    /// A handle that stops this VM from any thread.
    pub fn stopper(&self) -> VmStopper {
        self.vm.stopper()
    }

    /// A handle that watches and steers this VM from any thread.
    pub fn monitor(&self) -> VmMonitor {
        self.vm.monitor()
    }

    /// Wait until the run ends (as [`Vm::run`] describes) and every vCPU thread has stopped,
    /// or the stop grace has passed for those that did not. The timeout counts from
    /// [`Vm::start`], however late this is called: a VM that is past it when `wait` begins is
    /// stopped then.
    pub fn wait(self) -> RunReport {
        let Self {
            vm,
            threads,
            start,
            #[cfg(feature = "gdb")]
            gdb,
        } = self;
        vm.wait_for_end(start);
        // Threads get the grace after the end of the run, and never less than the timeout
        // plus the grace: a run that ended early never leaves a slow thread behind.
        let ended = Instant::now();
        let last = vm.timeout.and_then(|t| start.checked_add(t)).map_or(ended, |t| t.max(ended));
        let (stats, per_vcpu, stuck_vcpus) = threads.stop(last.checked_add(vm.stop_grace));
        if !stuck_vcpus.is_empty() {
            tracing::warn!(
                vcpus = ?stuck_vcpus,
                grace = ?vm.stop_grace,
                "vCPU threads did not stop after the run ended (a handler that never returns?); left behind"
            );
        }
        #[cfg(feature = "gdb")]
        if let Some(gdb) = gdb {
            // Let gdb hear how the run ended; a session idle at a prompt is left behind.
            let until = Instant::now() + GDB_GRACE;
            while !gdb.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        vm.shared.devices.console().flush();
        let result = vm
            .shared
            .end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(Ok(RunStatus::AllHalted));
        let last_calls = vm.shared.last_calls.lock().unwrap_or_else(|p| p.into_inner()).take();
        RunReport { result, stats, per_vcpu, elapsed: start.elapsed(), stuck_vcpus, last_calls }
    }
}
