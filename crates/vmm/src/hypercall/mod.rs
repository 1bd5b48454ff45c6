//! Hypercalls above the backends: KVM-exact emulation, the run-time table of custom handlers,
//! the built-in handler kinds and batches. Backends only deliver a [`HypercallExit`].

mod batch;
pub mod call;
pub mod emulate;
pub mod handlers;
pub mod insn;
mod list;
pub mod platform;
pub mod sites;
mod standard;
pub mod table;
#[cfg(feature = "wasm")]
pub mod wasm;

pub use call::{neg, Call, HypercallError, HypercallHandler, HypercallResult};
pub use emulate::{emulate, emulate_with, AnsweredBy, Emulated, HypercallExit};
pub use insn::{ForeignInsn, HypercallInsn, InsnAction};
pub use platform::{DetachedPlatform, Platform};
pub use sites::SiteTable;
pub use table::{Entry, HypercallTable, Listed, TableError, TableSnapshot};
