//! A guest that installs its own IDT (`kernel_idt`), as every kernel does: its hypercalls —
//! from static sites and from code written at run time, before and after it handled genuine
//! exceptions — are answered by the host and never reach its #UD handler; its genuine
//! exceptions reach its own handlers with the CPU's vector, error code, RIP and CR2; and
//! hypercalls from CPL 3 get -KVM_EPERM.

use vmcall_conformance::{backends, check_run, kernel_table, run, visible, Verdicts, PVM_NO_INT3};

/// What `kernel_idt` prints, with or without its INT3 case.
fn expected(int3: bool) -> Vec<String> {
    let mut want = vec!["idt: own IDT loaded".to_string()];
    let hypercalls = |want: &mut Vec<String>, prefix: &str, echo: u64| {
        for insn in ["sdk", "vmcall", "vmmcall"] {
            want.push(format!("{prefix} {insn} static: ret={echo}"));
        }
        // The run-time functions carry their a0 (0x101, 0x102) as immediates.
        want.push(format!("{prefix} vmcall runtime: ret=257"));
        want.push(format!("{prefix} vmmcall runtime: ret=258"));
    };
    hypercalls(&mut want, "idt before", 0x100);
    want.extend(
        [
            "idt ud2: trapped vector=6 err=0x0 rip=site+0x0",
            // A load from a non-canonical address: #GP(0) at the load, after a 10-byte movabs.
            "idt gp: trapped vector=13 err=0x0 rip=site+0xa",
            // Not present, supervisor read / write.
            "idt pf read: trapped vector=14 err=0x0 rip=site+0x0 cr2=0x123456789000",
            "idt pf write: trapped vector=14 err=0x2 rip=site+0x0 cr2=0x123456789008",
            "idt div0: trapped vector=0 err=0x0 rip=site+0x9",
        ]
        .map(String::from),
    );
    if int3 {
        // A trap: RIP is past the INT3.
        want.push("idt int3: trapped vector=3 err=0x0 rip=site+0x1".into());
    }
    hypercalls(&mut want, "idt after", 0x200);
    for (insn, site) in [
        ("sdk", "static"),
        ("vmcall", "static"),
        ("vmmcall", "static"),
        ("vmcall", "runtime"),
        ("vmmcall", "runtime"),
    ] {
        want.push(format!("cpl3 {insn} {site}: ret=-1"));
    }
    // Exactly the genuine exceptions: one #UD (the ud2), none from a hypercall.
    let (bp, total) = if int3 { (1, 6) } else { (0, 5) };
    want.push(format!("idt counts: de=1 bp={bp} ud=1 gp=1 pf=2 total={total}"));
    want.push("idt: done".into());
    want
}

#[test]
fn hypercalls_are_answered_and_exceptions_reach_the_guests_own_idt() {
    let mut verdicts = Verdicts::default();
    for b in backends("kernel_idt") {
        let cmdline = if b.kvm_pvm {
            visible(&format!("SKIP kernel_idt int3 case on {}: {PVM_NO_INT3}", b.name));
            "no-int3"
        } else {
            ""
        };
        let out = run(b.hv.as_ref(), "kernel_idt", cmdline, kernel_table());
        // The CPL 3 calls include one VMMCALL from code written at run time and run only at
        // CPL 3, which kvm_pvm answers itself.
        let calls = if b.misses_unrewritten_cpl3_vmmcall() { 14 } else { 15 };
        let verdict = check_run(&out, &b, &expected(cmdline.is_empty()), &[(20, calls)]);
        verdicts.record("kernel_idt", &b.name, verdict, &out.console);
    }
    verdicts.finish();
}
