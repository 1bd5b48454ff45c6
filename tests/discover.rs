//! Discovery (`VMCALL_HC_LIST`): a guest lists the registered custom hypercalls and their
//! names, through the Rust SDK and the C header, on every backend; the list follows the table
//! as it changes.

use std::sync::Arc;

use vmcall_conformance::{backends, check_lines, check_status, run, Verdicts};
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::vm::RunStatus;

fn table() -> Arc<HypercallTable> {
    let t = Arc::new(HypercallTable::new());
    t.register(21, "a-name-longer-than-twenty-three-bytes", Builtin::Echo).unwrap();
    t.register(20, "my_vmcall", Builtin::Const(1)).unwrap();
    t.override_standard(1, "poll", Builtin::Const(7));
    t
}

fn expected() -> Vec<String> {
    [
        "count=3",
        "small ret=-7",
        "hc nr=1 name=poll",
        "hc nr=20 name=my_vmcall",
        "hc nr=21 name=a-name-longer-than-twen",
        "wild ret=-14",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn guests_list_the_registered_hypercalls() {
    let mut verdicts = Verdicts::default();
    for b in backends("guests_list_the_registered_hypercalls") {
        for guest in ["discover", "c-discover"] {
            let out = run(b.hv.as_ref(), guest, "", table());
            let verdict = check_lines(&out.console, &expected())
                .and_then(|()| check_status(&out, RunStatus::AllHalted));
            verdicts.record(guest, &b.name, verdict, &out.console);
        }
        // An empty table: the count is 0 and every array fits.
        let out = run(b.hv.as_ref(), "discover", "", Arc::new(HypercallTable::new()));
        let want = ["count=0", "small ret=0", "wild ret=0"].map(String::from);
        verdicts.record(
            "discover (empty table)",
            &b.name,
            check_lines(&out.console, &want),
            &out.console,
        );
    }
    verdicts.finish();
}
