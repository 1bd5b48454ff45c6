//! A guest that leaves long mode for 32-bit protected mode with its own paging (classic 2-level
//! or PAE) and its own 32-bit IDT, as a 32-bit kernel runs (`kernel_prot32`): hypercalls there
//! see and return 32-bit values (an unknown number is 0xfffffc18, a 64-bit answer is cut to
//! EAX) and change no other register, the same code called through an alias is answered the
//! same, a genuine #UD reaches the guest's 32-bit handler, and the guest returns to long mode.

use vmcall_conformance::{
    backends, check_run, kernel_table, run, visible, Verdicts, PVM_NO_PAGING32, WIDE_ANSWER,
};

fn variant(name: &str, mode: &str) {
    let want = vec![
        format!("{name}: entering 32-bit protected mode, code alias at 0x40000000"),
        format!("{name} mode: {mode} efer.lme=0 efer.lma=0"),
        format!("{name} vmcall nr=20 a0=0x11: eax=0x11"),
        format!("{name} vmmcall nr=20 a0=0x12: eax=0x12"),
        format!("{name} vmcall nr=999: eax=0xfffffc18"),
        format!("{name} vmcall nr=21: eax={:#x} other_regs_changed=0x0", WIDE_ANSWER as u32),
        format!("{name} alias vmcall nr=20 a0=0x21: eax=0x21"),
        format!("{name} alias vmmcall nr=20 a0=0x22: eax=0x22"),
        format!("{name} ud2: traps=1 vector=6 err=0x0 eip=site+0x0"),
        format!("{name}: done"),
    ];
    let mut verdicts = Verdicts::default();
    for b in backends(&format!("kernel_prot32 {name}")) {
        if b.kvm_pvm {
            visible(&format!("SKIP kernel_prot32 {name} on {}: {PVM_NO_PAGING32}", b.name));
            continue;
        }
        let out = run(b.hv.as_ref(), "kernel_prot32", name, kernel_table());
        let verdict = check_run(&out, &b, &want, &[(20, 4), (21, 1), (999, 1)]);
        verdicts.record(&format!("kernel_prot32 {name}"), &b.name, verdict, &out.console);
    }
    verdicts.finish();
}

#[test]
fn hypercalls_from_32_bit_protected_mode_with_two_level_paging() {
    variant("prot32-2level", "cr0.pg=1 cr4.pae=0 cr4.pse=1");
}

#[test]
fn hypercalls_from_32_bit_protected_mode_with_pae_paging() {
    variant("prot32-pae", "cr0.pg=1 cr4.pae=1 cr4.pse=0");
}
