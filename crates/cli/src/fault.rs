//! What `vmcall run` adds to a guest fault's report: the symbol the faulting RIP is in (from
//! the image's ELF symbol table, when it has one) and the last hypercalls of that vCPU.

use vmcall_vmm::boot::symbols::Symbols;
use vmcall_vmm::trace::{RecentCall, SignedHex};
use vmcall_vmm::vm::RunError;

/// The image a run's name stands for, read again (only when a fault is reported).
fn image(name: &str) -> Vec<u8> {
    match name {
        "demo" => crate::builtin::DEMO.to_vec(),
        "hcloop" => crate::builtin::HCLOOP.to_vec(),
        path => {
            crate::guest_file::read(std::path::Path::new(path), crate::guest_file::MAX_IMAGE_LIMIT)
                .unwrap_or_default()
        }
    }
}

/// `message` (the error's chain) with the symbol next to the faulting RIP, and the vCPU's last
/// hypercalls after it, for errors that are guest faults; `message` unchanged otherwise.
pub fn report(
    e: &RunError,
    message: String,
    image_name: &str,
    last_calls: Option<&(u32, Vec<RecentCall>)>,
) -> String {
    let rip = match e {
        RunError::GuestFault { fault, .. } => fault.rip,
        RunError::TripleFault { rip, .. } => *rip,
        _ => return message,
    };
    let symbols = Symbols::parse(&image(image_name));
    let at = format!("RIP {rip:#x}");
    let mut out = match symbols.describe(rip) {
        Some(sym) if message.contains(&at) => message.replacen(&at, &format!("{at} ({sym})"), 1),
        Some(sym) => format!("{message} (RIP {rip:#x} is {sym})"),
        None => message,
    };
    if let Some((vcpu, calls)) = last_calls {
        if calls.is_empty() {
            out += &format!("\nvmcall: vCPU {vcpu} made no hypercall before it");
        } else {
            out += &format!("\nvmcall: last hypercalls of vCPU {vcpu}, oldest first:");
        }
        for c in calls {
            let [a0, a1, a2, a3] = c.args;
            out += &format!(
                "\nvmcall:   nr {:#x} args {a0:#x} {a1:#x} {a2:#x} {a3:#x} -> {} at {:#x}",
                c.nr,
                SignedHex(c.ret),
                c.rip
            );
            if let Some(sym) = symbols.describe(c.rip) {
                out += &format!(" ({sym})");
            }
        }
    }
    out
}
