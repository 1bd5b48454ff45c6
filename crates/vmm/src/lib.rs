//! vmcall's VMM library: run a guest, trap its hypercalls and answer them exactly as Linux
//! KVM's `kvm_emulate_hypercall` does, with custom handlers that can change while it runs.
//!
//! ```no_run
//! # fn demo(hv: &dyn vmcall_vmm::backend::Hypervisor) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use vmcall_vmm::{table::HypercallTable, hypercall::Call, vm::VmBuilder};
//!
//! let table = Arc::new(HypercallTable::new());
//! table.register(20, "double", |c: &Call<'_>| Ok(c.args[0] * 2))?;
//! let vm = VmBuilder::new(std::fs::read("guest.elf")?).table(table.clone()).build(hv)?;
//! let report = vm.run();
//! println!("{:?}\n{}", report.result, report.stats.table(Some(&table)));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod backend;
pub mod boot;
pub mod exit;
pub mod handlers;
pub mod hypercall;
pub mod loader;
pub mod memory;
pub mod regs;
pub mod stats;
pub mod table;
pub mod vm;

pub use vmcall_abi as abi;
