//! The C headers in crates/guest/include agree with the Rust ABI (crates/abi): every constant
//! and struct layout is compiled into a host C program whose output is compared here, so the
//! two cannot drift apart unnoticed.

use std::process::Command;

use vmcall_abi::{cpuid, errno, hc, layout, ports, selectors};

fn expectations() -> Vec<(&'static str, u64)> {
    let mut v: Vec<(&'static str, u64)> = Vec::new();
    for nr in 1..hc::KVM_HC_STANDARD_END {
        v.push((hc::name(nr).unwrap(), nr));
    }
    v.push(("KVM_HC_MY_VMCALL", hc::KVM_HC_MY_VMCALL));
    v.push(("VMCALL_HC_BASE", hc::VMCALL_HC_BASE));
    v.push(("VMCALL_HC_BATCH", hc::VMCALL_HC_BATCH));
    v.push(("VMCALL_BATCH_MAX", vmcall_abi::VMCALL_BATCH_MAX));
    v.push(("VMCALL_HC_LIST", hc::VMCALL_HC_LIST));
    v.push(("VMCALL_NAME_LEN", vmcall_abi::VMCALL_NAME_LEN as u64));
    let errno_names =
        ["KVM_ENOSYS", "KVM_EFAULT", "KVM_EINVAL", "KVM_E2BIG", "KVM_EPERM", "KVM_EOPNOTSUPP"];
    for (c_name, (_, value)) in errno_names.iter().zip(errno::ALL) {
        v.push((c_name, value as u64));
    }
    v.extend([
        ("KVM_CPUID_SIGNATURE", u64::from(cpuid::KVM_CPUID_SIGNATURE)),
        ("KVM_CPUID_FEATURES", u64::from(cpuid::KVM_CPUID_FEATURES)),
        ("KVM_FEATURE_PV_UNHALT", u64::from(cpuid::KVM_FEATURE_PV_UNHALT)),
        ("KVM_FEATURE_PV_SEND_IPI", u64::from(cpuid::KVM_FEATURE_PV_SEND_IPI)),
        ("KVM_FEATURE_PV_SCHED_YIELD", u64::from(cpuid::KVM_FEATURE_PV_SCHED_YIELD)),
        ("VMCALL_KVM_SIGNATURE_EBX", u64::from(cpuid::KVM_SIGNATURE[0])),
        ("VMCALL_KVM_SIGNATURE_ECX", u64::from(cpuid::KVM_SIGNATURE[1])),
        ("VMCALL_KVM_SIGNATURE_EDX", u64::from(cpuid::KVM_SIGNATURE[2])),
        ("VMCALL_VENDOR_AMD_EBX", u64::from(cpuid::VENDOR_AMD_EBX)),
        ("VMCALL_VENDOR_HYGON_EBX", u64::from(cpuid::VENDOR_HYGON_EBX)),
        ("KVM_CLOCK_PAIRING_WALLCLOCK", vmcall_abi::KVM_CLOCK_PAIRING_WALLCLOCK),
        ("VMCALL_HYPERCALL_LEN", vmcall_abi::insn::HYPERCALL_LEN),
        ("VMCALL_ABI_VERSION", u64::from(vmcall_abi::ABI_VERSION)),
        ("VMCALL_BOOT_INFO_MAGIC", vmcall_abi::BOOT_INFO_MAGIC),
        ("VMCALL_PORT_COM1", u64::from(ports::COM1)),
        ("VMCALL_PORT_COM1_END", u64::from(ports::COM1_END)),
        ("VMCALL_PORT_EXIT", u64::from(ports::PORT_EXIT)),
        ("VMCALL_PORT_DOORBELL", u64::from(ports::PORT_DOORBELL)),
        ("VMCALL_PORT_HC_TRAP", u64::from(ports::PORT_HC_TRAP)),
        ("VMCALL_PORT_FAULT", u64::from(ports::PORT_FAULT)),
        ("VMCALL_KERNEL_CS", u64::from(selectors::KERNEL_CS)),
        ("VMCALL_KERNEL_DS", u64::from(selectors::KERNEL_DS)),
        ("VMCALL_USER_CS32", u64::from(selectors::USER_CS32)),
        ("VMCALL_USER_DS", u64::from(selectors::USER_DS)),
        ("VMCALL_USER_CS", u64::from(selectors::USER_CS)),
        ("VMCALL_KERNEL_CS32", u64::from(selectors::KERNEL_CS32)),
        ("VMCALL_TSS_BASE", u64::from(selectors::TSS_BASE)),
        ("VMCALL_LAYOUT_NULL_PAGE_END", layout::NULL_PAGE_END),
        ("VMCALL_LAYOUT_GDT", layout::GDT),
        ("VMCALL_LAYOUT_IDT", layout::IDT),
        ("VMCALL_LAYOUT_IDT_STUBS", layout::IDT_STUBS),
        ("VMCALL_LAYOUT_BOOT_INFO", layout::BOOT_INFO),
        ("VMCALL_LAYOUT_CMDLINE", layout::CMDLINE),
        ("VMCALL_LAYOUT_CMDLINE_MAX", layout::CMDLINE_MAX),
        ("VMCALL_LAYOUT_TSS", layout::TSS),
        ("VMCALL_LAYOUT_TSS_STRIDE", layout::TSS_STRIDE),
        ("VMCALL_LAYOUT_IO_BITMAP", layout::IO_BITMAP),
        ("VMCALL_LAYOUT_PML4", layout::PML4),
        ("VMCALL_LAYOUT_PDPT", layout::PDPT),
        ("VMCALL_LAYOUT_PT_LOW", layout::PT_LOW),
        ("VMCALL_LAYOUT_PD", layout::PD),
        ("VMCALL_LAYOUT_IST_STACKS", layout::IST_STACKS),
        ("VMCALL_LAYOUT_IST_STACK_SIZE", layout::IST_STACK_SIZE),
        ("VMCALL_LAYOUT_GUEST_LOAD_MIN", layout::GUEST_LOAD_MIN),
        ("VMCALL_LAYOUT_MAX_VCPUS", u64::from(layout::MAX_VCPUS)),
        ("VMCALL_LAYOUT_MAX_RAM", layout::MAX_RAM),
        ("VMCALL_LAYOUT_MIN_RAM", layout::MIN_RAM),
        ("VMCALL_LAYOUT_RAM_ALIGN", layout::RAM_ALIGN),
        ("VMCALL_LAYOUT_STACK_SIZE", layout::STACK_SIZE),
        ("sizeof(struct vmcall_boot_info)", std::mem::size_of::<vmcall_abi::BootInfo>() as u64),
        (
            "sizeof(struct kvm_clock_pairing)",
            std::mem::size_of::<vmcall_abi::KvmClockPairing>() as u64,
        ),
        (
            "offsetof(struct kvm_clock_pairing, tsc)",
            std::mem::offset_of!(vmcall_abi::KvmClockPairing, tsc) as u64,
        ),
        (
            "offsetof(struct kvm_clock_pairing, flags)",
            std::mem::offset_of!(vmcall_abi::KvmClockPairing, flags) as u64,
        ),
        ("sizeof(struct vmcall_batch_entry)", std::mem::size_of::<vmcall_abi::BatchEntry>() as u64),
    ]);
    macro_rules! batch_entry_offsets {
        ($($f:ident),*) => {
            $(v.push((concat!("offsetof(struct vmcall_batch_entry, ", stringify!($f), ")"),
                std::mem::offset_of!(vmcall_abi::BatchEntry, $f) as u64));)*
        };
    }
    batch_entry_offsets!(nr, args, ret);
    v.push((
        "sizeof(struct vmcall_hypercall_info)",
        std::mem::size_of::<vmcall_abi::HypercallInfo>() as u64,
    ));
    v.push((
        "offsetof(struct vmcall_hypercall_info, nr)",
        std::mem::offset_of!(vmcall_abi::HypercallInfo, nr) as u64,
    ));
    v.push((
        "offsetof(struct vmcall_hypercall_info, name)",
        std::mem::offset_of!(vmcall_abi::HypercallInfo, name) as u64,
    ));
    macro_rules! boot_info_offsets {
        ($($f:ident),*) => {
            $(v.push((concat!("offsetof(struct vmcall_boot_info, ", stringify!($f), ")"),
                std::mem::offset_of!(vmcall_abi::BootInfo, $f) as u64));)*
        };
    }
    boot_info_offsets!(
        magic,
        abi_version,
        vcpu_id,
        vcpu_count,
        amd,
        ram_size,
        cmdline_gpa,
        cmdline_len,
        stack_top,
        free_start,
        free_end
    );
    v
}

#[test]
fn c_headers_match_the_rust_abi() {
    let exp = expectations();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../crates/guest/include");
    let dir = std::env::temp_dir().join(format!("vmcall-header-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/kvm_para.h>\n#include <vmcall.h>\nint main(void) {\n",
    );
    for (expr, _) in &exp {
        c += &format!("    printf(\"%s=%llu\\n\", \"{expr}\", (unsigned long long)({expr}));\n");
    }
    c += "    return 0;\n}\n";
    std::fs::write(dir.join("check.c"), c).unwrap();
    let exe = dir.join("check");
    let cc = Command::new("gcc")
        .args(["-Wall", "-Werror", "-I", include, "-o"])
        .arg(&exe)
        .arg(dir.join("check.c"))
        .output()
        .expect("gcc");
    assert!(
        cc.status.success(),
        "the headers do not compile:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let got: std::collections::HashMap<&str, u64> = text
        .lines()
        .filter_map(|l| l.rsplit_once('='))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    let mismatches: Vec<String> = exp
        .iter()
        .filter(|(expr, want)| got.get(expr) != Some(want))
        .map(|(expr, want)| format!("{expr}: C {:?}, Rust {want}", got.get(expr)))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(mismatches.is_empty(), "C headers drifted from crates/abi:\n{}", mismatches.join("\n"));
    assert_eq!(got.len(), exp.len());
}
