//! The software CPU's fast hypercall path: a site that has trapped as a hypercall at CPL 0 is
//! rewritten into `out PORT_DOORBELL, al; nop` (3 bytes, like the KVM backend's `--trap
//! rewrite`), and from then on answered from unicorn's OUT hook, which runs inside the
//! translated block: no exception, no unwinding out of the block, no RIP write (the `nop` ends
//! the instruction stream where the hypercall did). See docs/emu-backend.md.
//!
//! The exactness rules are the KVM rewrite's:
//! - only bytes that executed as a hypercall at CPL 0 are rewritten (`on_invalid` decides);
//! - a doorbell is recognised by its address: the `out`'s RIP, translated through the guest's
//!   own page tables, must be a rewritten site whose bytes are still the doorbell. The guest's
//!   own `out` to the port from anywhere else is an ordinary port write;
//! - a site the guest has overwritten is forgotten (and its `out`, should it write one there
//!   itself later, is a port write);
//! - the call is answered exactly as a trapped one: the CPL and mode of the code running now
//!   (CPL 3 gets -KVM_EPERM; outside long mode the number and arguments are truncated).
//!
//! Sites are kept per VM, by guest-physical address, in a [`SiteTable`] shared by the vCPUs (the
//! library's, which the KVM backend uses too);
//! each vCPU keeps a copy of the entries it has used ([`LocalSites`]) so the hot path takes no
//! lock, and drops it whenever any vCPU has forgotten a site (a generation counter).

use std::collections::HashMap;

pub(crate) use vmcall_vmm::hypercall::sites::{SiteTable, DOORBELL_SITE};
use vmcall_vmm::hypercall::HypercallInsn;

use crate::ram::RamView;

/// One vCPU's copy of the sites it has answered.
#[derive(Debug, Default)]
pub(crate) struct LocalSites {
    sites: HashMap<u64, HypercallInsn>,
    /// The site answered last: a loop calls the same one again.
    last: Option<(u64, HypercallInsn)>,
    generation: u64,
}

impl LocalSites {
    /// The instruction rewritten at `gpa`, if `gpa` is a rewritten site whose bytes are still
    /// the doorbell. A site whose bytes have changed is forgotten, here and in `table`.
    pub(crate) fn lookup(
        &mut self,
        table: &SiteTable,
        ram: &RamView,
        gpa: u64,
    ) -> Option<HypercallInsn> {
        let generation = table.generation();
        if generation != self.generation {
            self.sites.clear();
            self.last = None;
            self.generation = generation;
        }
        let insn = match self.last {
            Some((at, insn)) if at == gpa => insn,
            _ => {
                let insn = match self.sites.get(&gpa) {
                    Some(insn) => *insn,
                    None => {
                        let insn = table.get(gpa)?;
                        self.sites.insert(gpa, insn);
                        insn
                    }
                };
                self.last = Some((gpa, insn));
                insn
            }
        };
        if ram.read::<3>(gpa) == Some(DOORBELL_SITE) {
            return Some(insn);
        }
        self.sites.remove(&gpa);
        self.last = None;
        table.forget(gpa);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vmcall_vmm::memory::GuestRam;

    #[test]
    fn a_vcpus_copy_answers_only_live_sites_and_forgets_overwritten_ones() {
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        let view = RamView::new(ram.clone());
        let t = SiteTable::default();
        let mut local = LocalSites::default();
        ram.write(0x1000, &[0x0f, 0x01, 0xc1]).unwrap();
        ram.write(0x2000, &[0xb8, 0x0f, 0x01]).unwrap();
        assert_eq!(t.rewrite(&ram, 0x2000, HypercallInsn::Vmcall, true), Ok(false));
        assert_eq!(t.rewrite(&ram, 0x1000, HypercallInsn::Vmcall, true), Ok(true));
        assert_eq!(local.lookup(&t, &view, 0x1000), Some(HypercallInsn::Vmcall));
        assert_eq!(local.lookup(&t, &view, 0x2000), None);
        // The guest's own doorbell bytes elsewhere are no site.
        ram.write(0x3000, &DOORBELL_SITE).unwrap();
        assert_eq!(local.lookup(&t, &view, 0x3000), None);
        assert_eq!(t.lookup(&ram, 0x1000), Some(HypercallInsn::Vmcall));
        ram.write(0x1002, &[0xc3]).unwrap(); // the guest wrote new code over the site
        assert_eq!(local.lookup(&t, &view, 0x1000), None);
        assert_eq!(t.len(), 0, "forgotten in the shared table too");
        // ... and writing the doorbell bytes back itself does not make it a site again.
        ram.write(0x1000, &DOORBELL_SITE).unwrap();
        assert_eq!(local.lookup(&t, &view, 0x1000), None);
        assert_eq!(t.lookup(&ram, 0x1000), None);
    }

    #[test]
    fn a_site_forgotten_by_one_vcpu_is_forgotten_by_all() {
        let ram = Arc::new(GuestRam::new(2 << 20).unwrap());
        let view = RamView::new(ram.clone());
        let t = SiteTable::default();
        let (mut a, mut b) = (LocalSites::default(), LocalSites::default());
        ram.write(0x1000, &[0x0f, 0x01, 0xd9]).unwrap();
        assert_eq!(t.rewrite(&ram, 0x1000, HypercallInsn::Vmmcall, false), Ok(true));
        assert_eq!(a.lookup(&t, &view, 0x1000), Some(HypercallInsn::Vmmcall));
        assert_eq!(b.lookup(&t, &view, 0x1000), Some(HypercallInsn::Vmmcall));
        ram.write(0x1000, &[0x90, 0x90, 0x90]).unwrap();
        assert_eq!(a.lookup(&t, &view, 0x1000), None);
        ram.write(0x1000, &DOORBELL_SITE).unwrap();
        assert_eq!(b.lookup(&t, &view, 0x1000), None, "b's copy went with the generation");
    }
}
