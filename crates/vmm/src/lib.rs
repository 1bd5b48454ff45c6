//! vmcall's VMM library: run a guest, trap its hypercalls and answer them exactly as Linux
//! KVM's `kvm_emulate_hypercall` does, with custom handlers that can change while it runs.
//!
//! ```no_run
//! # fn demo(hv: &dyn vmcall_vmm::backend::Hypervisor) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use vmcall_vmm::{hypercall::{Call, HypercallTable}, vm::VmBuilder};
//!
//! let table = Arc::new(HypercallTable::new());
//! table.register(20, "double", |c: &Call<'_>| Ok(c.args[0] * 2))?;
//! let vm = VmBuilder::new(std::fs::read("guest.elf")?).table(table.clone()).build(hv)?;
//! let report = vm.run();
//! println!("{:?}\n{}", report.result, report.stats.table(Some(&table)));
//! # Ok(()) }
//! ```
//!
//! Layout: [`x86`] (architecture), [`memory`] (the one gate to guest RAM), [`boot`] (ELF and
//! boot state), [`devices`] (port I/O), [`hypercall`] (emulation, table, handlers, batches),
//! `vcpu` (run loop and exit table; internal), [`vm`] (builder and run; `Vm::start` for many
//! VMs from one thread), [`seccomp`] (the filters each kind of thread runs under), [`stats`]
//! and [`stats_table`] (the `--stats` report), [`trace`] (per-call observers), [`record`]
//! (recordings, replay), and [`backend`], the thin trait KVM and the software CPU implement.
//! With the `test-double` feature, `testing` is a scripted backend for testing the run loop
//! without a VM.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod boot;
pub mod debug;
pub mod devices;
#[cfg(feature = "gdb")]
pub mod gdb;
pub mod hypercall;
pub mod memory;
pub mod record;
pub mod seccomp;
pub mod stats;
pub mod stats_table;
#[cfg(any(test, feature = "test-double"))]
pub mod testing;
pub mod trace;
pub(crate) mod vcpu;
pub mod vm;
pub mod x86;

pub use vmcall_abi as abi;
