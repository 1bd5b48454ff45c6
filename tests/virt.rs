//! Guests that build their own page tables (`kernel_virt`), where a virtual address is no
//! longer the physical one: hypercall sites reached through an alias of the image and in code
//! written at run time at a high address, twin pages whose mappings are swapped (the bytes at
//! the *virtual* RIP decide what an instruction is), and handlers that follow a guest-virtual
//! pointer through the caller's page tables.

use vmcall_conformance::{backends, check_run, kernel_table, run, virtptr_lines, Verdicts};

fn case(name: &str, want: &[String], counts: &[(u64, u64)]) {
    let mut verdicts = Verdicts::default();
    for b in backends(&format!("kernel_virt {name}")) {
        let out = run(b.hv.as_ref(), "kernel_virt", name, kernel_table());
        let verdict = check_run(&out, &b, want, counts);
        verdicts.record(&format!("kernel_virt {name}"), &b.name, verdict, &out.console);
    }
    verdicts.finish();
}

#[test]
fn hypercalls_through_an_alias_and_at_a_high_address_are_answered() {
    let mut want = vec!["alias: own page tables, image alias at 0x40000200000".to_string()];
    for insn in ["sdk", "vmcall", "vmmcall"] {
        want.push(format!("alias identity {insn}: ret=7"));
        want.push(format!("alias high {insn}: ret=7"));
    }
    want.push("alias runtime vmcall at 0x50000000000: ret=9".into());
    want.push("alias runtime vmmcall at 0x50000000020: ret=9".into());
    want.push("alias: done".into());
    case("alias", &want, &[(20, 8)]);
}

#[test]
fn the_instruction_at_the_virtual_rip_decides_not_its_physical_twin() {
    let want: Vec<String> = [
        "twin: own page tables and IDT, p1=0x1000000 p2=0x1001000",
        "twin before va=0x1000000 (vmcall): ret=11",
        "twin before va=0x1000010 (vmmcall): ret=12",
        "twin before va=0x1001000 (ud2): trapped vector=6 err=0x0 rip=0x1001000",
        "twin before va=0x1001010 (ud2): trapped vector=6 err=0x0 rip=0x1001010",
        "twin: swapped va 0x1000000 <-> 0x1001000",
        // VA P1 now runs P2's UD2: the guest's own #UD handler gets it, at RIP = P1.
        "twin after va=0x1000000 (ud2): trapped vector=6 err=0x0 rip=0x1000000",
        "twin after va=0x1000010 (ud2): trapped vector=6 err=0x0 rip=0x1000010",
        // VA P2 now runs P1's VMCALL/VMMCALL: a hypercall, though P2 itself holds UD2.
        "twin after va=0x1001000 (vmcall): ret=23",
        "twin after va=0x1001010 (vmmcall): ret=24",
        "twin: guest #UD handler ran 4 times, 4 exceptions in all",
        "twin: done",
    ]
    .map(String::from)
    .into();
    case("twin", &want, &[(20, 4)]);
}

#[test]
fn handlers_read_guest_virtual_pointers_through_the_guests_own_tables() {
    // The guest's strings (guests/src/bin/kernel_virt.rs).
    let want = virtptr_lines();
    case("virtptr", &want, &[(0x30, 5)]);
}
