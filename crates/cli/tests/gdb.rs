//! `vmcall run --gdb PORT` driven by a real gdb in batch mode (docs/gdb.md): a breakpoint on a
//! function, continue, RIP and a variable read, a breakpoint on a VMCALL, a single step over
//! it with RAX holding the handler's answer, a hypercall catch, and the guest's exit as gdb
//! sees it — on the software CPU and on KVM. Skips visibly where gdb is not installed
//! (CI installs it: scripts/install-deps.sh).
#![cfg(feature = "gdb")]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;

use common::{bin, kvm_available};

/// Every gdb session and every VM here ends within this long.
const TIMEOUT: Duration = Duration::from_secs(90);

fn skip(msg: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {msg}");
}

fn gdb_installed() -> bool {
    Command::new("gdb").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// A `vmcall run --gdb 0` in the background, and the address it listens on.
struct Vm {
    child: Child,
    addr: String,
    stderr: mpsc::Receiver<String>,
}

impl Vm {
    fn start(backend: &str, extra: &[&str]) -> Vm {
        let guest = vmcall_test_guests::C_GDB;
        let mut args = vec!["run", guest, "--hypercall", "20=const:1234"];
        args.extend(extra);
        Vm::spawn(backend, &args)
    }

    /// `vmcall ARGS --backend B --gdb 0 --timeout ...`.
    fn spawn(backend: &str, args: &[&str]) -> Vm {
        Vm::spawn_with_timeout(backend, args, TIMEOUT)
    }

    /// The same with the VM's own `--timeout`.
    fn spawn_with_timeout(backend: &str, args: &[&str], timeout: Duration) -> Vm {
        let timeout = format!("{}ms", timeout.as_millis());
        let mut child = Command::new(bin())
            .args(args)
            .args(["--backend", backend, "--gdb", "0", "--timeout", &timeout])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmcall");
        // The address comes on stderr; the rest of stderr is kept for the assertions.
        let (tx, rx) = mpsc::channel();
        let mut err = BufReader::new(child.stderr.take().expect("piped"));
        std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).is_ok_and(|n| n > 0) {
                if tx.send(std::mem::take(&mut line)).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut seen = String::new();
        while addr.is_none() {
            let Ok(line) = rx.recv_timeout(TIMEOUT) else {
                let _ = child.kill();
                panic!("vmcall never said where it waits for gdb:\n{seen}");
            };
            seen += &line;
            addr = line
                .split_whitespace()
                .find(|w| w.starts_with("127.0.0.1:"))
                .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_digit()).to_string());
        }
        Vm { child, addr: addr.expect("found"), stderr: rx }
    }

    /// Wait for the VM to end: its status, stdout and stderr.
    fn finish(mut self) -> (Option<i32>, String, String) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("vmcall did not end after gdb finished");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        let _ = self.child.stdout.take().expect("piped").read_to_string(&mut out);
        let err: String = self.stderr.try_iter().collect();
        (status, out, err)
    }
}

/// Run gdb in batch mode with `commands` against `vm`; its stdout and stderr together.
fn gdb(vm: &Vm, commands: &[&str]) -> String {
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-ex", "set pagination off", "-ex"])
        .arg(format!("file {}", vmcall_test_guests::C_GDB))
        .args(["-ex", &format!("target remote {}", vm.addr)]);
    for c in commands {
        cmd.args(["-ex", c]);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start gdb");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while child.try_wait().expect("wait for gdb").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("gdb did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut text = String::new();
    let _ = child.stdout.take().expect("piped").read_to_string(&mut text);
    let _ = child.stderr.take().expect("piped").read_to_string(&mut text);
    text
}

/// The value gdb printed for history entry `$n` (e.g. "$3 = 0x20010a" gives "0x20010a").
fn value(out: &str, n: u32) -> String {
    let key = format!("${n} = ");
    out.lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("gdb printed no {key}in:\n{out}"))
        .trim()
        .to_string()
}

/// The address of `symbol` in the test guest, as gdb reads its symbol table.
fn symbol(out: &str, n: u32) -> u64 {
    let v = value(out, n);
    let hex = v.split_whitespace().next().unwrap_or_default();
    u64::from_str_radix(hex.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("not an address: {v}"))
}

/// The session of issue #14: break, continue, read RIP and a variable, step over a VMCALL.
fn session(backend: &str) {
    // Two vCPUs: two gdb threads (vCPU 1 halts at once; its registers are read as of its HLT).
    let vm = Vm::start(backend, &["--vcpus", "2"]);
    let out = gdb(
        &vm,
        &[
            "break gdb_mark",
            "continue",
            "p/x $rip",          // $1: at gdb_mark
            "p/x &gdb_mark",     // $2
            "finish",            // back in gdb_main: gdb_counter is set
            "p gdb_counter",     // $3 (finish prints "Run till exit", no history value)
            "break *gdb_vmcall", // a breakpoint right on the VMCALL
            "continue",
            "p/x $rip",        // $4: at the VMCALL
            "p/x &gdb_vmcall", // $5
            "p $rax",          // $6: the hypercall number
            "stepi",           // over the VMCALL: answered by the handler
            "p $rax",          // $7: the handler's answer
            "p/x $rip",        // $8: right after the 3-byte VMCALL
            "info threads",
            "continue",
        ],
    );
    let rip_at_mark = symbol(&out, 1);
    assert_eq!(rip_at_mark, symbol(&out, 2), "stopped at gdb_mark:\n{out}");
    assert!(out.contains("Breakpoint 1, gdb_mark"), "{out}");
    assert_eq!(value(&out, 3), "42", "gdb_counter after gdb_mark(42):\n{out}");
    assert_eq!(symbol(&out, 4), symbol(&out, 5), "stopped at the VMCALL:\n{out}");
    assert_eq!(value(&out, 6), "20", "RAX holds the hypercall number before the step:\n{out}");
    assert_eq!(value(&out, 7), "1234", "RAX holds the handler's answer after the step:\n{out}");
    assert_eq!(symbol(&out, 8), symbol(&out, 5) + 3, "RIP is past the VMCALL:\n{out}");
    assert!(out.contains("(vCPU 0)") && out.contains("(vCPU 1)"), "a thread per vCPU:\n{out}");
    assert!(out.contains("exited with code 07"), "gdb sees the guest's exit:\n{out}");
    let (status, stdout, stderr) = vm.finish();
    assert_eq!(status, Some(7), "the guest's status:\n{stderr}");
    assert!(stdout.contains("gdb guest: answer 1234"), "{stdout}");
}

/// `--gdb-break-on-hypercall 20` stops just before the hypercall is answered; gdb's
/// `catch syscall 20` does the same; and a detach lets the guest run on to its end.
fn catch_and_detach(backend: &str) {
    let vm = Vm::start(backend, &["--gdb-break-on-hypercall", "20"]);
    let out = gdb(
        &vm,
        &[
            "continue",
            "p/x $rip",        // $1: at the VMCALL, not yet answered
            "p/x &gdb_vmcall", // $2
            "p $rax",          // $3: still the number
            "p gdb_answer",    // $4: nothing stored yet
            "detach",
        ],
    );
    assert_eq!(symbol(&out, 1), symbol(&out, 2), "stopped before the hypercall:\n{out}");
    assert_eq!(value(&out, 3), "20", "{out}");
    assert_eq!(value(&out, 4), "0", "{out}");
    let (status, stdout, stderr) = vm.finish();
    assert_eq!(status, Some(7), "the guest ran on after the detach:\n{stderr}");
    assert!(stdout.contains("gdb guest: answer 1234"), "{stdout}");

    // The monitor command does what the flag does.
    let vm = Vm::start(backend, &[]);
    let out = gdb(
        &vm,
        &["monitor break-hypercall 20", "continue", "p/x $rip", "p/x &gdb_vmcall", "detach"],
    );
    assert!(out.contains("hypercall 20 stops the guest"), "{out}");
    assert_eq!(symbol(&out, 1), symbol(&out, 2), "stopped before the hypercall:\n{out}");
    assert_eq!(vm.finish().0, Some(7));

    let vm = Vm::start(backend, &[]);
    let out = gdb(&vm, &["catch syscall 20", "continue", "p/x $rip", "p/x &gdb_vmcall", "kill"]);
    // gdb names the number after Linux's system call of that number (writev, for 20).
    assert!(out.contains("Catchpoint 1 (call to syscall"), "{out}");
    assert!(out.contains("[20]"), "{out}");
    assert_eq!(symbol(&out, 1), symbol(&out, 2), "caught at the VMCALL:\n{out}");
    let (_, stdout, stderr) = vm.finish();
    assert!(
        !stdout.contains("gdb guest: answer"),
        "kill stopped the guest first: {stdout}\n{stderr}\ngdb:\n{out}"
    );
}

/// A raw gdb remote-protocol exchange: send `data` as a packet, return the reply's payload.
fn packet(conn: &mut std::net::TcpStream, data: &str) -> String {
    let sum = data.bytes().fold(0u8, |s, b| s.wrapping_add(b));
    conn.write_all(format!("${data}#{sum:02x}").as_bytes()).expect("send");
    reply(conn)
}

/// The next packet from the stub (acknowledged), skipping its acks.
fn reply(conn: &mut std::net::TcpStream) -> String {
    let mut byte = [0u8; 1];
    loop {
        conn.read_exact(&mut byte).expect("read");
        if byte[0] == b'$' {
            break;
        }
    }
    let mut payload = Vec::new();
    loop {
        conn.read_exact(&mut byte).expect("read");
        if byte[0] == b'#' {
            break;
        }
        payload.push(byte[0]);
    }
    let mut sum = [0u8; 2];
    conn.read_exact(&mut sum).expect("read");
    conn.write_all(b"+").expect("ack");
    String::from_utf8_lossy(&payload).into_owned()
}

/// Undo the remote protocol's run-length encoding ("X*N": N - 29 more copies of X).
fn unrle(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '*' {
            let n = chars.next().map_or(0, |n| n as usize - 29);
            let last = out.chars().last().unwrap_or('0');
            out.extend(std::iter::repeat_n(last, n));
        } else {
            out.push(c);
        }
    }
    out
}

/// The `Seccomp:` field (2: a filter) of process `pid`'s thread named `name`, if it has one.
fn seccomp_of_thread(pid: u32, name: &str) -> Option<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        if comm.trim() != name {
            return None;
        }
        let status = std::fs::read_to_string(task.path().join("status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(|v| v.trim().to_string())
    })
}

/// Ctrl-C (the 0x03 byte gdb sends) stops a guest that never stops by itself, its registers
/// can be read, and a detach lets it run on.
fn interrupt(backend: &str) {
    let vm = Vm::spawn(backend, &["demo", "--loop"]);
    let mut conn = std::net::TcpStream::connect(&vm.addr).expect("connect");
    conn.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    assert!(packet(&mut conn, "?").starts_with("T05"), "stopped before the first instruction");
    // The stub's thread parses what arrives on the connection under its own seccomp filter.
    assert_eq!(seccomp_of_thread(vm.child.id(), "gdb"), Some("2".into()), "{backend}");
    conn.write_all(b"$c#63").expect("continue");
    std::thread::sleep(Duration::from_millis(300));
    conn.write_all(&[0x03]).expect("Ctrl-C");
    let stop = reply(&mut conn);
    assert!(stop.starts_with("T02"), "SIGINT stop, got {stop}");
    let regs = unrle(&packet(&mut conn, "g"));
    // 16 GPRs and RIP, 16 hex digits each; RIP (little-endian) is somewhere in the guest.
    assert!(regs.len() >= 17 * 16, "registers: {regs}");
    let rip = u64::from_str_radix(&regs[16 * 16..17 * 16], 16).expect("hex").swap_bytes();
    assert!(rip >= 0x20_0000, "RIP {rip:#x} is in the guest's code");
    assert_eq!(packet(&mut conn, "D"), "OK");
    drop(conn);
    let mut vm = vm;
    std::thread::sleep(Duration::from_millis(300));
    if vm.child.try_wait().expect("wait").is_some() {
        let (status, out, err) = vm.finish();
        panic!("the guest did not run on after the detach: status {status:?}\n{out}\n{err}");
    }
    let _ = vm.child.kill();
    let _ = vm.child.wait();
}

/// A guest spinning without exits (`jmp .` written over its first instruction) stops on
/// Ctrl-C too: on KVM the stub kicks each vCPU out of KVM_RUN with a signal, which its seccomp
/// filter must let through. And the stub acknowledges `c` at once, before the guest stops
/// (gdb waits for that `+`, and resends the packet after 2 s without it).
fn interrupt_spinning(backend: &str) {
    let vm = Vm::spawn(backend, &["demo", "--loop"]);
    let mut conn = std::net::TcpStream::connect(&vm.addr).expect("connect");
    let rip = spin_and_continue(&mut conn);
    conn.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut ack = [0u8; 1];
    conn.read_exact(&mut ack).expect("the `+` for `c` comes while the guest runs");
    assert_eq!(&ack, b"+");
    std::thread::sleep(Duration::from_millis(300));
    conn.write_all(&[0x03]).expect("Ctrl-C");
    conn.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let stop = reply(&mut conn);
    assert!(stop.starts_with("T02"), "SIGINT stop, got {stop}");
    let regs = unrle(&packet(&mut conn, "g"));
    let now = u64::from_str_radix(&regs[16 * 16..17 * 16], 16).expect("hex").swap_bytes();
    assert_eq!(now, rip, "stopped on the jmp");
    drop(conn);
    let mut vm = vm;
    let _ = vm.child.kill();
    let _ = vm.child.wait();
}

/// Write `jmp .` over the stopped guest's next instruction and continue it: its RIP.
fn spin_and_continue(conn: &mut std::net::TcpStream) -> u64 {
    conn.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    assert!(packet(conn, "?").starts_with("T05"), "stopped before the first instruction");
    let regs = unrle(&packet(conn, "g"));
    let rip = u64::from_str_radix(&regs[16 * 16..17 * 16], 16).expect("hex").swap_bytes();
    assert_eq!(packet(conn, &format!("M{rip:x},2:ebfe")), "OK", "jmp . at RIP {rip:#x}");
    conn.write_all(b"$c#63").expect("continue");
    rip
}

/// A stop that comes while gdb sends nothing — here the VM's own timeout, long after the
/// stub started watching the connection — reaches gdb (the stub must not sit in a blocking
/// read meanwhile).
fn stop_without_input(backend: &str) {
    let vm = Vm::spawn_with_timeout(backend, &["demo", "--loop"], Duration::from_secs(2));
    let mut conn = std::net::TcpStream::connect(&vm.addr).expect("connect");
    spin_and_continue(&mut conn);
    conn.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let stop = reply(&mut conn);
    assert!(stop.starts_with('X'), "the run's end, as gdb's `X` (killed) stop: got {stop}");
    let (status, _, err) = vm.finish();
    assert_eq!(status, Some(124), "the timeout's status\n{err}");
}

#[test]
fn gdb_hears_of_a_stop_it_did_not_ask_for_on_the_emulator() {
    stop_without_input("emu");
}

#[test]
fn gdb_hears_of_a_stop_it_did_not_ask_for_on_kvm() {
    if !kvm_available("gdb_hears_of_a_stop_it_did_not_ask_for_on_kvm") {
        return;
    }
    stop_without_input("kvm");
}

#[test]
fn gdb_interrupts_a_spinning_guest_on_the_emulator() {
    interrupt_spinning("emu");
}

#[test]
fn gdb_interrupts_a_spinning_guest_on_kvm() {
    if !kvm_available("gdb_interrupts_a_spinning_guest_on_kvm") {
        return;
    }
    interrupt_spinning("kvm");
}

/// A write watchpoint stops after the write, with the new value in memory.
#[test]
fn gdb_watchpoint_on_the_emulator() {
    if !gdb_installed() {
        return skip("gdb_watchpoint_on_the_emulator: gdb is not installed");
    }
    let vm = Vm::start("emu", &[]);
    let out = gdb(&vm, &["watch gdb_answer", "continue", "p gdb_answer", "p/x $rip", "continue"]);
    assert!(out.contains("Hardware watchpoint 1: gdb_answer"), "{out}");
    assert!(out.contains("New value = 1234"), "{out}");
    assert_eq!(value(&out, 1), "1234", "{out}");
    assert!(out.contains("exited with code 07"), "{out}");
    assert_eq!(vm.finish().0, Some(7));
}

#[test]
fn gdb_interrupt_on_the_emulator() {
    interrupt("emu");
}

#[test]
fn gdb_interrupt_on_kvm() {
    if !kvm_available("gdb_interrupt_on_kvm") {
        return;
    }
    interrupt("kvm");
}

#[test]
fn gdb_session_on_the_emulator() {
    if !gdb_installed() {
        return skip("gdb_session_on_the_emulator: gdb is not installed (apt-get install gdb)");
    }
    session("emu");
}

#[test]
fn gdb_session_on_kvm() {
    if !gdb_installed() {
        return skip("gdb_session_on_kvm: gdb is not installed (apt-get install gdb)");
    }
    if !kvm_available("gdb_session_on_kvm") {
        return;
    }
    session("kvm");
}

#[test]
fn gdb_catches_hypercalls_and_detaches_on_the_emulator() {
    if !gdb_installed() {
        return skip("gdb_catches_hypercalls_and_detaches_on_the_emulator: gdb is not installed");
    }
    catch_and_detach("emu");
}

#[test]
fn gdb_catches_hypercalls_and_detaches_on_kvm() {
    if !gdb_installed() {
        return skip("gdb_catches_hypercalls_and_detaches_on_kvm: gdb is not installed");
    }
    if !kvm_available("gdb_catches_hypercalls_and_detaches_on_kvm") {
        return;
    }
    catch_and_detach("kvm");
}
