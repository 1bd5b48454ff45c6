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
//! [`vcpu`] (run loop and exit table), [`vm`] (builder and run), [`seccomp`] (the filters
//! each kind of thread runs under), [`stats`], [`trace`] (per-call observers), and
//! [`backend`], the thin trait KVM and the software CPU implement.
#![forbid(unsafe_code)]

pub mod backend;
pub mod boot;
pub mod debug;
pub mod devices;
#[cfg(feature = "gdb")]
pub mod gdb;
pub mod hypercall;
pub mod memory;
pub mod seccomp;
pub mod stats;
pub mod trace;
pub mod vcpu;
pub mod vm;
pub mod x86;

pub use vmcall_abi as abi;
