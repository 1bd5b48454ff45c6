//! A kernel linked in the higher half (`c-kernel_highhalf`: p_vaddr = 0xffffffff80000000 +
//! p_paddr): vmcall loads it at its physical addresses and starts it at the entry stub's
//! physical twin; the stub maps the higher half and jumps there, and hypercalls from
//! higher-half code — including one passing a higher-half pointer — are answered.

use vmcall_conformance::{backends, byte_sum, check_run, kernel_table, run, Verdicts};

#[test]
fn a_higher_half_kernel_makes_hypercalls() {
    // The guest's strings (guests/c/kernel_highhalf.c).
    let rodata = "a string linked in the higher half";
    let stack = "a string on the higher-half stack";
    let want = vec![
        "highhalf: rip_high=1 stack_high=1 own_cr3=1 boot_info=1".to_string(),
        "highhalf sdk nr=20 a0=0x41: ret=65".into(),
        "highhalf vmcall nr=20 a0=0x42: ret=66".into(),
        "highhalf vmmcall nr=20 a0=0x43: ret=67".into(),
        "highhalf sdk nr=999: ret=-1000".into(),
        format!("highhalf sum rodata: ret={}", byte_sum(rodata)),
        format!("highhalf sum stack: ret={}", byte_sum(stack)),
        "highhalf: done".into(),
    ];
    let mut verdicts = Verdicts::default();
    for b in backends("c-kernel_highhalf") {
        let out = run(b.hv.as_ref(), "c-kernel_highhalf", "", kernel_table());
        let verdict = check_run(&out, &b, &want, &[(20, 3), (0x30, 2), (999, 1)]);
        verdicts.record("c-kernel_highhalf", &b.name, verdict, &out.console);
    }
    verdicts.finish();
}
