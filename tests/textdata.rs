//! A guest whose `.text` holds hypercall bytes that are not hypercalls (`kernel_textdata`), as
//! hand-written kernel assembly does: an immediate operand spelling VMCALL, a data island with
//! VMCALL and VMMCALL after an unconditional jump, a jump table. Its code must run and read
//! back exactly as linked — nothing may rewrite it — and a real hypercall is still answered.

use vmcall_conformance::{backends, check_run, kernel_table, run, Verdicts};

#[test]
fn hypercall_bytes_that_are_data_or_operands_stay_untouched() {
    let want: Vec<String> = [
        "textdata mov_imm: eax=0xc1010f",
        "textdata mov_imm code: b8 0f 01 c1 00 c3",
        "textdata island: same=1 bytes=0f 01 c1 0f 01 d9",
        "textdata switch 0: eax=0xf01c1",
        "textdata switch 1: eax=0xf01d9",
        "textdata switch 2: eax=0xc1",
        "textdata switch 3: eax=0xd9",
        "textdata switch 4: eax=0xffffffff",
        "textdata hypercall: ret=193",
        "textdata: done",
    ]
    .map(String::from)
    .into();
    let mut verdicts = Verdicts::default();
    for b in backends("kernel_textdata") {
        let out = run(b.hv.as_ref(), "kernel_textdata", "", kernel_table());
        let verdict = check_run(&out, &b, &want, &[(20, 1)]);
        verdicts.record("kernel_textdata", &b.name, verdict, &out.console);
    }
    verdicts.finish();
}
