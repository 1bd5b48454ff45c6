//! The VM's rewritten hypercall sites, keyed by guest-physical address, shared by its vCPUs.
//!
//! A site is rewritten only once it is *known* to hold a hypercall instruction: the static
//! decode proved it (`rewrite::prove_sites`), or it has just trapped as one (the way KVM's own
//! FIX_HYPERCALL_INSN quirk patches on first execution). Sites are keyed by the physical
//! address of their bytes, so a doorbell is recognised whatever virtual address the guest
//! runs the code at, and looked up by translating the doorbell's RIP through the guest's
//! own page tables.

use std::collections::HashMap;
use std::sync::RwLock;

use vmcall_vmm::hypercall::HypercallInsn;
use vmcall_vmm::memory::{GuestRam, OutOfBounds};

use crate::rewrite::DOORBELL_SITE;

/// Sites rewritten to `out PORT_DOORBELL, al; nop`.
#[derive(Debug, Default)]
pub(crate) struct SiteTable {
    sites: RwLock<HashMap<u64, HypercallInsn>>,
}

impl SiteTable {
    pub(crate) fn len(&self) -> usize {
        self.sites.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The instruction that was rewritten at `gpa`, if `gpa` is a rewritten site whose bytes are
    /// still the doorbell. A site the guest has since overwritten is forgotten: an `out` to
    /// the doorbell port from anywhere else is the guest's own port write.
    pub(crate) fn lookup(&self, ram: &GuestRam, gpa: u64) -> Option<HypercallInsn> {
        let insn = *self.sites.read().unwrap_or_else(|p| p.into_inner()).get(&gpa)?;
        let mut bytes = [0u8; 3];
        if ram.read(gpa, &mut bytes).is_ok() && bytes == DOORBELL_SITE {
            return Some(insn);
        }
        self.sites.write().unwrap_or_else(|p| p.into_inner()).remove(&gpa);
        None
    }

    /// Rewrite the hypercall instruction at `gpa` into the doorbell. With more than one vCPU
    /// the three bytes are replaced in one store, so a vCPU running the site meanwhile executes
    /// either the hypercall or the doorbell (both answered the same), never a torn instruction;
    /// a site whose bytes straddle an 8-byte word then stays unrewritten and keeps trapping.
    /// Returns whether the site is now rewritten.
    pub(crate) fn rewrite(
        &self,
        ram: &GuestRam,
        gpa: u64,
        insn: HypercallInsn,
        single_vcpu: bool,
    ) -> Result<bool, OutOfBounds> {
        let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
        if sites.contains_key(&gpa) {
            return Ok(true);
        }
        let mut bytes = [0u8; 3];
        ram.read(gpa, &mut bytes)?;
        if !vmcall_abi::insn::is_hypercall(&bytes) {
            return Ok(false);
        }
        let done = if single_vcpu {
            ram.write(gpa, &DOORBELL_SITE)?;
            true
        } else {
            ram.write_in_one_store(gpa, &DOORBELL_SITE)?
        };
        if done {
            sites.insert(gpa, insn);
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_only_hypercalls_and_forget_overwritten_sites() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let t = SiteTable::default();
        ram.write(0x1000, &[0x0f, 0x01, 0xc1]).unwrap();
        ram.write(0x2000, &[0xb8, 0x0f, 0x01]).unwrap();
        assert_eq!(t.rewrite(&ram, 0x2000, HypercallInsn::Vmcall, true), Ok(false));
        assert_eq!(t.rewrite(&ram, 0x1000, HypercallInsn::Vmcall, true), Ok(true));
        assert_eq!(t.lookup(&ram, 0x1000), Some(HypercallInsn::Vmcall));
        assert_eq!(t.lookup(&ram, 0x2000), None);
        ram.write(0x1002, &[0xc3]).unwrap(); // the guest wrote new code over the site
        assert_eq!(t.lookup(&ram, 0x1000), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn with_several_vcpus_sites_are_rewritten_in_one_store_or_not_at_all() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let t = SiteTable::default();
        ram.write(0x1006, &[0x0f, 0x01, 0xd9]).unwrap(); // straddles 0x1008
        assert_eq!(t.rewrite(&ram, 0x1006, HypercallInsn::Vmmcall, false), Ok(false));
        let mut b = [0u8; 3];
        ram.read(0x1006, &mut b).unwrap();
        assert_eq!(b, [0x0f, 0x01, 0xd9], "left as it was");
        ram.write(0x1011, &[0x0f, 0x01, 0xd9]).unwrap();
        assert_eq!(t.rewrite(&ram, 0x1011, HypercallInsn::Vmmcall, false), Ok(true));
        ram.read(0x1011, &mut b).unwrap();
        assert_eq!(b, DOORBELL_SITE);
    }
}
