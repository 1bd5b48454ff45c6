//! Linux's KVM selftests `fix_hypercall_test` and `kvm_pv_test`, re-expressed as a vmcall guest
//! (own assertions, no code taken): the command line picks the case.
//!
//! - `fix-hypercall`: runs the *other* vendor's hypercall instruction (VMCALL on AMD, VMMCALL
//!   on Intel) from code written at run time, making KVM_HC_SCHED_YIELD. Under KVM's default
//!   quirk it is answered (0) and its bytes now read as the native instruction; with the
//!   quirk off it raises #UD in the guest and the bytes are unchanged.
//! - `pv-hypercalls`: KICK_CPU, SEND_IPI and SCHED_YIELD, each gated on its PV feature bit when
//!   the host enforces the PV CPUID (-KVM_ENOSYS when not offered).
//! - `pv-msrs`: reads and writes every KVM PV MSR; with enforcement and no feature offered,
//!   each access must raise #GP.
#![no_std]
#![no_main]

use core::arch::x86_64::__cpuid;

use vmcall_guest::fmt::{Dec, Hex};
use vmcall_guest::{cmdline, hc, println, BootInfo};
use vmcall_guests::code::{write_code, Insn};
use vmcall_guests::idt::{self, guarded_call, Shown};
use vmcall_guests::scratch_page;

vmcall_guest::entry!(main);

fn main(info: &'static BootInfo) -> i32 {
    idt::install();
    let features = __cpuid(0x4000_0001).eax;
    println!("pv features: {}", Hex(features.into()));
    match cmdline(info) {
        "fix-hypercall" => fix_hypercall(info),
        "pv-hypercalls" => pv_hypercalls(),
        "pv-msrs" => pv_msrs(info),
        other => {
            println!("selftest_pv: unknown case {other:?}");
            return 2;
        }
    }
    println!("selftest_pv: done");
    0
}

fn fix_hypercall(info: &BootInfo) {
    let (native, other) = if info.amd != 0 {
        (Insn::Vmmcall, Insn::Vmcall)
    } else {
        (Insn::Vmcall, Insn::Vmmcall)
    };
    // mov eax, KVM_HC_SCHED_YIELD; mov ebx, 0 (this vCPU); <other vendor's>; ret
    let at = scratch_page(info, 0);
    let mut code = [0xb8, hc::KVM_HC_SCHED_YIELD as u8, 0, 0, 0, 0xbb, 0, 0, 0, 0, 0, 0, 0, 0xc3];
    code[10..13].copy_from_slice(&other.bytes());
    write_code(at, &code);
    let result = guarded_call(at, 0, 0);
    // SAFETY: `at` is the scratch page just written, mapped in the VMM's identity tables.
    let now: [u8; 3] = unsafe { core::ptr::read_volatile((at + 10) as *const [u8; 3]) };
    let bytes = if now == native.bytes() {
        "native"
    } else if now == other.bytes() {
        "unchanged"
    } else {
        "changed to something else"
    };
    println!("fix-hypercall: other vendor's sched_yield {}; its bytes now {bytes}", Shown::at(result, at));
}

fn pv_hypercalls() {
    // KICK_CPU(flags, apic 0), SEND_IPI(bitmap 1, 0, min 0, fixed vector 0xf0), SCHED_YIELD(0)
    let kick = vmcall_guest::hypercall2(hc::KVM_HC_KICK_CPU, 0, 0);
    let ipi = vmcall_guest::hypercall4(hc::KVM_HC_SEND_IPI, 1, 0, 0, 0xf0);
    let yld = vmcall_guest::hypercall1(hc::KVM_HC_SCHED_YIELD, 0);
    println!("pv-hypercalls: kick_cpu={} send_ipi={} sched_yield={}", Dec(kick), Dec(ipi), Dec(yld));
}

/// KVM's PV MSRs (arch/x86/include/uapi/asm/kvm_para.h).
const PV_MSRS: [(u32, &str); 10] = [
    (0x11, "wall_clock"),
    (0x12, "system_time"),
    (0x4b56_4d00, "wall_clock_new"),
    (0x4b56_4d01, "system_time_new"),
    (0x4b56_4d02, "async_pf_en"),
    (0x4b56_4d03, "steal_time"),
    (0x4b56_4d04, "pv_eoi_en"),
    (0x4b56_4d05, "poll_control"),
    (0x4b56_4d06, "async_pf_int"),
    (0x4b56_4d07, "async_pf_ack"),
];

/// `rdmsr` then `ret` / `xor eax,eax; xor edx,edx; wrmsr` then `ret`, with ECX from RBX.
fn msr_code(at: u64, write: bool) -> u64 {
    let code: &[u8] = if write {
        &[0x89, 0xd9, 0x31, 0xc0, 0x31, 0xd2, 0x0f, 0x30, 0xc3] // mov ecx, ebx; xor; xor; wrmsr; ret
    } else {
        &[0x89, 0xd9, 0x0f, 0x32, 0xc3] // mov ecx, ebx; rdmsr; ret
    };
    write_code(at, code);
    at
}

fn pv_msrs(info: &BootInfo) {
    let page = scratch_page(info, 0);
    let (rd, wr) = (msr_code(page, false), msr_code(page + 64, true));
    for (index, name) in PV_MSRS {
        let r = guarded_call(rd, 0, index.into()).map(|_| 0).map_err(|t| t.vector);
        let w = guarded_call(wr, 0, index.into()).map(|_| 0).map_err(|t| t.vector);
        let show = |x: Result<i64, u64>| match x {
            Ok(_) => "ok",
            Err(13) => "#GP",
            Err(_) => "other exception",
        };
        println!("pv-msrs: {name}: rdmsr {} wrmsr {}", show(r), show(w));
    }
}
