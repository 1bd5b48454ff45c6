//! A guest fault's report names code: the symbol next to RIP (from the image's symbol table)
//! and the last hypercalls of the vCPU that faulted, on every backend.

mod common;

use common::{kvm_available, vmcall};

fn backends(test: &str) -> Vec<&'static str> {
    let mut b = vec!["emu"];
    if kvm_available(&format!("{test} on kvm")) {
        b.push("kvm");
    }
    b
}

#[test]
fn a_fault_names_its_symbol_and_the_last_hypercalls() {
    let bad = vmcall_test_guests::path("bad").unwrap();
    for backend in backends("a_fault_names_its_symbol_and_the_last_hypercalls") {
        let o = vmcall(&[
            "run",
            bad,
            "--backend",
            backend,
            "--timeout",
            "60s",
            "--hypercall",
            "20=echo",
            "--",
            "calls-then-null",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{backend}: {err}");
        let line = err.lines().find(|l| l.contains("#PF page fault")).expect("the fault");
        // The guest's code is all in its main (the SDK's entry calls it, inlined).
        assert!(line.contains("(__vmcall_guest_main+0x"), "{backend}: {line}");
        let calls: Vec<&str> = err
            .lines()
            .skip_while(|l| !l.contains("last hypercalls of vCPU 0, oldest first:"))
            .skip(1)
            .collect();
        assert_eq!(calls.len(), 3, "{backend}: {err}");
        for (i, l) in calls.iter().enumerate() {
            let want =
                format!("vmcall:   nr 0x14 args {:#x} 0x0 0x0 0x0 -> {:#x} at 0x", i + 1, i + 1);
            assert!(
                l.starts_with(&want) && l.contains("(__vmcall_guest_main+0x"),
                "{backend}: {l}"
            );
        }
        // A fault before any hypercall says so.
        let o = vmcall(&["run", bad, "--backend", backend, "--timeout", "60s", "--", "ud2"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("#UD invalid opcode") && err.contains("(__vmcall_guest_main+0x"),
            "{err}"
        );
        assert!(err.contains("vCPU 0 made no hypercall before it"), "{err}");
    }
}
