//! Which hypercalls reach vmcall under a trap strategy on a given KVM: the honest answer that
//! `vmcall info` prints, case by case, so nobody has to infer it from the strategy's name.

use crate::{KvmCapabilities, Trap};

/// The kinds of hypercall site whose fate differs between hosts and strategies.
pub const CASES: [&str; 4] = [
    "code present at load",
    "code written at run time, vmcall's IDT",
    "code written at run time, guest's own IDT",
    "guest without a usable IDT",
];

/// For each of [`CASES`], how its hypercalls reach vmcall under `trap` (resolved, not `Auto`)
/// on a KVM with `caps`.
pub fn coverage(caps: &KvmCapabilities, trap: Trap) -> [String; 4] {
    let quirk_off = caps.can_disable_hypercall_quirk;
    let all = |how: &str| format!("every call ({how})");
    if trap == Trap::Xen {
        let foreign = if quirk_off { "; the other vendor's instruction through #UD" } else { "" };
        let row = all(&format!("KVM_EXIT_XEN for the native instruction{foreign}"));
        return [row.clone(), row.clone(), row.clone(), row];
    }
    // What raises #UD at all: on kvm_pvm every hypercall instruction the kernel meets; on
    // hardware only the other vendor's (the kernel answers the native one itself).
    let ud_catches = if !quirk_off {
        None
    } else if caps.pvm {
        Some("every call")
    } else {
        Some("the other vendor's instruction only; the kernel answers the native one (-1000 for unknown numbers)")
    };
    let static_sites = match (trap, ud_catches) {
        (Trap::Rewrite, Some("every call")) => {
            all("proven sites rewritten to a doorbell, the others once they have trapped")
        }
        (Trap::Rewrite, _) => "proven sites (rewritten to a doorbell); on hardware an unproven native site is answered by the kernel".into(),
        (Trap::Hwbp, Some("every call")) => all("four sites on breakpoints, the others through #UD"),
        (Trap::Hwbp, _) => "four sites (breakpoints); other native sites are answered by the kernel".into(),
        (_, Some(c)) => format!("{c} (through #UD)"),
        (_, None) => "none reliably: the quirk cannot be disabled here".into(),
    };
    let runtime_vmm = ud_catches
        .map_or("not trapped: the quirk cannot be disabled here".into(), |c| {
            format!("{c} (#UD into the VMM's stub)")
        });
    let runtime_guest = match ud_catches {
        Some(c) if caps.guest_debug => format!(
            "{c} (breakpoint on the guest's #UD/#GP handler, armed at the first exit after the guest loads its IDT)"
        ),
        Some(_) => "not trapped: the guest's handler gets the #UD (no KVM_CAP_SET_GUEST_DEBUG)".into(),
        None => "not trapped: the quirk cannot be disabled here".into(),
    };
    let no_idt = if caps.pvm && quirk_off {
        all("answered at the triple fault and resumed, verified on kvm_pvm")
    } else {
        "the run ends as a triple fault at the instruction".into()
    };
    [static_sites, runtime_vmm, runtime_guest, no_idt]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(pvm: bool, xen: bool) -> KvmCapabilities {
        KvmCapabilities {
            api_version: 12,
            max_vcpus: 8,
            sync_regs: true,
            immediate_exit: true,
            can_disable_hypercall_quirk: true,
            guest_debug: true,
            xen_hvm: if xen { 0x1ff } else { 0 },
            xen_intercept: xen,
            pvm,
        }
    }

    #[test]
    fn kvm_pvm_traps_everything_and_hardware_says_what_the_kernel_keeps() {
        let pvm = coverage(&caps(true, false), Trap::Rewrite);
        assert!(pvm.iter().all(|row| row.starts_with("every call")), "{pvm:?}");
        let hw = coverage(&caps(false, false), Trap::Rewrite);
        assert!(hw[0].starts_with("proven sites"), "{hw:?}");
        assert!(hw[1].contains("the kernel answers the native one"), "{hw:?}");
        assert!(hw[3].contains("triple fault"), "{hw:?}");
        let xen = coverage(&caps(false, true), Trap::Xen);
        assert!(xen.iter().all(|row| row.starts_with("every call")), "{xen:?}");
        let no_debug = KvmCapabilities { guest_debug: false, ..caps(true, false) };
        assert!(coverage(&no_debug, Trap::Ud)[2].starts_with("not trapped"));
    }
}
