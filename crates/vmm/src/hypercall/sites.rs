//! A VM's rewritten hypercall sites, keyed by guest-physical address and shared by its vCPUs:
//! the table both backends' fast paths use.
//!
//! A site is a `VMCALL`/`VMMCALL` whose three bytes were replaced by the doorbell
//! [`DOORBELL_SITE`] (`out PORT_DOORBELL, al; nop`). A backend rewrites a site only once it
//! *knows* the bytes are a hypercall instruction (a static decode proved it, or it has just
//! trapped as one, the way KVM's own FIX_HYPERCALL_INSN quirk patches on first execution), and
//! answers a doorbell only from an address in this table whose bytes are still the doorbell: the
//! guest's own `out` to the port from anywhere else is an ordinary port write. Keying by physical
//! address recognises a doorbell whatever virtual address the guest runs the code at.
//!
//! A site the guest has overwritten is forgotten, and [`SiteTable::generation`] is bumped so that
//! a vCPU keeping its own copy of entries (to take no lock on the hot path) can drop it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

pub use vmcall_abi::ports::DOORBELL_SITE;

use crate::hypercall::HypercallInsn;
use crate::memory::{GuestRam, OutOfBounds};

/// A VM's sites rewritten to [`DOORBELL_SITE`], by guest-physical address.
#[derive(Debug, Default)]
pub struct SiteTable {
    sites: RwLock<HashMap<u64, HypercallInsn>>,
    /// Bumped whenever a site is forgotten, so that vCPUs drop their copies.
    generation: AtomicU64,
}

impl SiteTable {
    /// Rewrite the hypercall instruction at `gpa` into the doorbell, if its bytes still decode
    /// as `insn`. With more than one vCPU (`single_vcpu` false) the three bytes are replaced in
    /// one store, so a vCPU running the site meanwhile executes either the hypercall or the
    /// doorbell (both answered the same), never a torn instruction; a site whose bytes straddle
    /// an 8-byte word then stays as it is and keeps trapping. A site already in the table counts
    /// only while its bytes are still the doorbell. Returns whether the site is now rewritten.
    pub fn rewrite(
        &self,
        ram: &GuestRam,
        gpa: u64,
        insn: HypercallInsn,
        single_vcpu: bool,
    ) -> Result<bool, OutOfBounds> {
        let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
        let mut bytes = [0u8; 3];
        ram.read(gpa, &mut bytes)?;
        if bytes == DOORBELL_SITE && sites.contains_key(&gpa) {
            return Ok(true);
        }
        if HypercallInsn::decode(&bytes) != Some(insn) {
            return Ok(false);
        }
        let done = if single_vcpu {
            ram.write(gpa, &DOORBELL_SITE)?;
            true
        } else {
            // Only if the bytes are still the ones decoded above: the guest's other vCPUs run.
            ram.replace_in_one_store(gpa, &bytes, &DOORBELL_SITE)?
        };
        if done {
            sites.insert(gpa, insn);
        }
        Ok(done)
    }

    /// The instruction rewritten at `gpa`, if `gpa` is a rewritten site whose bytes are still
    /// the doorbell. A site the guest has since overwritten is forgotten.
    pub fn lookup(&self, ram: &GuestRam, gpa: u64) -> Option<HypercallInsn> {
        let insn = self.get(gpa)?;
        if still_doorbell(ram, gpa) {
            return Some(insn);
        }
        self.forget(gpa);
        None
    }

    /// The instruction rewritten at `gpa`, if `gpa` is in the table, whatever its bytes are now
    /// (for a vCPU's own copy, which checks the bytes itself).
    pub fn get(&self, gpa: u64) -> Option<HypercallInsn> {
        self.sites.read().unwrap_or_else(|p| p.into_inner()).get(&gpa).copied()
    }

    /// Forget the site at `gpa` (its bytes are no longer the doorbell), bumping the
    /// [generation](Self::generation) if it was one.
    pub fn forget(&self, gpa: u64) {
        if self.sites.write().unwrap_or_else(|p| p.into_inner()).remove(&gpa).is_some() {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// How many sites have been forgotten so far: a vCPU's copy of entries taken at another
    /// generation may hold forgotten sites and must be dropped.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How many sites are rewritten.
    pub fn len(&self) -> usize {
        self.sites.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no site is rewritten.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether the bytes at `gpa` are the doorbell.
fn still_doorbell(ram: &GuestRam, gpa: u64) -> bool {
    let mut bytes = [0u8; 3];
    ram.read(gpa, &mut bytes).is_ok() && bytes == DOORBELL_SITE
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
        // Bytes that are the other instruction than the one that trapped: not rewritten.
        assert_eq!(t.rewrite(&ram, 0x1000, HypercallInsn::Vmmcall, true), Ok(false));
        assert_eq!(t.rewrite(&ram, 0x1000, HypercallInsn::Vmcall, true), Ok(true));
        let mut b = [0u8; 3];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(b, DOORBELL_SITE);
        assert_eq!(t.rewrite(&ram, 0x1000, HypercallInsn::Vmcall, true), Ok(true), "already one");
        assert_eq!(t.lookup(&ram, 0x1000), Some(HypercallInsn::Vmcall));
        assert_eq!(t.lookup(&ram, 0x2000), None);
        // The guest's own doorbell bytes elsewhere are no site.
        ram.write(0x3000, &DOORBELL_SITE).unwrap();
        assert_eq!(t.lookup(&ram, 0x3000), None);
        assert_eq!(t.generation(), 0);
        ram.write(0x1002, &[0xc3]).unwrap(); // the guest wrote new code over the site
        assert_eq!(t.get(0x1000), Some(HypercallInsn::Vmcall), "get does not look at the bytes");
        assert_eq!(t.lookup(&ram, 0x1000), None);
        assert_eq!(t.len(), 0);
        assert!(t.is_empty());
        assert_eq!(t.generation(), 1, "forgetting a site starts a new generation");
        // ... and writing the doorbell bytes back itself does not make it a site again.
        ram.write(0x1000, &DOORBELL_SITE).unwrap();
        assert_eq!(t.lookup(&ram, 0x1000), None);
        // Forgetting what is no site leaves the generation alone.
        t.forget(0x1000);
        assert_eq!(t.generation(), 1);
    }

    #[test]
    fn a_forgotten_site_whose_hypercall_is_back_is_rewritten_again() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let t = SiteTable::default();
        ram.write(0x1000, &[0x0f, 0x01, 0xd9]).unwrap();
        assert_eq!(t.rewrite(&ram, 0x1000, HypercallInsn::Vmmcall, true), Ok(true));
        // Overwritten but not yet looked up: the entry is stale, the bytes decide.
        ram.write(0x1000, &[0x90, 0x90, 0x90]).unwrap();
        assert_eq!(t.rewrite(&ram, 0x1000, HypercallInsn::Vmmcall, true), Ok(false));
        ram.write(0x1000, &[0x0f, 0x01, 0xd9]).unwrap();
        assert_eq!(t.rewrite(&ram, 0x1000, HypercallInsn::Vmmcall, true), Ok(true));
        assert_eq!(t.lookup(&ram, 0x1000), Some(HypercallInsn::Vmmcall));
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
        assert_eq!(t.lookup(&ram, 0x1006), None);
        ram.write(0x1011, &[0x0f, 0x01, 0xd9]).unwrap();
        assert_eq!(t.rewrite(&ram, 0x1011, HypercallInsn::Vmmcall, false), Ok(true));
        ram.read(0x1011, &mut b).unwrap();
        assert_eq!(b, DOORBELL_SITE);
        assert_eq!(t.lookup(&ram, 0x1011), Some(HypercallInsn::Vmmcall));
    }
}
