//! seccomp: every vCPU thread runs confined from before the guest's first instruction, so a
//! handler (which runs on the vCPU thread that made the call) that tries what no vmcall
//! thread needs — open a file, make a socket, start a process — is refused with EPERM; the
//! filter shows in /proc; a handler kind can declare what more it needs; `Seccomp::Off` and
//! `AllThreads` do what they say (docs/security.md, "Syscalls").

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use vmcall_conformance::{backends, guest, run_image};
use vmcall_vmm::hypercall::{Call, HypercallTable};
use vmcall_vmm::seccomp::{Allowed, Seccomp};
use vmcall_vmm::vm::RunStatus;

/// What the probe handler found: whether each attempt was refused with EPERM.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Probe {
    open_file: Option<i32>,
    socket: Option<i32>,
    spawn: Option<i32>,
    own_status: Option<String>,
}

fn os_error(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// A table whose hypercall 20 tries three things no vmcall thread needs, records how each
/// went, and answers 42.
fn probing_table(found: Arc<Mutex<Probe>>) -> Arc<HypercallTable> {
    let t = Arc::new(HypercallTable::new());
    t.register(20, "probe", move |_: &Call<'_>| {
        let mut p = found.lock().unwrap();
        p.open_file = os_error(std::fs::File::open("/etc/hostname"));
        p.socket = os_error(std::net::UdpSocket::bind("127.0.0.1:0"));
        p.spawn = os_error(std::process::Command::new("/bin/true").spawn());
        p.own_status = std::fs::read_to_string("/proc/thread-self/status").ok();
        Ok(42)
    })
    .unwrap();
    t
}

/// `comm`, `Seccomp:` and `Seccomp_filters:` of this process's thread `tid`.
fn seccomp_of_thread(tid: i32) -> (String, String, String) {
    let task = std::path::PathBuf::from(format!("/proc/self/task/{tid}"));
    let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
    let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
    let field = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)).unwrap_or("?").trim().to_string()
    };
    (comm.trim().to_string(), field("Seccomp:"), field("Seccomp_filters:"))
}

#[test]
fn vcpu_threads_are_confined_and_handlers_refused_what_they_do_not_need() {
    const EPERM: Option<i32> = Some(libc::EPERM);
    for b in backends("vcpu_threads_are_confined_and_handlers_refused_what_they_do_not_need") {
        // Default: vCPU threads confined. The probe is refused everything.
        let found = Arc::new(Mutex::new(Probe::default()));
        let out = run_image(b.hv.as_ref(), guest("demo"), "", probing_table(found.clone()), |v| v);
        out.expect_status(RunStatus::AllHalted, &b.name);
        assert!(out.console.contains("KVM_HC_MY_VMCALL(41)       -> 42"), "{}", out.console);
        let p = found.lock().unwrap().clone();
        assert_eq!((p.open_file, p.socket, p.spawn), (EPERM, EPERM, EPERM), "{}: {p:?}", b.name);
        assert_eq!(p.own_status, None, "{}", b.name);

        // A handler kind that declares what it needs gets it, and nothing else: here the
        // calls that reading a file takes, which lets the handler see its own filter.
        let found = Arc::new(Mutex::new(Probe::default()));
        let reads = [
            libc::SYS_openat,
            libc::SYS_read,
            libc::SYS_statx,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_lseek,
        ]
        .map(|nr| Allowed::any(nr, "the probe handler reads files"));
        let out = run_image(b.hv.as_ref(), guest("demo"), "", probing_table(found.clone()), |v| {
            v.seccomp_allow(reads.clone())
        });
        out.expect_status(RunStatus::AllHalted, &b.name);
        let p = found.lock().unwrap().clone();
        assert_eq!((p.open_file, p.socket, p.spawn), (None, EPERM, EPERM), "{}: {p:?}", b.name);
        let status = p.own_status.unwrap_or_default();
        assert!(status.contains("Seccomp:\t2"), "{}: the filter in /proc:\n{status}", b.name);

        // Off: nothing refused (for debugging only).
        let found = Arc::new(Mutex::new(Probe::default()));
        let out = run_image(b.hv.as_ref(), guest("demo"), "", probing_table(found.clone()), |v| {
            v.seccomp(Seccomp::Off)
        });
        out.expect_status(RunStatus::AllHalted, &b.name);
        let p = found.lock().unwrap().clone();
        assert_eq!((p.open_file, p.socket), (None, None), "{}: {p:?}", b.name);
    }
}

/// Seen from outside, while a handler holds its vCPU thread: the filter is on that thread.
/// (The thread is found by the id the handler reports, not by its name: other tests of this
/// binary run VMs of their own, whose `vcpu0` threads may not have their filter yet.)
#[test]
fn proc_shows_the_filter_on_a_running_vcpu_thread() {
    for b in backends("proc_shows_the_filter_on_a_running_vcpu_thread") {
        let (entered_tx, entered) = mpsc::channel::<i32>();
        let (go, go_rx) = mpsc::channel::<()>();
        let (entered_tx, go_rx) = (Mutex::new(entered_tx), Mutex::new(go_rx));
        let t = Arc::new(HypercallTable::new());
        t.register(20, "hold", move |_: &Call<'_>| {
            // SAFETY: gettid has no preconditions (and the vCPU filter allows it).
            let tid = unsafe { libc::gettid() };
            entered_tx.lock().unwrap().send(tid).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
            Ok(42)
        })
        .unwrap();
        std::thread::scope(|s| {
            let runner = s.spawn(|| run_image(b.hv.as_ref(), guest("demo"), "", t.clone(), |v| v));
            let tid = entered.recv().unwrap();
            let (comm, mode, filters) = seccomp_of_thread(tid);
            go.send(()).unwrap();
            assert_eq!(comm, "vcpu0", "{}: the handler ran on thread {tid}", b.name);
            assert_eq!(mode, "2", "{}: Seccomp: (2 = filter)", b.name);
            assert_ne!(filters, "0", "{}", b.name);
            runner.join().unwrap().expect_status(RunStatus::AllHalted, &b.name);
        });
    }
}

/// `Seccomp::AllThreads` confines the thread that ran the VM too, for
/// good: afterwards it cannot open a file.
#[test]
fn all_threads_confines_the_caller_after_the_run() {
    for b in backends("all_threads_confines_the_caller_after_the_run") {
        let table = Arc::new(HypercallTable::new());
        table.register(20, "inc", |c: &Call<'_>| Ok(c.args[0] + 1)).unwrap();
        let hv = b.hv.as_ref();
        let (status, open) = std::thread::scope(|s| {
            s.spawn(|| {
                let out = run_image(hv, guest("demo"), "", table.clone(), |v| {
                    v.seccomp(Seccomp::AllThreads)
                });
                (out.result.ok(), os_error(std::fs::File::open("/etc/hostname")))
            })
            .join()
            .unwrap()
        });
        assert_eq!(status, Some(RunStatus::AllHalted), "{}", b.name);
        assert_eq!(open, Some(libc::EPERM), "{}: the caller's thread is confined", b.name);
        // This thread, which never ran a VM, is not.
        assert!(std::fs::File::open("/etc/hostname").is_ok());
    }
}
