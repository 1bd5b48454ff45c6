//! The services of the running VM that standard hypercalls need, as a trait, so that emulation
//! runs the same against a real VM, a test mock or nothing at all.

/// Services of the running VM that standard hypercalls need.
pub trait Platform {
    /// Number of vCPUs (APIC ids are 0..count).
    fn vcpu_count(&self) -> u32;
    /// Wake the vCPU with `apic_id` from a PV halt, or make its next HLT return at once.
    fn kick_cpu(&self, apic_id: u64);
    /// Give up the CPU in favour of `apic_id`'s vCPU.
    fn yield_to(&self, apic_id: u64);
    /// The calling vCPU's current TSC value.
    fn guest_tsc(&self) -> u64;
    /// KVM's `guest_pv_has`: whether the guest may use PV feature `bit` (with PV CPUID
    /// enforcement off, every feature).
    fn pv_has(&self, _bit: u32) -> bool {
        true
    }
}

/// A [`Platform`] with no VM behind it: `vcpus` vCPUs that kicks and yields do not reach,
/// and a TSC that reads 0. For driving [`emulate`](fn@super::emulate) in tests, benchmarks and fuzzing.
#[derive(Debug, Clone, Copy)]
pub struct DetachedPlatform {
    pub vcpus: u32,
}

impl Platform for DetachedPlatform {
    fn vcpu_count(&self) -> u32 {
        self.vcpus
    }
    fn kick_cpu(&self, _: u64) {}
    fn yield_to(&self, _: u64) {}
    fn guest_tsc(&self) -> u64 {
        0
    }
}
