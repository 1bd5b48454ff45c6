//! The CPUID leaves that say "this is KVM, with these paravirtual features", answered the same
//! on every backend so that a guest sees one machine whichever runs it.

use vmcall_abi::cpuid::{
    KVM_CPUID_FEATURES, KVM_CPUID_SIGNATURE, KVM_FEATURE_PV_SCHED_YIELD, KVM_FEATURE_PV_UNHALT,
    KVM_SIGNATURE,
};

/// KVM PV features (leaf 0x40000001 EAX) that vmcall itself implements on every backend:
/// `KVM_HC_KICK_CPU` waking a halted vCPU (PV_UNHALT) and `KVM_HC_SCHED_YIELD`. Not advertised:
/// PV_SEND_IPI (vmcall counts the destinations but has no interrupt controller to deliver
/// to) and the MSR-based features (kvmclock, steal time, async PF, PV EOI), which only a
/// kernel KVM provides.
pub const PV_FEATURES: u32 = (1 << KVM_FEATURE_PV_UNHALT) | (1 << KVM_FEATURE_PV_SCHED_YIELD);

/// The PV features a VM's CPUID advertises, and whether hypercalls and PV MSRs the guest was
/// not offered are refused (KVM's `KVM_CAP_ENFORCE_PV_FEATURE_CPUID`, off by default as in
/// KVM: then every implemented hypercall answers whatever CPUID says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PvCpuid {
    /// Leaf 0x40000001 EAX.
    pub features: u32,
    /// Refuse what `features` does not offer, as `KVM_CAP_ENFORCE_PV_FEATURE_CPUID` does.
    pub enforce: bool,
}

impl Default for PvCpuid {
    fn default() -> Self {
        Self { features: PV_FEATURES, enforce: false }
    }
}

impl PvCpuid {
    /// KVM's `guest_pv_has`: whether the guest may use feature `bit`.
    pub fn has(&self, bit: u32) -> bool {
        !self.enforce || self.features & (1 << bit) != 0
    }

    /// EAX, EBX, ECX, EDX of the KVM leaves, or `None` for any other leaf.
    pub fn leaf(&self, leaf: u32) -> Option<[u32; 4]> {
        match leaf {
            KVM_CPUID_SIGNATURE => {
                let [b, c, d] = KVM_SIGNATURE;
                Some([KVM_CPUID_FEATURES, b, c, d])
            }
            KVM_CPUID_FEATURES => Some([self.features, 0, 0, 0]),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_and_features() {
        let pv = PvCpuid::default();
        let sig = pv.leaf(0x4000_0000).unwrap();
        let text: Vec<u8> = sig[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&text, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig[0], 0x4000_0001, "max leaf");
        assert_eq!(pv.leaf(0x4000_0001).unwrap()[0], 0x2080);
        assert_eq!(pv.leaf(0x4000_0002), None);
        assert!(pv.has(11), "without enforcement every feature may be used");
        let enforced = PvCpuid { features: 1 << 7, enforce: true };
        assert!(enforced.has(7) && !enforced.has(11) && !enforced.has(13));
        assert_eq!(enforced.leaf(0x4000_0001).unwrap()[0], 0x80);
    }
}
