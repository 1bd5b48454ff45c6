//! The same guest binaries on every backend give byte-identical console output, the same
//! hypercall results and counts, and the same end.

use std::sync::Arc;

use vmcall_conformance::{
    backends, check_lines, ending, kernel_table, run, visible, Backend, Outcome, Verdicts,
    PVM_NO_PAGING32,
};
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::Call;
use vmcall_vmm::hypercall::{HypercallResult, HypercallTable};

fn table() -> Arc<HypercallTable> {
    let t = Arc::new(HypercallTable::new());
    t.register(20, "echo", Builtin::Echo).unwrap();
    t.register(21, "weighted", |c: &Call<'_>| {
        Ok(c.args[0] + 10 * c.args[1] + 100 * c.args[2] + 1000 * c.args[3])
    })
    .unwrap();
    t.register(30, "mem", |c: &Call<'_>| -> HypercallResult {
        let v = c.mem.read_u64(c.args[0])?;
        c.mem.write_u64(c.args[0] + 8, v + 1)?;
        Ok(v)
    })
    .unwrap();
    t
}

/// What must be identical between backends: console bytes, how the run ended, and (where
/// the backend sees every call) the number of calls per hypercall number.
fn fingerprint(o: &Outcome, counts: bool) -> (String, String, Option<Vec<(u64, u64)>>) {
    let counts = counts.then(|| o.stats.hypercalls.iter().map(|(nr, l)| (*nr, l.count)).collect());
    (o.console.clone(), format!("{:?}", o.result), counts)
}

#[test]
fn every_backend_gives_identical_results() {
    let all = backends("every_backend_gives_identical_results");
    if all.len() < 2 {
        visible("SKIP every_backend_gives_identical_results: fewer than two backends to compare");
    }
    for (guest, cmdline) in [
        ("demo", ""),
        ("conformance", ""),
        ("modes", ""),
        ("memory", ""),
        ("calls", "300 20"),
        ("c-seed", ""),
        ("c-hello", ""),
    ] {
        type Fingerprint = (String, String, Option<Vec<(u64, u64)>>);
        let mut reference: Option<(String, Fingerprint)> = None;
        for b in &all {
            let out = run(b.hv.as_ref(), guest, cmdline, table());
            assert!(out.result.is_ok(), "{guest} on {}: {:?}\n{}", b.name, out.result, out.console);
            let fp = fingerprint(&out, true);
            match &reference {
                None => reference = Some((b.name.clone(), fp)),
                Some((ref_name, ref_fp)) => {
                    let (fp, ref_fp) = if b.sees_every_call {
                        (fp, ref_fp.clone())
                    } else {
                        (fingerprint(&out, false), (ref_fp.0.clone(), ref_fp.1.clone(), None))
                    };
                    assert_eq!(fp, ref_fp, "{guest}: {} differs from {ref_name}", b.name);
                }
            }
        }
    }
}

/// The kernel-like guests (own page tables, own IDT, port reads, data in `.text`, 32-bit
/// protected mode, a higher-half kernel): each one's whole console, end of run and (where
/// seen) hypercall counts are the same on every backend. Every guest is compared on every
/// backend before the test fails, so one difference does not hide another.
#[test]
fn kernel_guests_give_identical_results() {
    let all = backends("kernel_guests_give_identical_results");
    if all.len() < 2 {
        visible("SKIP kernel_guests_give_identical_results: fewer than two backends to compare");
        return;
    }
    let mut verdicts = Verdicts::default();
    // Compare like with like: where a backend cannot run INT3, no backend runs that case.
    let idt_cmdline = if all.iter().any(|b| b.kvm_pvm) { "no-int3" } else { "" };
    for (guest, cmdline) in [
        ("kernel_virt", "alias"),
        ("kernel_virt", "twin"),
        ("kernel_virt", "virtptr"),
        ("kernel_idt", idt_cmdline),
        ("kernel_ports", ""),
        ("kernel_textdata", ""),
        ("kernel_prot32", "prot32-2level"),
        ("kernel_prot32", "prot32-pae"),
        ("c-kernel_highhalf", ""),
    ] {
        let case = format!("{guest} {cmdline}").trim_end().to_string();
        // Backends that cannot run a case at all are left out of its comparison, visibly.
        let able: Vec<&Backend> = all
            .iter()
            .filter(|b| {
                let skip = b.kvm_pvm && guest == "kernel_prot32";
                if skip {
                    visible(&format!("SKIP {case} comparison on {}: {PVM_NO_PAGING32}", b.name));
                }
                !skip
            })
            .collect();
        if able.len() < 2 {
            continue;
        }
        let all = able;
        let runs: Vec<Outcome> =
            all.iter().map(|b| run(b.hv.as_ref(), guest, cmdline, kernel_table())).collect();
        let (reference, ref_out) = (&all[0], &runs[0]);
        for (b, out) in all.iter().zip(&runs).skip(1) {
            let verdict = check_lines(&out.console, &lines(&ref_out.console))
                .map_err(|e| format!("console differs from {}'s, {e}", reference.name))
                .and_then(|()| {
                    let (got, want) = (ending(out), ending(ref_out));
                    if got == want {
                        Ok(())
                    } else {
                        Err(format!("run ended with {got}, on {} with {want}", reference.name))
                    }
                })
                .and_then(|()| {
                    let counts = |o: &Outcome| fingerprint(o, true).2;
                    // kernel_idt makes a CPL 3 VMMCALL from code only ever run at CPL 3.
                    let comparable = b.sees_every_call
                        && reference.sees_every_call
                        && (guest != "kernel_idt"
                            || b.misses_unrewritten_cpl3_vmmcall()
                                == reference.misses_unrewritten_cpl3_vmmcall());
                    if !comparable || counts(out) == counts(ref_out) {
                        Ok(())
                    } else {
                        Err(format!(
                            "hypercall counts {:?}, on {} {:?}",
                            counts(out),
                            reference.name,
                            counts(ref_out)
                        ))
                    }
                });
            verdicts.record(
                &format!("same as {}: {case}", reference.name),
                &b.name,
                verdict,
                &out.console,
            );
        }
    }
    verdicts.finish();
}

fn lines(console: &str) -> Vec<String> {
    console.lines().map(String::from).collect()
}
