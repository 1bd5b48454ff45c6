//! The control socket of a running VM (`vmcall run --control`) and its client (`vmcall ctl`):
//! the protocol in [`protocol`], the server in [`server`], the client in [`client`];
//! docs/control.md describes all three.

pub mod client;
pub mod protocol;
pub mod server;

use serde_json::Value;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::vm::VmMonitor;

use crate::handlers::BuildOptions;

/// The running VM as the protocol sees it.
#[derive(Debug)]
pub struct VmTarget {
    pub monitor: VmMonitor,
    pub opts: BuildOptions,
}

impl protocol::Target for VmTarget {
    fn table(&self) -> &HypercallTable {
        self.monitor.table()
    }
    fn stats(&self) -> Value {
        let live = self.monitor.stats();
        crate::report::stats_json(&live.total, &live.per_vcpu, live.elapsed)
    }
    fn set_trace(&self, on: bool) {
        self.monitor.trace().set(on);
    }
    fn stop(&self) {
        self.monitor.stop();
    }
    fn build_options(&self) -> BuildOptions {
        self.opts
    }
}
