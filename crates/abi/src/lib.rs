//! The vmcall ABI: everything host and guest must agree on, in one place.
//!
//! Hypercall numbers and error codes are Linux KVM's (`include/uapi/linux/kvm_para.h`); ports,
//! selectors and the boot layout are vmcall's own (see `docs/guest-abi.md`). The ABI is versioned
//! by [`ABI_VERSION`], independently of the crate's semver.
#![warn(missing_docs)]
#![no_std]
#![forbid(unsafe_code)]

pub mod layout;

/// Version of the guest/host contract described in `docs/guest-abi.md`.
pub const ABI_VERSION: u32 = 1;

/// Linux KVM hypercall numbers (`KVM_HC_*`), x86 meanings in `docs/hypercalls.md`.
pub mod hc {
    /// Poll for a pending interrupt: a no-op that answers 0 (its exit is the point).
    pub const KVM_HC_VAPIC_POLL_IRQ: u64 = 1;
    /// The paravirtual MMU operations, removed from Linux: -KVM_ENOSYS.
    pub const KVM_HC_MMU_OP: u64 = 2;
    /// PowerPC only: -KVM_ENOSYS on x86.
    pub const KVM_HC_FEATURES: u64 = 3;
    /// PowerPC only: -KVM_ENOSYS on x86.
    pub const KVM_HC_PPC_MAP_MAGIC_PAGE: u64 = 4;
    /// Wake a vCPU halted in a paravirtual spinlock: a0 = flags, a1 = its APIC id.
    pub const KVM_HC_KICK_CPU: u64 = 5;
    /// MIPS only: -KVM_ENOSYS on x86.
    pub const KVM_HC_MIPS_GET_CLOCK_FREQ: u64 = 6;
    /// MIPS only: -KVM_ENOSYS on x86.
    pub const KVM_HC_MIPS_EXIT_VM: u64 = 7;
    /// MIPS only: -KVM_ENOSYS on x86.
    pub const KVM_HC_MIPS_CONSOLE_OUTPUT: u64 = 8;
    /// Write a [`crate::KvmClockPairing`] (host wall clock and TSC) at guest-physical a0.
    pub const KVM_HC_CLOCK_PAIRING: u64 = 9;
    /// Send an IPI to the vCPUs of a bitmap (a0 low, a1 high half) of APIC ids from a2, with ICR a3.
    pub const KVM_HC_SEND_IPI: u64 = 10;
    /// Yield to the vCPU with APIC id a0 (the host just schedules).
    pub const KVM_HC_SCHED_YIELD: u64 = 11;
    /// Map a guest-physical range (confidential guests): answered by user space, which is
    /// why a custom handler may take it without an override.
    pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;

    /// One past the highest number Linux assigns; numbers below it are "standard" and a custom
    /// handler may only take them with an explicit override.
    pub const KVM_HC_STANDARD_END: u64 = 13;

    /// The canonical example of a custom hypercall (the one the seed patch adds to the kernel).
    pub const KVM_HC_MY_VMCALL: u64 = 20;

    /// First of vmcall's own hypercall numbers ("VC" << 16), clear of Linux's and of the small
    /// numbers custom hypercalls use, and inside 32 bits so compatibility-mode code can call them.
    pub const VMCALL_HC_BASE: u64 = 0x5643_0000;
    /// Run a batch of hypercalls: a0 = guest-physical address of an array of
    /// [`crate::BatchEntry`], a1 = their count (at most [`crate::VMCALL_BATCH_MAX`]). Each entry
    /// is answered as a single call from the same caller would be, its result written to its
    /// `ret`; the batch returns the number of entries processed (docs/hypercalls.md).
    pub const VMCALL_HC_BATCH: u64 = VMCALL_HC_BASE + 1;
    /// List the custom hypercalls registered right now: a0 = guest-physical address of an array
    /// of [`crate::HypercallInfo`], a1 = its size in bytes. Returns the number of registered
    /// numbers and fills the array, sorted by number; a1 = 0 only asks for the count; an array
    /// too small for all of them is -KVM_E2BIG and nothing is written (docs/hypercalls.md).
    pub const VMCALL_HC_LIST: u64 = VMCALL_HC_BASE + 2;

    /// Linux's name for a standard number, if it has one.
    pub const fn name(nr: u64) -> Option<&'static str> {
        Some(match nr {
            KVM_HC_VAPIC_POLL_IRQ => "KVM_HC_VAPIC_POLL_IRQ",
            KVM_HC_MMU_OP => "KVM_HC_MMU_OP",
            KVM_HC_FEATURES => "KVM_HC_FEATURES",
            KVM_HC_PPC_MAP_MAGIC_PAGE => "KVM_HC_PPC_MAP_MAGIC_PAGE",
            KVM_HC_KICK_CPU => "KVM_HC_KICK_CPU",
            KVM_HC_MIPS_GET_CLOCK_FREQ => "KVM_HC_MIPS_GET_CLOCK_FREQ",
            KVM_HC_MIPS_EXIT_VM => "KVM_HC_MIPS_EXIT_VM",
            KVM_HC_MIPS_CONSOLE_OUTPUT => "KVM_HC_MIPS_CONSOLE_OUTPUT",
            KVM_HC_CLOCK_PAIRING => "KVM_HC_CLOCK_PAIRING",
            KVM_HC_SEND_IPI => "KVM_HC_SEND_IPI",
            KVM_HC_SCHED_YIELD => "KVM_HC_SCHED_YIELD",
            KVM_HC_MAP_GPA_RANGE => "KVM_HC_MAP_GPA_RANGE",
            VMCALL_HC_BATCH => "VMCALL_HC_BATCH",
            VMCALL_HC_LIST => "VMCALL_HC_LIST",
            _ => return None,
        })
    }
}

/// KVM hypercall error codes (positive; hypercalls return them negated).
pub mod errno {
    /// Unknown or unavailable hypercall.
    pub const KVM_ENOSYS: i64 = 1000;
    /// A guest address could not be read or written.
    pub const KVM_EFAULT: i64 = 14;
    /// An invalid argument.
    pub const KVM_EINVAL: i64 = 22;
    /// An argument too large (a batch or list that does not fit).
    pub const KVM_E2BIG: i64 = 7;
    /// Not allowed: the caller is not at CPL 0.
    pub const KVM_EPERM: i64 = 1;
    /// Not supported here (e.g. clock pairing without a stable host clock).
    pub const KVM_EOPNOTSUPP: i64 = 95;

    /// Every error code with its name, for parsing and printing.
    pub const ALL: [(&str, i64); 6] = [
        ("ENOSYS", KVM_ENOSYS),
        ("EFAULT", KVM_EFAULT),
        ("EINVAL", KVM_EINVAL),
        ("E2BIG", KVM_E2BIG),
        ("EPERM", KVM_EPERM),
        ("EOPNOTSUPP", KVM_EOPNOTSUPP),
    ];
}

/// The hypercall register convention (Linux `kvm_hypercallN`).
pub mod regs {
    /// Register holding the number on entry and the result on return.
    pub const NR_AND_RESULT: &str = "rax";
    /// Registers holding a0..a3.
    pub const ARGS: [&str; 4] = ["rbx", "rcx", "rdx", "rsi"];
}

/// Instruction encodings the host recognises as hypercalls.
pub mod insn {
    /// Intel `VMCALL`.
    pub const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
    /// AMD `VMMCALL`.
    pub const VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];
    /// Length of either instruction; RIP advances by this much after a hypercall.
    pub const HYPERCALL_LEN: u64 = 3;

    /// Whether `bytes` start with a hypercall instruction.
    pub fn is_hypercall(bytes: &[u8]) -> bool {
        bytes.len() >= 3 && (bytes[..3] == VMCALL || bytes[..3] == VMMCALL)
    }
}

/// I/O ports with a meaning in vmcall guests.
pub mod ports {
    /// COM1 data register: bytes written here go to the host's stdout.
    pub const COM1: u16 = 0x3f8;
    /// Last port of the COM1 block (reads of 0x3f8..=0x3ff return "transmitter empty").
    pub const COM1_END: u16 = 0x3ff;
    /// `out PORT_EXIT, eax` ends the run with status EAX; only that 4-byte write exits (a 1-
    /// or 2-byte write is taken as a stray write and ends the run with an error).
    pub const PORT_EXIT: u16 = 0xf8;
    /// Doorbell of a rewritten hypercall site (`out imm8, al; nop`); only meaningful from a site
    /// the host rewrote itself.
    pub const PORT_DOORBELL: u16 = 0xf5;
    /// The bytes a rewritten hypercall site holds: `out PORT_DOORBELL, al; nop`, as long as the
    /// hypercall instruction it replaces (`out imm8, al` changes no register, and the `nop` ends
    /// the instruction stream where the hypercall did).
    pub const DOORBELL_SITE: [u8; 3] = [0xe6, PORT_DOORBELL as u8, 0x90];
    /// Rung by the VMM-owned #UD and #GP handlers: either a hypercall instruction that the CPU
    /// refused (#UD when the kernel does not handle it, #GP from CPL > 0 under some KVMs) or a
    /// genuine fault.
    pub const PORT_HC_TRAP: u16 = 0xf6;
    /// Rung by the VMM-owned handler of every other exception, with the vector in AL.
    pub const PORT_FAULT: u16 = 0xf7;
    /// QEMU's `isa-debug-exit` as test kernels configure it (`iobase=0xf4`): writing V ends the
    /// run with status `(V << 1) | 1`.
    pub const ISA_DEBUG_EXIT: u16 = 0xf4;
    /// QEMU's fw_cfg: the 16-bit selector register.
    pub const FW_CFG_SELECTOR: u16 = 0x510;
    /// QEMU's fw_cfg: the 8-bit data register.
    pub const FW_CFG_DATA: u16 = 0x511;
}

/// Guest-physical addresses of memory-mapped devices.
pub mod mmio {
    /// The local APIC's register page (xAPIC mode), one per vCPU at the same address.
    pub const APIC_BASE: u64 = 0xfee0_0000;
    /// Size of the APIC's register page.
    pub const APIC_SIZE: u64 = 0x1000;
}

/// GDT selectors of the VMM-built GDT (see `docs/guest-abi.md`).
pub mod selectors {
    /// 64-bit code, DPL 0.
    pub const KERNEL_CS: u16 = 0x08;
    /// Data, DPL 0.
    pub const KERNEL_DS: u16 = 0x10;
    /// 32-bit (compatibility-mode) code, DPL 3.
    pub const USER_CS32: u16 = 0x18 | 3;
    /// Data, DPL 3.
    pub const USER_DS: u16 = 0x20 | 3;
    /// 64-bit code, DPL 3.
    pub const USER_CS: u16 = 0x28 | 3;
    /// 32-bit (compatibility-mode) code, DPL 0.
    pub const KERNEL_CS32: u16 = 0x30;
    /// First TSS descriptor; vCPU `i` uses `TSS_BASE + 16 * i`.
    pub const TSS_BASE: u16 = 0x38;
}

/// CPUID values a guest uses to detect KVM and the CPU vendor.
pub mod cpuid {
    /// The leaf with KVM's signature ("KVMKVMKVM") and the highest KVM leaf in EAX.
    pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
    /// The leaf whose EAX lists the paravirtual features (`KVM_FEATURE_*` bits).
    pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
    /// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
    pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
    /// Bit of `KVM_HC_KICK_CPU` support (paravirtual spinlocks).
    pub const KVM_FEATURE_PV_UNHALT: u32 = 7;
    /// Bit of `KVM_HC_SEND_IPI` support.
    pub const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
    /// Bit of `KVM_HC_SCHED_YIELD` support.
    pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 13;
    /// Leaf 0 EBX of an AMD CPU ("Auth"): guests on AMD use VMMCALL.
    pub const VENDOR_AMD_EBX: u32 = 0x6874_7541;
    /// Leaf 0 EBX of a Hygon CPU ("Hygo"), which also uses VMMCALL.
    pub const VENDOR_HYGON_EBX: u32 = 0x6f67_7948;
}

/// `struct kvm_clock_pairing` written by `KVM_HC_CLOCK_PAIRING`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmClockPairing {
    /// Host wall-clock seconds at the pairing.
    pub sec: i64,
    /// Nanoseconds within `sec`.
    pub nsec: i64,
    /// The guest TSC at the same moment.
    pub tsc: u64,
    /// Flags (none defined; 0).
    pub flags: u32,
    /// Reserved, zero.
    pub pad: [u32; 9],
}
const _: () = assert!(core::mem::size_of::<KvmClockPairing>() == 64);

/// One call of a [`hc::VMCALL_HC_BATCH`] batch (Xen's multicall, for KVM hypercalls).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchEntry {
    /// Hypercall number (what RAX would hold).
    pub nr: u64,
    /// a0..a3 (what RBX, RCX, RDX, RSI would hold).
    pub args: [u64; 4],
    /// Written by the host: what RAX would have returned.
    pub ret: u64,
}
const _: () = assert!(core::mem::size_of::<BatchEntry>() == 48);

/// Most entries one batch may hold; a larger count is refused with -KVM_E2BIG.
pub const VMCALL_BATCH_MAX: u64 = 4096;

/// Bytes of a handler's name in a [`HypercallInfo`]: at most this minus one, NUL-padded.
pub const VMCALL_NAME_LEN: usize = 24;

/// One registered custom hypercall, as [`hc::VMCALL_HC_LIST`] writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypercallInfo {
    /// The hypercall number.
    pub nr: u64,
    /// The handler's name, UTF-8, cut to at most `VMCALL_NAME_LEN - 1` bytes at a character
    /// boundary and NUL-padded (so always NUL-terminated).
    pub name: [u8; VMCALL_NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<HypercallInfo>() == 32);

impl HypercallInfo {
    /// The name as a string (up to the first NUL; empty if it is not UTF-8).
    pub fn name(&self) -> &str {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(VMCALL_NAME_LEN);
        core::str::from_utf8(&self.name[..end]).unwrap_or("")
    }
}

/// Clock type for `KVM_HC_CLOCK_PAIRING`.
pub const KVM_CLOCK_PAIRING_WALLCLOCK: u64 = 0;

/// Per-vCPU boot information; RDI holds its guest-physical address at entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// This vCPU's index, which is also its APIC id.
    pub vcpu_id: u32,
    /// Number of vCPUs in the VM.
    pub vcpu_count: u32,
    /// Set if the host CPU is AMD-like (the native hypercall instruction is VMMCALL).
    pub amd: u32,
    /// Bytes of guest RAM, mapped from guest-physical 0.
    pub ram_size: u64,
    /// Guest-physical address of the command line (UTF-8, not NUL-terminated).
    pub cmdline_gpa: u64,
    /// Length of the command line in bytes.
    pub cmdline_len: u64,
    /// Initial RSP of this vCPU.
    pub stack_top: u64,
    /// First byte after the loaded image (page aligned): free RAM starts here.
    pub free_start: u64,
    /// End of the free RAM (the lowest vCPU stack).
    pub free_end: u64,
}
const _: () = assert!(core::mem::size_of::<BootInfo>() == 72);

/// "VMCALLBI" little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"VMCALLBI");

/// Exit reasons of vmcall's neutral exit enum; the index of the exit-handler table and of the
/// per-reason exit counters.
#[repr(u32)]
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitReason {
    /// Port I/O (`in`/`out`).
    Io = 0,
    /// HLT.
    Hlt = 1,
    /// VMCALL or VMMCALL.
    Hypercall = 2,
    /// Triple fault.
    Shutdown = 3,
    /// A debug exit the backend did not consume.
    Debug = 4,
    /// An access to guest-physical memory with no RAM behind it.
    Mmio = 5,
    /// An exception the guest did not handle.
    Fault = 6,
    /// An exit the backend could not translate.
    Unknown = 7,
    /// The host interrupted the vCPU (to stop the VM, or a signal): not the guest's doing.
    Interrupted = 8,
}

impl ExitReason {
    /// How many reasons there are.
    pub const COUNT: usize = 9;
    /// Every reason, in index order.
    pub const ALL: [ExitReason; Self::COUNT] = [
        Self::Io,
        Self::Hlt,
        Self::Hypercall,
        Self::Shutdown,
        Self::Debug,
        Self::Mmio,
        Self::Fault,
        Self::Unknown,
        Self::Interrupted,
    ];
    /// The reason's name in statistics (`--stats`, `--stats-json`, `vmcall ctl stats`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Io => "io",
            Self::Hlt => "hlt",
            Self::Hypercall => "hypercall",
            Self::Shutdown => "shutdown",
            Self::Debug => "debug",
            Self::Mmio => "mmio",
            Self::Fault => "fault",
            Self::Unknown => "unknown",
            Self::Interrupted => "interrupted",
        }
    }
}

/// Linux VMX's exit reason for VMCALL, for reference in traces.
pub const EXIT_REASON_VMCALL: u32 = 18;
