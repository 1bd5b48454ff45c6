//! Custom hypercalls: registered, replaced and removed while a guest loops making calls (none
//! lost, none answered twice), guest-memory access from handlers (wild addresses are
//! -KVM_EFAULT), explicit overrides of standard numbers, MAP_GPA_RANGE's opt-in, and panics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmcall_conformance::{backends, run};
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::Call;
use vmcall_vmm::hypercall::{HypercallHandler, HypercallResult, HypercallTable};
use vmcall_vmm::vm::RunStatus;

/// A handler answering `(tag << 32) | a0` and counting its calls.
fn tagged(tag: u64, count: Arc<AtomicU64>) -> impl HypercallHandler {
    move |c: &Call<'_>| -> HypercallResult {
        count.fetch_add(1, Ordering::SeqCst);
        Ok((tag << 32) | (c.args[0] & 0xffff_ffff))
    }
}

/// [`tagged`], whose `at`th call (counted in `count`, across registrations) raises `go` and
/// waits, up to 10 s, for `changes` to reach 1: however the threads are scheduled, the table
/// changes while the guest still has calls to make.
fn tagged_starting_changes_at(
    tag: u64,
    count: Arc<AtomicU64>,
    at: u64,
    go: Arc<AtomicBool>,
    changes: Arc<AtomicU64>,
) -> impl HypercallHandler {
    move |c: &Call<'_>| -> HypercallResult {
        if count.fetch_add(1, Ordering::SeqCst) + 1 == at {
            go.store(true, Ordering::SeqCst);
            wait_until(|| changes.load(Ordering::SeqCst) > 0);
        }
        Ok((tag << 32) | (c.args[0] & 0xffff_ffff))
    }
}

/// Wait until `f` holds, for 10 s at most.
fn wait_until(f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok()).unwrap()
}

#[test]
fn handlers_change_while_the_guest_runs_and_no_call_is_lost() {
    const CALLS: u64 = 3000;
    for b in backends("handlers_change_while_the_guest_runs_and_no_call_is_lost") {
        let table = Arc::new(HypercallTable::new());
        let (c1, c2) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let done = Arc::new(AtomicBool::new(false));
        let go = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(AtomicU64::new(0));
        // v1's 50th call (out of 3000) starts the swapper and waits for its first change; the
        // swapper leaves v2 in place until the guest has called it, then goes round: v2, no
        // handler, v1, every few hundred microseconds.
        let v1 = {
            let (c1, go, changes) = (c1.clone(), go.clone(), changes.clone());
            move || tagged_starting_changes_at(1, c1.clone(), 50, go.clone(), changes.clone())
        };
        table.register(20, "v1", v1()).unwrap();
        let swapper = {
            let (table, done, go, changes, c2) =
                (table.clone(), done.clone(), go.clone(), changes.clone(), c2.clone());
            let v1 = v1.clone();
            std::thread::spawn(move || {
                wait_until(|| go.load(Ordering::SeqCst) || done.load(Ordering::SeqCst));
                while !done.load(Ordering::SeqCst) {
                    let before = c2.load(Ordering::SeqCst);
                    table.replace(20, "v2", tagged(2, c2.clone())).unwrap();
                    changes.fetch_add(1, Ordering::SeqCst);
                    if changes.load(Ordering::SeqCst) == 1 {
                        wait_until(|| {
                            c2.load(Ordering::SeqCst) > before || done.load(Ordering::SeqCst)
                        });
                    }
                    std::thread::sleep(Duration::from_micros(300));
                    table.unregister(20).unwrap();
                    changes.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(300));
                    table.register(20, "v1", v1()).unwrap();
                    changes.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(300));
                }
            })
        };
        let out = run(b.hv.as_ref(), "calls", &format!("{CALLS} 20"), table);
        done.store(true, Ordering::SeqCst);
        swapper.join().unwrap();
        out.expect_status(RunStatus::AllHalted, &b.name);
        let line = out.lines("calls ")[0];
        let (g1, g2, enosys) = (field(line, "tag1="), field(line, "tag2="), field(line, "enosys="));
        assert_eq!(field(line, "wrong="), 0, "{}: {line}", b.name);
        assert_eq!(g1 + g2 + enosys, CALLS, "{}: {line}", b.name);
        // What the guest saw from each handler is exactly what each handler answered.
        assert_eq!(g1, c1.load(Ordering::SeqCst), "{}: {line}", b.name);
        assert_eq!(g2, c2.load(Ordering::SeqCst), "{}: {line}", b.name);
        assert_eq!(out.stats.hypercalls[&20].count, CALLS, "{}", b.name);
        assert!(g2 > 0, "{}: the guest never met the swapped-in handler: {line}", b.name);
    }
}

#[test]
fn handlers_access_guest_memory_through_checked_accessors() {
    for b in backends("handlers_access_guest_memory_through_checked_accessors") {
        let table = Arc::new(HypercallTable::new());
        table
            .register(30, "mem", |c: &Call<'_>| -> HypercallResult {
                let v = c.mem.read_u64(c.args[0])?;
                c.mem.write_u64(c.args[0] + 8, v + 1)?;
                Ok(v)
            })
            .unwrap();
        let out = run(b.hv.as_ref(), "memory", "", table);
        out.expect_status(RunStatus::AllHalted, &b.name);
        assert_eq!(
            out.lines("handler read="),
            vec!["handler read=0x1234 wrote=0x1235"],
            "{}",
            b.name
        );
        let wild = out.lines("handler wild=");
        assert_eq!(wild.len(), 4, "{}:\n{}", b.name, out.console);
        for line in wild {
            assert!(line.ends_with("ret=-14"), "{}: {line}", b.name);
        }
        assert_eq!(out.lines("clock ret="), vec!["clock ret=0 sec_positive=true"], "{}", b.name);
        assert_eq!(out.lines("clock wild"), vec!["clock wild ret=-14"], "{}", b.name);
        assert_eq!(out.lines("clock type1"), vec!["clock type1 ret=-95"], "{}", b.name);
    }
}

#[test]
fn overrides_are_explicit_and_map_gpa_range_is_an_opt_in() {
    for b in backends("overrides_are_explicit_and_map_gpa_range_is_an_opt_in") {
        let table = Arc::new(HypercallTable::new());
        assert!(table.register(1, "nope", Builtin::Const(7)).is_err());
        table.override_standard(1, "poll", Builtin::Const(7));
        table.register(12, "map", Builtin::Const(99)).unwrap();
        table
            .register(20, "boom", |_: &Call<'_>| -> HypercallResult { panic!("handler bug") })
            .unwrap();
        let out = run(b.hv.as_ref(), "conformance", "", table);
        out.expect_status(RunStatus::AllHalted, &b.name);
        for insn in ["vmcall", "vmmcall"] {
            assert!(
                out.console.contains(&format!("{insn} nr=0x1 ret=7\n")),
                "{}:\n{}",
                b.name,
                out.console
            );
            // (gpa 0, 1 page) passes KVM's checks, so the handler answers.
            assert!(out.console.contains(&format!("{insn} nr=0xc ret=99\n")), "{}", b.name);
            // A panicking handler costs the guest -KVM_EFAULT, not the host.
            assert!(out.console.contains(&format!("{insn} nr=0x14 ret=-14\n")), "{}", b.name);
            assert!(out.console.contains(&format!("regs {insn} ok")), "{}", b.name);
        }
    }
}

#[test]
fn a_batch_rewritten_mid_flight_is_still_answered() {
    for b in backends("a_batch_rewritten_mid_flight_is_still_answered") {
        let table = Arc::new(HypercallTable::new());
        // A handler that dereferences whatever a0 says: the scribbler makes it wild.
        table
            .register(20, "deref", |c: &Call<'_>| -> HypercallResult {
                Ok(c.mem.read_u64(c.args[0])?)
            })
            .unwrap();
        let out = vmcall_conformance::run_image(
            b.hv.as_ref(),
            vmcall_conformance::guest("batchrace"),
            "",
            table,
            |v| v.vcpus(2),
        );
        out.expect_status(RunStatus::Exited(0), &b.name);
        assert_eq!(out.lines("batches whole"), vec!["batches whole: 200 of 200"], "{}", b.name);
    }
}
