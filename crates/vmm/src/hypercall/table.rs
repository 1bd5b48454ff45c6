//! The per-VM table of custom hypercall handlers, changeable while vCPUs run.
//!
//! Readers (vCPU threads) take a lock-free snapshot (`arc-swap`) once per call and use only it,
//! so each call is answered exactly once, by the handler that was current when the call loaded
//! the snapshot: a concurrent replace or remove never loses or repeats a call. Writers are rare
//! and serialise on a mutex, copy the map, change the copy and publish it; a handler that was
//! replaced stays alive until the last call that loaded it returns (its `Arc`).
//!
//! Each number has a live call counter ([`Entry::calls`]): an atomic that every call a custom
//! handler answers increments, kept across replacements (and a remove and re-register), so that
//! "calls so far" can be read from any thread while the VM runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use vmcall_abi::hc;

#[cfg(test)]
use super::call::Call;
use super::call::HypercallHandler;

/// One registered handler.
#[derive(Clone)]
pub struct Entry {
    /// The handler.
    pub handler: Arc<dyn HypercallHandler>,
    /// Shown in stats and traces.
    pub name: Arc<str>,
    /// Registered with [`HypercallTable::override_standard`]: it replaces KVM's behaviour for
    /// its number entirely, `KVM_HC_MAP_GPA_RANGE`'s argument checks included (a plain
    /// [`HypercallTable::register`] of 12 keeps them, as KVM's user-space exit does).
    pub overrides_standard: bool,
    /// Calls answered by the custom handlers of this number so far (batch entries included),
    /// shared by every handler the number has had.
    pub calls: Arc<AtomicU64>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("kind", &self.handler.kind())
            .field("overrides_standard", &self.overrides_standard)
            .field("calls", &self.calls.load(Ordering::Relaxed))
            .finish()
    }
}

/// One row of [`HypercallTable::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The hypercall number.
    pub nr: u64,
    /// The handler's name.
    pub name: String,
    /// [`HypercallHandler::kind`] of the handler: `const`, `exec`, `native`...
    pub kind: String,
    /// Whether it replaces a standard KVM hypercall (an override).
    pub overrides_standard: bool,
    /// Calls answered by this number's custom handlers so far.
    pub calls: u64,
}

/// Why a table change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The number already has a handler.
    #[error("hypercall {nr} already has a handler ({name}); replace it explicitly")]
    Taken {
        /// The hypercall number.
        nr: u64,
        /// The name of its handler (`Taken`) or Linux's name for it (`Standard`).
        name: String,
    },
    /// The number is a standard KVM hypercall (an override must be explicit).
    #[error("hypercall {nr} is {name}, a standard KVM hypercall; overriding it must be explicit")]
    Standard {
        /// The hypercall number.
        nr: u64,
        /// The name of its handler (`Taken`) or Linux's name for it (`Standard`).
        name: &'static str,
    },
    /// The number has no custom handler.
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
    /// The entry of `nr`, if it has a handler.
    pub fn get(&self, nr: u64) -> Option<&Entry> {
        self.0.get(&nr)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.0.iter().map(|(nr, e)| (*nr, e))
    }

    /// Number of handlers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no handlers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One snapshot of the table, borrowed for the duration of a call (see
/// [`HypercallTable::with_snapshot`]): a batch looks its entries up in the snapshot its own
/// call was looked up in.
#[derive(Clone, Copy)]
pub(crate) struct SnapshotRef<'a>(&'a Snapshot);

impl<'a> SnapshotRef<'a> {
    /// The entry of `nr`, if it has a handler.
    pub(crate) fn get(self, nr: u64) -> Option<&'a Entry> {
        self.0.get(&nr)
    }

    /// Every entry, in no particular order.
    pub(crate) fn iter(self) -> impl Iterator<Item = (u64, &'a Entry)> {
        self.0.iter().map(|(nr, e)| (*nr, e))
    }

    /// Number of handlers.
    pub(crate) fn len(self) -> usize {
        self.0.len()
    }
}

/// The live call counter of every number that ever had a handler, kept by the writers.
type Counters = HashMap<u64, Arc<AtomicU64>>;

/// The table. Cheap to share: wrap it in an `Arc` and keep a clone to change it at run time.
///
/// ```
/// use vmcall_vmm::hypercall::{Call, HypercallTable, TableError};
///
/// let table = HypercallTable::new();
/// table.register(20, "double", |c: &Call<'_>| Ok(c.args[0] * 2))?;
/// // A standard KVM number needs an explicit override.
/// assert!(matches!(table.register(1, "x", |_: &Call<'_>| Ok(0)), Err(TableError::Standard { .. })));
/// assert_eq!(table.numbers(), [20]);
/// table.unregister(20);
/// assert!(table.numbers().is_empty());
/// # Ok::<(), TableError>(())
/// ```
#[derive(Default)]
pub struct HypercallTable {
    current: ArcSwap<Snapshot>,
    /// Serialises writers; holds the per-number call counters.
    writer: Mutex<Counters>,
}

impl std::fmt::Debug for HypercallTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.current.load().iter()).finish()
    }
}

impl HypercallTable {
    /// An empty table: every number gets KVM's behaviour.
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

    /// Run `f` on the current snapshot, borrowed (no reference count taken): the vCPU hot path.
    pub(crate) fn with_snapshot<R>(&self, f: impl FnOnce(SnapshotRef<'_>) -> R) -> R {
        let snap = self.current.load();
        f(SnapshotRef(&snap))
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

    /// Every registered number with its handler's name and kind and its live call count,
    /// sorted by number.
    pub fn list(&self) -> Vec<Listed> {
        let snap = self.current.load();
        let mut v: Vec<Listed> = snap
            .iter()
            .map(|(nr, e)| Listed {
                nr: *nr,
                name: e.name.to_string(),
                kind: e.handler.kind().to_string(),
                overrides_standard: e.overrides_standard,
                calls: e.calls.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_unstable_by_key(|l| l.nr);
        v
    }

    /// Calls answered by the custom handlers `nr` has had so far (0 if it never had one).
    pub fn calls(&self, nr: u64) -> u64 {
        let counters = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        counters.get(&nr).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Add a handler for a free, non-standard number.
    pub fn register(
        &self,
        nr: u64,
        name: &str,
        handler: impl HypercallHandler,
    ) -> Result<(), TableError> {
        self.register_shared(nr, name, Arc::new(handler))
    }

    /// [`HypercallTable::register`] for a handler already behind an `Arc`.
    pub fn register_shared(
        &self,
        nr: u64,
        name: &str,
        handler: Arc<dyn HypercallHandler>,
    ) -> Result<(), TableError> {
        self.update(|map, counters| {
            if let Some(e) = map.get(&nr) {
                return Err(TableError::Taken { nr, name: e.name.to_string() });
            }
            if is_standard(nr) {
                return Err(TableError::Standard { nr, name: hc::name(nr).unwrap_or("?") });
            }
            map.insert(nr, entry(counters, nr, name, handler, false));
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
        self.update(|map, counters| {
            let old = map.get(&nr).ok_or(TableError::NotRegistered(nr))?;
            let overrides = old.overrides_standard;
            let new = entry(counters, nr, name, Arc::new(handler), overrides);
            Ok(map.insert(nr, new).expect("checked above"))
        })
    }

    /// Register a handler for `nr`, or replace the one it has, in one step; returns the
    /// replaced entry. A standard number is refused unless it is already overridden (then its
    /// handler is replaced and it stays overridden).
    pub fn set(
        &self,
        nr: u64,
        name: &str,
        handler: Arc<dyn HypercallHandler>,
    ) -> Result<Option<Entry>, TableError> {
        self.update(|map, counters| {
            let overrides = match map.get(&nr) {
                Some(old) => old.overrides_standard,
                None if is_standard(nr) => {
                    return Err(TableError::Standard { nr, name: hc::name(nr).unwrap_or("?") })
                }
                None => false,
            };
            Ok(map.insert(nr, entry(counters, nr, name, handler, overrides)))
        })
    }

    /// Install a handler for any number, standard ones included, replacing whatever was there.
    pub fn override_standard(
        &self,
        nr: u64,
        name: &str,
        handler: impl HypercallHandler,
    ) -> Option<Entry> {
        self.override_shared(nr, name, Arc::new(handler))
    }

    /// [`HypercallTable::override_standard`] for a handler already behind an `Arc`.
    pub fn override_shared(
        &self,
        nr: u64,
        name: &str,
        handler: Arc<dyn HypercallHandler>,
    ) -> Option<Entry> {
        self.update(|map, counters| {
            Ok::<_, TableError>(map.insert(nr, entry(counters, nr, name, handler, true)))
        })
        .expect("infallible")
    }

    /// Remove the handler of `nr` (a standard number gets KVM's behaviour back).
    pub fn unregister(&self, nr: u64) -> Option<Entry> {
        self.update(|map, _| Ok::<_, TableError>(map.remove(&nr))).expect("infallible")
    }

    fn update<R, E>(
        &self,
        f: impl FnOnce(&mut Snapshot, &mut Counters) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut counters = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Snapshot::clone(&self.current.load());
        let r = f(&mut next, &mut counters)?;
        self.current.store(Arc::new(next));
        Ok(r)
    }
}

fn entry(
    counters: &mut Counters,
    nr: u64,
    name: &str,
    handler: Arc<dyn HypercallHandler>,
    overrides_standard: bool,
) -> Entry {
    let calls = counters.entry(nr).or_default().clone();
    Entry { handler, name: name.into(), overrides_standard, calls }
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

    #[test]
    fn set_registers_or_replaces_and_counters_survive() {
        let t = HypercallTable::new();
        assert!(t.set(20, "a", Arc::new(konst(1))).unwrap().is_none());
        t.get(20).unwrap().calls.fetch_add(5, Ordering::Relaxed);
        assert_eq!(&*t.set(20, "b", Arc::new(konst(2))).unwrap().unwrap().name, "a");
        assert_eq!(t.list()[0].calls, 5, "the count is the number's, not the handler's");
        assert!(matches!(t.set(5, "k", Arc::new(konst(0))), Err(TableError::Standard { .. })));
        t.override_standard(5, "k", konst(0));
        assert!(t.set(5, "k2", Arc::new(konst(0))).is_ok(), "an overridden number may be set");
        assert!(t.get(5).unwrap().overrides_standard);
        t.unregister(20);
        assert_eq!(t.calls(20), 5);
        t.register(20, "c", konst(3)).unwrap();
        let l = t.list();
        assert_eq!(
            (l[1].nr, l[1].name.as_str(), l[1].kind.as_str(), l[1].calls),
            (20, "c", "native", 5)
        );
    }
}
