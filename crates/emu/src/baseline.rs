//! A raw unicorn loop for `vmcall bench`: the same engine setup as the backend, but a hook
//! that only answers the trapped instruction — no dispatch, no table, no statistics.

use std::sync::Arc;
use std::time::Instant;

use unicorn_engine::RegisterX86 as R;
use vmcall_abi::{insn, ports};
use vmcall_vmm::backend::BackendError;
use vmcall_vmm::boot::VcpuInit;
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::stats::Latency;

use crate::vcpu::{new_engine, uc_err};

struct Raw {
    last: Option<Instant>,
    lat: Latency,
}

/// Run the guest in `ram` from `init` until it writes the exit port, answering every
/// VMCALL/VMMCALL with -KVM_ENOSYS in the invalid-instruction hook, and record the time between
/// consecutive ones (one round trip each) into `lat`.
pub fn raw_hypercall_round_trips(
    ram: &Arc<GuestRam>,
    init: &VcpuInit,
    lat: &mut Latency,
) -> Result<(), BackendError> {
    let mut uc = new_engine(
        ram,
        init,
        Raw { last: None, lat: Latency::default() },
        vmcall_vmm::x86::cpuid::PV_FEATURES,
        crate::default_tcg_buffer(ram.size()),
    )?;
    uc.add_insn_invalid_hook(|uc| {
        let now = Instant::now();
        let rip = uc.reg_read(R::RIP).unwrap_or(0);
        let _ = uc.reg_write(R::RAX, (-vmcall_abi::errno::KVM_ENOSYS) as u64);
        let _ = uc.reg_write(R::RIP, rip.wrapping_add(insn::HYPERCALL_LEN));
        let raw = uc.get_data_mut();
        if let Some(prev) = raw.last.replace(now) {
            raw.lat.record(now.duration_since(prev).as_nanos() as u64);
        }
        true
    })
    .map_err(uc_err("hook"))?;
    uc.add_insn_out_hook(|uc, port, _, _| {
        if port == u32::from(ports::PORT_EXIT) {
            let _ = uc.emu_stop();
        }
    })
    .map_err(uc_err("hook"))?;
    let start = init.regs.rip;
    uc.emu_start(start, 0, 0, 0).map_err(uc_err("run"))?;
    lat.merge(&uc.get_data().lat);
    Ok(())
}
