//! The per-VM table of custom hypercall handlers, changeable while vCPUs run.
//!
//! Readers (vCPU threads) take a lock-free snapshot (`arc-swap`) once per call and use only it,
//! so each call is answered exactly once, by the handler that was current when the call loaded
//! the snapshot: a concurrent replace or remove never loses or repeats a call. Writers are rare
//! and serialise on a mutex, copy the map, change the copy and publish it; a handler that was
//! replaced stays alive until the last call that loaded it returns (its `Arc`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use vmcall_abi::hc;

#[cfg(test)]
use super::call::Call;
use super::call::HypercallHandler;

/// One registered handler.
#[derive(Clone)]
pub struct Entry {
    pub handler: Arc<dyn HypercallHandler>,
    /// Shown in stats and traces.
    pub name: Arc<str>,
    /// Registered with [`HypercallTable::override_standard`]: it replaces KVM's behaviour for
    /// its number entirely, `KVM_HC_MAP_GPA_RANGE`'s argument checks included (a plain
    /// [`HypercallTable::register`] of 12 keeps them, as KVM's user-space exit does).
    pub overrides_standard: bool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("overrides_standard", &self.overrides_standard)
            .finish()
    }
}

/// Why a table change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("hypercall {nr} already has a handler ({name}); replace it explicitly")]
    Taken { nr: u64, name: String },
    #[error("hypercall {nr} is {name}, a standard KVM hypercall; overriding it must be explicit")]
    Standard { nr: u64, name: &'static str },
    #[error("hypercall {0} has no custom handler to replace")]
    NotRegistered(u64),
}

/// Whether `nr` has KVM-defined behaviour that a custom handler would shadow.
/// `KVM_HC_MAP_GPA_RANGE` is not: registering a handler for it is how user space opts in.
pub fn is_standard(nr: u64) -> bool {
    hc::name(nr).is_some() && nr != hc::KVM_HC_MAP_GPA_RANGE
}

/// Hypercall numbers are small, caller-chosen integers; a multiplicative hash is plenty and
/// costs a fraction of SipHash on the per-call lookup. (The table is not exposed to untrusted
/// key floods: only the host adds keys.)
#[derive(Default, Clone, Copy)]
pub(crate) struct NrHasher(u64);

impl std::hash::Hasher for NrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Snapshot = HashMap<u64, Entry, std::hash::BuildHasherDefault<NrHasher>>;

/// One version of the table, unaffected by later changes.
#[derive(Clone)]
pub struct TableSnapshot(Arc<Snapshot>);

impl std::fmt::Debug for TableSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl TableSnapshot {
    pub fn get(&self, nr: u64) -> Option<&Entry> {
        self.0.get(&nr)
    }
}

/// The table. Cheap to share: wrap it in an `Arc` and keep a clone to change it at run time.
#[derive(Default)]
pub struct HypercallTable {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
}

impl std::fmt::Debug for HypercallTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.current.load().iter()).finish()
    }
}

impl HypercallTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The handler current for `nr`, if any (lock-free).
    pub fn get(&self, nr: u64) -> Option<Entry> {
        self.current.load().get(&nr).cloned()
    }

    /// Run `f` on the current entry for `nr` without cloning it (the vCPU hot path).
    pub fn with<R>(&self, nr: u64, f: impl FnOnce(Option<&Entry>) -> R) -> R {
        let snap = self.current.load();
        f(snap.get(&nr))
    }

    /// The current snapshot, for looking up many numbers at once (a batch): every lookup in
    /// it sees the same table.
    pub fn snapshot(&self) -> TableSnapshot {
        TableSnapshot(self.current.load_full())
    }

    /// Numbers that have a handler, sorted.
    pub fn numbers(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.current.load().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Add a handler for a free, non-standard number.
    pub fn register(
        &self,
        nr: u64,
        name: &str,
        handler: impl HypercallHandler,
    ) -> Result<(), TableError> {
        self.update(|map| {
            if let Some(e) = map.get(&nr) {
                return Err(TableError::Taken { nr, name: e.name.to_string() });
            }
            if is_standard(nr) {
                return Err(TableError::Standard { nr, name: hc::name(nr).unwrap_or("?") });
            }
            map.insert(nr, entry(name, handler, false));
            Ok(())
        })
    }

    /// Swap the handler of a registered number; returns the old one.
    pub fn replace(
        &self,
        nr: u64,
        name: &str,
        handler: impl HypercallHandler,
    ) -> Result<Entry, TableError> {
        self.update(|map| {
            let old = map.get(&nr).ok_or(TableError::NotRegistered(nr))?;
            let overrides = old.overrides_standard;
            Ok(map.insert(nr, entry(name, handler, overrides)).expect("checked above"))
        })
    }

    /// Install a handler for any number, standard ones included, replacing whatever was there.
    pub fn override_standard(
        &self,
        nr: u64,
        name: &str,
        handler: impl HypercallHandler,
    ) -> Option<Entry> {
        self.update(|map| Ok::<_, TableError>(map.insert(nr, entry(name, handler, true))))
            .expect("infallible")
    }

    /// Remove the handler of `nr` (a standard number gets KVM's behaviour back).
    pub fn unregister(&self, nr: u64) -> Option<Entry> {
        self.update(|map| Ok::<_, TableError>(map.remove(&nr))).expect("infallible")
    }

    fn update<R, E>(&self, f: impl FnOnce(&mut Snapshot) -> Result<R, E>) -> Result<R, E> {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Snapshot::clone(&self.current.load());
        let r = f(&mut next)?;
        self.current.store(Arc::new(next));
        Ok(r)
    }
}

fn entry(name: &str, handler: impl HypercallHandler, overrides_standard: bool) -> Entry {
    Entry { handler: Arc::new(handler), name: name.into(), overrides_standard }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn konst(v: u64) -> impl HypercallHandler {
        move |_: &Call<'_>| Ok(v)
    }

    #[test]
    fn registration_rules() {
        let t = HypercallTable::new();
        t.register(20, "a", konst(1)).unwrap();
        assert_eq!(
            t.register(20, "b", konst(2)).unwrap_err(),
            TableError::Taken { nr: 20, name: "a".into() }
        );
        assert!(matches!(t.register(1, "x", konst(2)), Err(TableError::Standard { nr: 1, .. })));
        assert!(t.register(hc::KVM_HC_MAP_GPA_RANGE, "map", konst(0)).is_ok());
        assert_eq!(t.replace(21, "c", konst(3)).unwrap_err(), TableError::NotRegistered(21));
        assert_eq!(&*t.replace(20, "c", konst(3)).unwrap().name, "a");
        assert_eq!(&*t.get(20).unwrap().name, "c");
        assert!(t.override_standard(1, "poll", konst(7)).is_none());
        assert!(t.get(1).unwrap().overrides_standard);
        assert!(!t.get(12).unwrap().overrides_standard, "registered, not overridden");
        t.override_standard(12, "map", konst(0));
        assert!(t.get(12).unwrap().overrides_standard, "--override 12 skips KVM's checks");
        assert_eq!(t.numbers(), vec![1, 12, 20]);
        assert!(t.unregister(20).is_some());
        assert!(t.unregister(20).is_none());
        assert!(t.get(20).is_none());
    }
}
