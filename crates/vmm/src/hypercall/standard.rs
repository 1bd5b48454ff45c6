//! KVM's own behaviour for the standard `KVM_HC_*` numbers (docs/hypercalls.md, step 7).

use vmcall_abi::cpuid::{
    KVM_FEATURE_PV_SCHED_YIELD, KVM_FEATURE_PV_SEND_IPI, KVM_FEATURE_PV_UNHALT,
};
use vmcall_abi::errno::{KVM_EINVAL, KVM_ENOSYS, KVM_EOPNOTSUPP};
use vmcall_abi::hc::*;
use vmcall_abi::{KvmClockPairing, KVM_CLOCK_PAIRING_WALLCLOCK};

use super::call::neg;
use super::call::Call;
use super::platform::Platform;
use crate::memory::GuestRam;

/// KVM's behaviour for numbers without a custom handler.
pub(super) fn standard(call: &Call<'_>, platform: &dyn Platform, op_64_bit: bool) -> u64 {
    let [a0, a1, a2, a3] = call.args;
    match call.nr {
        KVM_HC_VAPIC_POLL_IRQ => 0,
        // Gated on the guest's PV CPUID when enforcement is on (KVM's `guest_pv_has`).
        KVM_HC_KICK_CPU if !platform.pv_has(KVM_FEATURE_PV_UNHALT) => neg(KVM_ENOSYS),
        KVM_HC_SEND_IPI if !platform.pv_has(KVM_FEATURE_PV_SEND_IPI) => neg(KVM_ENOSYS),
        KVM_HC_SCHED_YIELD if !platform.pv_has(KVM_FEATURE_PV_SCHED_YIELD) => neg(KVM_ENOSYS),
        KVM_HC_KICK_CPU => {
            platform.kick_cpu(a1);
            platform.yield_to(a1);
            0
        }
        KVM_HC_CLOCK_PAIRING => clock_pairing(call.mem, a0, a1, platform),
        KVM_HC_SEND_IPI => send_ipi(platform, a0, a1, a2, a3, op_64_bit),
        KVM_HC_SCHED_YIELD => {
            platform.yield_to(a0);
            0
        }
        // MAP_GPA_RANGE only reaches here with no user-space handler: KVM answers -ENOSYS.
        _ => neg(KVM_ENOSYS),
    }
}

/// `KVM_HC_MAP_GPA_RANGE`'s checks: page-aligned GPA, non-zero page count, no overflow.
pub(super) fn check_map_gpa_range([gpa, npages, _attrs, _]: [u64; 4]) -> Result<(), u64> {
    let gfn = gpa >> 12;
    if gpa & 0xfff != 0 || npages == 0 || gfn.checked_add(npages).is_none_or(|end| end <= gfn) {
        return Err(neg(KVM_EINVAL));
    }
    Ok(())
}

/// `KVM_HC_CLOCK_PAIRING`: host wall-clock time and the matching guest TSC at `gpa`.
fn clock_pairing(mem: &GuestRam, gpa: u64, clock_type: u64, platform: &dyn Platform) -> u64 {
    if clock_type != KVM_CLOCK_PAIRING_WALLCLOCK {
        return neg(KVM_EOPNOTSUPP);
    }
    let tsc = platform.guest_tsc();
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let cp = KvmClockPairing {
        sec: now.as_secs() as i64,
        nsec: i64::from(now.subsec_nanos()),
        tsc,
        ..Default::default()
    };
    let mut bytes = [0u8; 64];
    bytes[0..8].copy_from_slice(&cp.sec.to_le_bytes());
    bytes[8..16].copy_from_slice(&cp.nsec.to_le_bytes());
    bytes[16..24].copy_from_slice(&cp.tsc.to_le_bytes());
    match mem.write(gpa, &bytes) {
        Ok(()) => 0,
        Err(_) => neg(vmcall_abi::errno::KVM_EFAULT),
    }
}

/// `KVM_HC_SEND_IPI` (`kvm_pv_send_ipi`): validates the ICR and counts the existing
/// destination vCPUs. vmcall has no interrupt controller yet, so the IPI itself is not
/// delivered (see docs/hypercalls.md).
fn send_ipi(
    platform: &dyn Platform,
    low: u64,
    high: u64,
    min: u64,
    icr: u64,
    op_64_bit: bool,
) -> u64 {
    const APIC_DEST_MASK: u64 = 0x800;
    const APIC_SHORT_MASK: u64 = 0xc0000;
    if icr & (APIC_DEST_MASK | APIC_SHORT_MASK) != 0 {
        return neg(KVM_EINVAL);
    }
    let width = if op_64_bit { 64 } else { 32 };
    let min = u64::from(min as u32); // `u32 min` in the kernel
    let count = platform.vcpu_count() as u64;
    let mut delivered = 0u64;
    for (half, bits) in [(0u64, low), (width, high)] {
        for bit in 0..width {
            if bits >> bit & 1 == 1 {
                if let Some(apic) = min.checked_add(half + bit) {
                    delivered += u64::from(apic < count);
                }
            }
        }
    }
    delivered
}
