//! Choosing a backend, and `vmcall info`'s report of what this host offers.

use std::sync::Arc;
use std::time::Duration;

use vmcall_vmm::backend::Hypervisor;
use vmcall_vmm::boot::elf::minimal_elf;
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::vm::{RunStatus, VmBuilder};

use crate::error::{chain, Error};

/// The backend named by `--backend` (and `--trap` for KVM). `auto` takes KVM whenever
/// `/dev/kvm` is usable — even a software KVM, where the emulator runs guest code faster,
/// because KVM is the hypervisor path people build for — and otherwise the software CPU,
/// saying why on stderr. A usable KVM that lacks the `--trap` strategy asked for is an error,
/// not a reason to fall back; so is a `--trap` strategy (other than auto) when there is no
/// usable KVM, since the software CPU has no trap strategies.
pub fn select(backend: &str, trap: &str) -> Result<Box<dyn Hypervisor>, Error> {
    let hv = match backend {
        "kvm" => kvm(trap),
        "emu" => emu(),
        "auto" => open_kvm(trap).or_else(|e| match e {
            NoKvm::Trap(why) => Err(why),
            NoKvm::Kvm(why) if trap != "auto" => Err(format!(
                "--trap {trap} needs the kvm backend, and there is none: {why} (the software \
                 CPU, --backend emu, has no trap strategies)"
            )),
            NoKvm::Kvm(why) => {
                let hv = emu().map_err(|e| format!("no backend available: {why}; {e}"))?;
                crate::note!("vmcall: {why}; using the software CPU backend (--backend emu)");
                Ok(hv)
            }
        }),
        other => Err(format!("unknown backend '{other}'")),
    };
    hv.map_err(Error::Backend)
}

/// The software-CPU backend, if built in.
#[cfg(feature = "emu")]
pub(crate) fn emu() -> Result<Box<dyn Hypervisor>, String> {
    Ok(Box::new(vmcall_emu::EmuHypervisor::new()))
}

#[cfg(not(feature = "emu"))]
pub(crate) fn emu() -> Result<Box<dyn Hypervisor>, String> {
    Err("this vmcall was built without the software CPU backend (feature 'emu')".into())
}

/// Why the KVM backend cannot be had.
enum NoKvm {
    /// No usable KVM at all: another backend may stand in.
    Kvm(String),
    /// KVM works, but not with the `--trap` asked for (or the name is wrong).
    #[cfg_attr(not(feature = "kvm"), allow(dead_code))]
    Trap(String),
}

/// The KVM backend with the trap strategy named `trap`, if /dev/kvm is usable.
pub(crate) fn kvm(trap: &str) -> Result<Box<dyn Hypervisor>, String> {
    open_kvm(trap).map_err(|(NoKvm::Kvm(why) | NoKvm::Trap(why))| why)
}

#[cfg(feature = "kvm")]
fn open_kvm(trap: &str) -> Result<Box<dyn Hypervisor>, NoKvm> {
    let trap: vmcall_kvm::Trap = trap.parse().map_err(NoKvm::Trap)?;
    let hv = vmcall_kvm::KvmHypervisor::open(trap).map_err(|e| match e {
        vmcall_kvm::OpenError::TrapUnavailable { .. } => NoKvm::Trap(chain(&e)),
        _ => NoKvm::Kvm(format!("KVM backend unavailable: {}", chain(&e))),
    })?;
    Ok(Box::new(hv))
}

#[cfg(not(feature = "kvm"))]
fn open_kvm(_: &str) -> Result<Box<dyn Hypervisor>, NoKvm> {
    Err(NoKvm::Kvm("this vmcall was built without the kvm feature".into()))
}

/// Number the probe guest calls; its handler answers 42.
const PROBE_NR: u32 = 0x7777;

/// A guest that makes a VMCALL and a VMMCALL to `PROBE_NR` and exits with the sum of results.
pub fn probe_guest() -> Vec<u8> {
    let nr = PROBE_NR.to_le_bytes();
    let mut code = vec![0xb8, nr[0], nr[1], nr[2], nr[3]]; // mov eax, nr
    code.extend([0x0f, 0x01, 0xc1]); // vmcall
    code.extend([0x89, 0xc3]); // mov ebx, eax
    code.extend([0xb8, nr[0], nr[1], nr[2], nr[3]]); // mov eax, nr
    code.extend([0x0f, 0x01, 0xd9]); // vmmcall
    code.extend([0x01, 0xd8]); // add eax, ebx
    code.extend([0xe7, vmcall_abi::ports::PORT_EXIT as u8]); // out imm8, eax
    code.extend([0xf4]); // hlt
    minimal_elf(0x20_0000, &code)
}

/// Run the probe guest on `hv`: Ok when both hypercalls were answered by vmcall.
pub fn probe(hv: &dyn Hypervisor) -> Result<Duration, String> {
    let table = Arc::new(HypercallTable::new());
    table.register(u64::from(PROBE_NR), "probe", Builtin::Const(42)).expect("empty table");
    let vm = VmBuilder::new(probe_guest())
        .memory(4 << 20)
        .timeout(Some(Duration::from_secs(5)))
        .table(table)
        .console(Box::new(std::io::sink()))
        .build(hv)
        .map_err(|e| chain(&e))?;
    let report = vm.run();
    match report.result {
        Ok(RunStatus::Exited(84)) => Ok(report.elapsed),
        Ok(other) => Err(format!("guest saw wrong results ({other:?}, expected exit 84)")),
        Err(e) => Err(chain(&e)),
    }
}

/// `vmcall info`'s report, built once and shown as text or JSON.
#[derive(Default)]
struct Info {
    text: String,
    json: serde_json::Map<String, serde_json::Value>,
}

impl Info {
    fn line(&mut self, line: impl AsRef<str>) {
        self.text += line.as_ref();
        self.text.push('\n');
    }
    fn set(&mut self, key: &str, value: serde_json::Value) {
        self.json.insert(key.into(), value);
    }
}

/// `vmcall info`: print what this host offers (as one JSON object with `json`). Returns whether
/// any backend can run guests here.
pub fn info(json: bool) -> bool {
    use serde_json::json;
    let mut r = Info::default();
    let amd = vmcall_vmm::vm::host_is_amd();
    let vendor = if amd { "AMD (native: VMMCALL)" } else { "Intel (native: VMCALL)" };
    r.line(format!("vmcall {}", env!("CARGO_PKG_VERSION")));
    r.line(format!("host CPU vendor:    {vendor}"));
    r.set("version", json!(env!("CARGO_PKG_VERSION")));
    r.set("cpu_vendor", json!(if amd { "amd" } else { "intel" }));
    let kvm_ok = kvm_info(&mut r);
    let emu_ok = emu_info(&mut r);
    let (auto, text) = match (kvm_ok, emu_ok) {
        (true, _) => (Some("kvm"), "kvm (a usable /dev/kvm is always preferred; on a software KVM, --backend emu runs guest code faster)"),
        (false, true) => (Some("emu"), "emu (no usable /dev/kvm)"),
        (false, false) => (None, "none: no backend can run here"),
    };
    r.line(format!("--backend auto:     {text}"));
    r.set("auto_backend", json!(auto));
    if json {
        let doc = serde_json::Value::Object(r.json);
        println!("{}", serde_json::to_string_pretty(&doc).expect("JSON values serialise"));
    } else {
        print!("{}", r.text);
    }
    auto.is_some()
}

#[cfg(feature = "emu")]
fn emu_info(r: &mut Info) -> bool {
    use serde_json::json;
    let hv = vmcall_emu::EmuHypervisor::new();
    let probe = probe(&hv);
    let verdict = match &probe {
        Ok(t) => format!("works ({:.1} ms for the probe VM)", t.as_secs_f64() * 1e3),
        Err(e) => format!("fails: {e}"),
    };
    r.line(format!(
        "emu backend:        unicorn {} software CPU (GPL-2.0); probe {verdict}",
        vmcall_emu::unicorn_version()
    ));
    r.set(
        "emu",
        json!({
            "built": true,
            "usable": probe.is_ok(),
            "unicorn": vmcall_emu::unicorn_version().to_string(),
            "probe": verdict,
        }),
    );
    probe.is_ok()
}

#[cfg(not(feature = "emu"))]
fn emu_info(r: &mut Info) -> bool {
    r.line("emu backend:        not built (feature 'emu' off)");
    r.set("emu", serde_json::json!({ "built": false, "usable": false }));
    false
}

#[cfg(not(feature = "kvm"))]
fn kvm_info(r: &mut Info) -> bool {
    r.line("kvm backend:        not built (feature 'kvm' off)");
    r.set("kvm", serde_json::json!({ "built": false, "usable": false }));
    false
}

#[cfg(feature = "kvm")]
fn kvm_info(r: &mut Info) -> bool {
    use serde_json::json;
    use vmcall_kvm::{KvmHypervisor, Trap};
    let hv = match KvmHypervisor::open(Trap::Auto) {
        Ok(hv) => hv,
        Err(e) => {
            r.line(format!("kvm backend:        unavailable: {}", chain(&e)));
            r.set("kvm", json!({ "built": true, "usable": false, "reason": chain(&e) }));
            return false;
        }
    };
    let c = hv.capabilities();
    let yes = |b: bool| if b { "yes" } else { "no" };
    r.line(format!("kvm backend:        /dev/kvm usable, API version {}", c.api_version));
    r.line(format!("  max vCPUs:                      {}", c.max_vcpus));
    r.line(format!("  KVM_CAP_SYNC_REGS:              {}", yes(c.sync_regs)));
    r.line(format!("  KVM_CAP_IMMEDIATE_EXIT:         {}", yes(c.immediate_exit)));
    r.line(format!("  disable FIX_HYPERCALL_INSN:     {}", yes(c.can_disable_hypercall_quirk)));
    r.line(format!("  KVM_CAP_SET_GUEST_DEBUG:        {}", yes(c.guest_debug)));
    r.line(format!(
        "  KVM_CAP_XEN_HVM:                {:#x} (hypercall intercept: {})",
        c.xen_hvm,
        yes(c.xen_intercept)
    ));
    if c.pvm {
        r.line("  note: this is kvm_pvm, a software KVM: guest code runs ~200x slower than on");
        r.line("        hardware KVM (and than on --backend emu), and a hypercall reaching its");
        r.line("        kernel handler never returns");
    } else if !c.xen_intercept {
        r.line("  note: on this hardware KVM, native hypercall instructions in code not present");
        r.line("        at load time (JIT, code written at run time, modules loaded later) are");
        r.line("        answered by the kernel itself (-1000 for unknown numbers) and never reach");
        r.line("        vmcall; the xen strategy would catch them but is unavailable here");
    }
    r.line("trap strategies (probe: a guest making one VMCALL and one VMMCALL):");
    let mut traps = serde_json::Map::new();
    for trap in [Trap::Rewrite, Trap::Ud, Trap::Hwbp, Trap::Xen] {
        let (works, verdict) = match KvmHypervisor::open(trap) {
            Ok(hv) => match probe(&hv) {
                Ok(t) => (
                    true,
                    format!("works ({:.1} ms for the whole probe VM)", t.as_secs_f64() * 1e3),
                ),
                Err(e) => (false, format!("fails: {e}")),
            },
            Err(vmcall_kvm::OpenError::TrapUnavailable { .. }) if trap == Trap::Xen => (
                false,
                format!(
                    "unavailable: {}",
                    vmcall_kvm::xen::unavailable_reason(c.xen_hvm).unwrap_or_default()
                ),
            ),
            Err(e) => (false, format!("fails: {}", chain(&e))),
        };
        r.line(format!("  {:<8} {verdict}", trap.name()));
        traps.insert(trap.name().into(), json!({ "works": works, "detail": verdict }));
    }
    let auto = match hv.resolved_trap() {
        Trap::Xen => "xen (every hypercall exits; nothing is rewritten)",
        _ => "rewrite (fastest; #UD catches the rest)",
    };
    r.line(format!("  --trap auto uses: {auto}"));
    let trap = hv.resolved_trap();
    r.line(format!("which hypercalls reach vmcall here under --trap {}:", trap.name()));
    let mut coverage = serde_json::Map::new();
    for (case, how) in
        vmcall_kvm::coverage::CASES.iter().zip(vmcall_kvm::coverage::coverage(c, trap))
    {
        r.line(format!("  {case:<42} {how}"));
        coverage.insert((*case).into(), json!(how));
    }
    r.set(
        "kvm",
        json!({
            "built": true,
            "usable": true,
            "api_version": c.api_version,
            "max_vcpus": c.max_vcpus,
            "software_kvm": c.pvm,
            "caps": {
                "sync_regs": c.sync_regs,
                "immediate_exit": c.immediate_exit,
                "disable_fix_hypercall_insn": c.can_disable_hypercall_quirk,
                "set_guest_debug": c.guest_debug,
                "xen_hvm": c.xen_hvm,
                "xen_intercept": c.xen_intercept,
            },
            "traps": traps,
            "auto_trap": trap.name(),
            "coverage": coverage,
        }),
    );
    true
}
