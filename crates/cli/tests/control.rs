//! The control socket end to end: `vmcall run --control` with a guest that loops calling
//! hypercall 20, driven by `vmcall ctl` and by raw protocol lines; bad requests, unreachable and
//! foreign sockets; SIGTERM; and the swap under load that must lose and repeat no call.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{bin, guest, scratch, text};

fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin()).arg("ctl").arg(socket).args(args).output().expect("run vmcall ctl")
}

/// A `vmcall run` in the background, killed if the test ends early.
struct Vm {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Vm {
    fn start(dir: &Path, args: &[&str]) -> Vm {
        Vm::start_cmd(dir, &["run"], args)
    }

    fn start_cmd(dir: &Path, cmd: &[&str], args: &[&str]) -> Vm {
        let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
        let child = Command::new(bin())
            .args(cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start vmcall run");
        Vm { child, stdout, stderr }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Wait until `cond` holds of its stdout (panics after 30 s).
    fn wait_stdout(&mut self, what: &str, cond: impl Fn(&str) -> bool) {
        let start = Instant::now();
        while !cond(&self.stdout()) {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("vmcall ended ({s}) before {what}:\n{}\n{}", self.stdout(), self.stderr());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no {what}:\n{}", self.stdout());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait for the control socket to accept connections.
    fn wait_socket(&mut self, socket: &Path) {
        let start = Instant::now();
        while UnixStream::connect(socket).is_err() {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("vmcall ended ({s}) before its socket was up:\n{}", self.stderr());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "socket never came up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait(&mut self) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(start.elapsed() < Duration::from_secs(60), "vmcall did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One connection speaking the protocol directly.
struct Conn {
    out: UnixStream,
    replies: BufReader<UnixStream>,
}

impl Conn {
    fn open(socket: &Path) -> Conn {
        let out = UnixStream::connect(socket).unwrap();
        out.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn { replies: BufReader::new(out.try_clone().unwrap()), out }
    }

    fn send_raw(&mut self, line: &[u8]) -> Option<Value> {
        // A refused connection gets its reply before the server reads anything: the write may
        // fail with the reply waiting.
        let _ = self.out.write_all(line);
        let mut reply = String::new();
        match self.replies.read_line(&mut reply) {
            Ok(n) if n > 0 => Some(serde_json::from_str(&reply).expect("replies are JSON")),
            _ => None,
        }
    }

    fn send(&mut self, req: &Value) -> Value {
        self.send_raw(format!("{req}\n").as_bytes()).expect("a reply")
    }
}

/// `key=value` words of the guest's `answers ...` line.
fn answers(stdout: &str) -> Vec<(String, u64)> {
    let line = stdout.lines().find(|l| l.starts_with("answers ")).expect("an answers line");
    line.split_whitespace()
        .skip(1)
        .map(|w| {
            let (k, v) = w.split_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn answer(stdout: &str, key: &str) -> u64 {
    answers(stdout).into_iter().find(|(k, _)| k == key).map_or(0, |(_, v)| v)
}

/// The README's headline scenario, as written there: `vmcall demo --loop --control PATH` runs a
/// guest that calls hypercall 20 forever, and `vmcall ctl` changes the answer while it runs — to
/// a constant, then to a WebAssembly module, then to the Python exec handler — reads the list,
/// the statistics and the trace switch, then stops it. On the software CPU and, where it is usable, KVM.
#[test]
fn ctl_changes_the_answer_of_a_running_guest() {
    let mut backends = vec!["emu"];
    if vmcall_kvm::KvmHypervisor::open(vmcall_kvm::Trap::Auto).is_ok() {
        backends.push("kvm");
    } else {
        eprintln!("SKIP ctl_changes_the_answer_of_a_running_guest on kvm: KVM unavailable");
    }
    for backend in backends {
        headline(backend);
    }
}

fn headline(backend: &str) {
    let dir = scratch(&format!("headline-{backend}"));
    let sock = dir.join("vm.sock");
    let stats = dir.join("stats.json");
    let mut vm = Vm::start_cmd(
        &dir,
        &["demo", "--loop", "--backend", backend, "--control", sock.to_str().unwrap()],
        &["--stats-json", stats.to_str().unwrap(), "--timeout", "120s"],
    );
    vm.wait_socket(&sock);
    vm.wait_stdout("the first answer", |o| o.contains("hypercall 20(7) -> 8 (call #1)"));
    let o = ctl(&sock, &["list"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("my_vmcall") && out.contains("native"), "{out}");

    let o = ctl(&sock, &["set", "20=const:2"]);
    assert_eq!(text(&o).0, "hypercall 20: const:2 (replaced my_vmcall)\n", "{:?}", text(&o));
    vm.wait_stdout("the new answer", |o| o.contains("hypercall 20(7) -> 2 "));

    // The seed's story: a new version of the hypercall, hot-loaded as WebAssembly.
    let v2 = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/handlers/v2.wat");
    let o = ctl(&sock, &["set", &format!("20=wasm:{v2}")]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    vm.wait_stdout("the wasm handler's answer", |o| o.contains("hypercall 20(7) -> 21 "));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/handlers/double.py");
    let o = ctl(&sock, &["set", &format!("20=exec:python3 {script}")]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    vm.wait_stdout("the Python handler's answer", |o| o.contains("hypercall 20(7) -> 14 "));

    let o = ctl(&sock, &["--json", "list"]);
    let list: Value = serde_json::from_str(&text(&o).0).unwrap();
    let n20 = list["handlers"].as_array().unwrap().iter().find(|h| h["nr"] == 20).unwrap();
    assert_eq!(n20["kind"], "exec", "{list}");
    assert!(n20["calls"].as_u64().unwrap() > 1, "{list}");

    let o = ctl(&sock, &["stats", "--json"]);
    let s: Value = serde_json::from_str(&text(&o).0).unwrap();
    let n20 = s["hypercalls"].as_array().unwrap().iter().find(|n| n["nr"] == 20).unwrap();
    let names: Vec<&str> =
        n20["handlers"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(&names[..2], ["my_vmcall", "const:2"], "{s}");
    let table = text(&ctl(&sock, &["stats"])).0;
    assert!(table.contains("by my_vmcall"), "{table}");
    // The same table as --stats: shares, one unit per column, a totals line.
    assert!(
        table.contains("calls%") && table.contains("time%") && table.contains("mean("),
        "{table}"
    );
    assert!(table.lines().any(|l| l.trim_start().starts_with("total ")), "{table}");

    assert_eq!(text(&ctl(&sock, &["trace", "on"])).0, "trace on\n");
    vm.wait_stdout("a trace", |_| vm_stderr_has(&dir, "vmcall: trace: hypercall vcpu=0 nr=0x14"));
    assert_eq!(text(&ctl(&sock, &["trace", "off"])).0, "trace off\n");

    let o = ctl(&sock, &["set", "1=const:5"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("use override"), "{:?}", text(&o));
    assert_eq!(ctl(&sock, &["override", "1=const:5"]).status.code(), Some(0));
    let o = ctl(&sock, &["remove", "20"]);
    assert!(text(&o).0.starts_with("hypercall 20: removed exec:python3"), "{:?}", text(&o));
    vm.wait_stdout("-KVM_ENOSYS", |o| o.contains("hypercall 20(7) -> -1000 "));
    let o = ctl(&sock, &["remove", "20"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("hypercall 20 has no custom handler"));

    assert_eq!(text(&ctl(&sock, &["stop"])).0, "stopping the VM\n");
    assert_eq!(vm.wait(), 0, "{}", vm.stderr());
    assert!(!sock.exists(), "the socket is removed at exit");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert!(doc["hypercalls"].as_array().unwrap().iter().any(|n| n["nr"] == 20), "{doc}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn vm_stderr_has(dir: &Path, what: &str) -> bool {
    std::fs::read_to_string(dir.join("stderr")).unwrap_or_default().contains(what)
}

/// THE swap under load: a guest on the software CPU makes millions of calls to 20, counting
/// the answers of each value, while this test swaps 20's handler between const:1 and const:2
/// 1000 times through the socket. No call may be lost or repeated: the guest's total, the calls
/// it made and vmcall's count agree, and so does the split by handler.
#[test]
fn swapping_under_load_loses_and_repeats_no_call() {
    const CALLS: u64 = 4_000_000;
    const SWAPS: u64 = 1000;
    let dir = scratch("swap");
    let sock = dir.join("vm.sock");
    let stats = dir.join("stats.json");
    let mut vm = Vm::start(
        &dir,
        &[
            guest("hcloop"),
            "--backend",
            "emu",
            "--hypercall",
            "20=const:1",
            "--control",
            sock.to_str().unwrap(),
            "--stats-json",
            stats.to_str().unwrap(),
            "--timeout",
            "120s",
            "--",
            &CALLS.to_string(),
            "20",
            "7",
            "quiet",
        ],
    );
    vm.wait_socket(&sock);
    let mut conn = Conn::open(&sock);
    let calls_now = |conn: &mut Conn| -> u64 {
        let r = conn.send(&json!({"cmd": "list"}));
        r["handlers"][0]["calls"].as_u64().unwrap()
    };
    let mut first = calls_now(&mut conn);
    while first == 0 {
        std::thread::sleep(Duration::from_millis(5));
        first = calls_now(&mut conn);
    }
    let start = Instant::now();
    let mut set_times = Vec::new();
    for i in 0..SWAPS {
        let value = if i % 2 == 0 { 2 } else { 1 };
        let t = Instant::now();
        let r = conn.send(&json!({"cmd": "set", "nr": 20, "handler": format!("const:{value}")}));
        set_times.push(t.elapsed());
        assert_eq!(r["ok"], true, "{r}");
        std::thread::sleep(Duration::from_micros(300));
    }
    let swapping = start.elapsed();
    let last = calls_now(&mut conn);
    assert!(
        first > 0 && last < CALLS,
        "the guest must be calling during all the swaps: {first} calls before, {last} after"
    );
    let status = vm.wait();
    let out = vm.stdout();
    assert_eq!(status, 0, "{out}\n{}", vm.stderr());
    let (one, two) = (answer(&out, "1"), answer(&out, "2"));
    assert_eq!(answer(&out, "calls"), CALLS, "{out}");
    assert_eq!(answer(&out, "other"), 0, "{out}");
    assert_eq!(answers(&out).len(), 4, "only 1s and 2s: {out}");
    assert_eq!(one + two, CALLS, "answers lost or repeated: {out}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let n20 = &doc["hypercalls"][0];
    assert_eq!((n20["nr"].as_u64(), n20["count"].as_u64()), (Some(20), Some(CALLS)), "{doc}");
    let by = |name: &str| {
        n20["handlers"].as_array().unwrap().iter().find(|h| h["name"] == name).unwrap()["count"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((by("const:1"), by("const:2")), (one, two), "vmcall's split: {n20}");
    let rate = CALLS as f64 / doc["elapsed_s"].as_f64().unwrap();
    set_times.sort();
    eprintln!(
        "swap under load: {CALLS} calls at {:.0}/s, {SWAPS} swaps in {swapping:?} ({} calls \
         during them), set round trip median {:?}, p99 {:?}; answers 1={one} 2={two}",
        rate,
        last - first,
        set_times[set_times.len() / 2],
        set_times[set_times.len() * 99 / 100],
    );
    assert!(rate >= 100_000.0, "the guest made only {rate:.0} calls/s");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Garbage, unknown commands and fields, bad numbers and oversized lines get error replies;
/// the VM runs on and the socket keeps answering.
#[test]
fn bad_requests_get_errors_and_never_disturb_the_vm() {
    let dir = scratch("bad");
    let sock = dir.join("vm.sock");
    let mut vm = Vm::start(
        &dir,
        &[
            guest("hcloop"),
            "--backend",
            "emu",
            "--hypercall",
            "20=const:1",
            "--control",
            sock.to_str().unwrap(),
            "--timeout",
            "60s",
        ],
    );
    vm.wait_socket(&sock);
    let mut conn = Conn::open(&sock);
    for (line, want) in [
        (&b"garbage\n"[..], "not a JSON object"),
        (b"\xff\xfe\n", "not UTF-8"),
        (b"[]\n", "a request is a JSON object"),
        (b"{\"cmd\":\"format-disk\"}\n", "unknown command"),
        (b"{\"cmd\":\"list\",\"verbose\":true}\n", "unknown field \"verbose\""),
        (b"{\"cmd\":\"set\",\"nr\":-5,\"handler\":\"const:1\"}\n", "not a hypercall number"),
        (b"{\"cmd\":\"set\",\"nr\":\"0xZZ\",\"handler\":\"const:1\"}\n", "not a number"),
        (b"{\"cmd\":\"set\",\"nr\":20,\"handler\":\"rm -rf /\"}\n", "unknown handler kind"),
        (b"{\"cmd\":\"remove\"}\n", "remove needs \"nr\""),
    ] {
        let r = conn.send_raw(line).expect("a reply");
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().unwrap().contains(want), "{want}: {r}");
    }
    // A line beyond the limit: an error, then the server closes this connection.
    let mut huge = vec![b'x'; 70 * 1024];
    huge.push(b'\n');
    let r = conn.send_raw(&huge).expect("a reply");
    assert!(r["error"].as_str().unwrap().contains("longer than 65536 bytes"), "{r}");
    let mut rest = Vec::new();
    let _ = conn.replies.read_to_end(&mut rest);
    // Many connections at once: beyond 8 they are refused, and none of them hurts.
    let mut open = Vec::new();
    let refused = loop {
        let mut c = Conn::open(&sock);
        let r = c.send(&json!({"cmd": "list"}));
        if r["ok"] == false {
            break r;
        }
        open.push(c);
        assert!(open.len() <= 8, "more than 8 connections served at once");
    };
    assert!(refused["error"].as_str().unwrap().contains("busy"), "{refused}");
    drop(open);
    std::thread::sleep(Duration::from_millis(200));
    let mut conn = Conn::open(&sock);
    let mut calls = || conn.send(&json!({"cmd": "list"}))["handlers"][0]["calls"].as_u64().unwrap();
    let (before, start) = (calls(), Instant::now());
    while calls() == before {
        assert!(start.elapsed() < Duration::from_secs(10), "the guest stopped calling");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(vm.child.try_wait().unwrap().is_none(), "the VM runs on");
    assert_eq!(conn.send(&json!({"cmd": "stop"}))["ok"], true);
    assert_eq!(vm.wait(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctl_says_clearly_when_it_cannot_reach_a_vm() {
    let dir = scratch("unreachable");
    let check = |path: &Path, args: &[&str], code: i32, want: &str| {
        let o = ctl(path, args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {:?}", text(&o));
        assert!(text(&o).1.contains(want), "{args:?}: want {want:?} in {:?}", text(&o).1);
    };
    let missing = dir.join("missing.sock");
    check(&missing, &["list"], 1, "no control socket at");
    // A dead socket: bound, then its listener gone.
    let dead = dir.join("dead.sock");
    drop(UnixListener::bind(&dead).unwrap());
    check(&dead, &["list"], 1, "nobody is listening");
    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    check(&file, &["list"], 1, "is not a socket");
    // A socket that is not vmcall's: it answers something else, or nothing.
    let foreign = dir.join("foreign.sock");
    let l = UnixListener::bind(&foreign).unwrap();
    let server = std::thread::spawn(move || {
        for (i, c) in l.incoming().take(2).enumerate() {
            let mut c = c.unwrap();
            let mut buf = [0u8; 64];
            let _ = c.read(&mut buf);
            if i == 0 {
                let _ = c.write_all(b"220 smtp ready\n");
            }
        }
    });
    check(&foreign, &["list"], 1, "is not a vmcall control socket");
    check(&foreign, &["stats"], 1, "closed the connection without a reply");
    server.join().unwrap();
    // Usage errors: status 2, before anything is sent.
    check(&missing, &["set", "20"], 2, "set takes NR=KIND");
    check(&missing, &["trace", "maybe"], 2, "invalid value 'maybe'");
    check(&missing, &["frobnicate"], 2, "unexpected argument 'frobnicate'");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The socket's own rules: mode 0600, never clobber a live one or a non-socket, replace a stale
/// one, a default path under $XDG_RUNTIME_DIR, removed at exit; and peers of another uid are
/// refused (checked where the test runs as root and can be another user).
#[test]
fn control_sockets_are_private_and_never_clobbered() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("private");
    let sock = dir.join("vm.sock");
    let args = |s: &Path| -> Vec<String> {
        [guest("hcloop"), "--backend", "emu", "--hypercall", "20=const:1", "--timeout", "60s"]
            .iter()
            .map(|a| a.to_string())
            .chain(["--control".to_string(), s.display().to_string()])
            .collect()
    };
    let argv = args(&sock);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut vm = Vm::start(&dir, &argv);
    vm.wait_socket(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let o = Command::new(bin()).arg("run").args(&argv).output().unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o).1.contains("is in use"), "{}", text(&o).1);
    let file = dir.join("file");
    std::fs::write(&file, "precious").unwrap();
    let argv2 = args(&file);
    let o = Command::new(bin()).arg("run").args(&argv2).output().unwrap();
    assert!(text(&o).1.contains("exists and is not a socket"), "{}", text(&o).1);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");

    if rustix::process::getuid().is_root() {
        use std::os::unix::process::CommandExt;
        let as_nobody = |args: &[&str]| {
            Command::new(bin()).arg("ctl").arg(&sock).args(args).uid(65534).gid(65534).output()
        };
        match as_nobody(&["list"]) {
            Ok(o) => {
                assert_eq!(o.status.code(), Some(1));
                assert!(text(&o).1.contains("belongs to another user"), "{}", text(&o).1);
                // Even with the file opened up, the server refuses the peer by its uid.
                std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
                let o = as_nobody(&["list"]).unwrap();
                assert_eq!(o.status.code(), Some(1));
                assert!(text(&o).1.contains("serves uid 0 only, not uid 65534"), "{:?}", text(&o));
            }
            Err(e) => eprintln!("SKIP foreign-uid peers: cannot run vmcall as uid 65534: {e}"),
        }
    } else {
        eprintln!("SKIP foreign-uid peers: needs root to act as another user");
    }
    assert_eq!(ctl(&sock, &["stop"]).status.code(), Some(0));
    assert_eq!(vm.wait(), 0);
    assert!(!sock.exists());

    // A stale socket is replaced; the default path is under $XDG_RUNTIME_DIR.
    drop(UnixListener::bind(&sock).unwrap());
    let mut vm = Vm::start(&dir, &argv);
    vm.wait_socket(&sock);
    assert_eq!(ctl(&sock, &["stop"]).status.code(), Some(0));
    assert_eq!(vm.wait(), 0);

    let run_dir = dir.join("xdg");
    std::fs::create_dir(&run_dir).unwrap();
    let mut child = Command::new(bin())
        .args([
            "run",
            guest("hcloop"),
            "--backend",
            "emu",
            "--hypercall",
            "20=const:1",
            "--control",
        ])
        .args(["--timeout", "60s"])
        .env("XDG_RUNTIME_DIR", &run_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let default = run_dir.join("vmcall").join(format!("{}.sock", child.id()));
    let start = Instant::now();
    while UnixStream::connect(&default).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "no socket at {}", default.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    let dmode = std::fs::metadata(run_dir.join("vmcall")).unwrap().permissions().mode() & 0o777;
    assert_eq!(dmode, 0o700);
    assert_eq!(ctl(&default, &["stop"]).status.code(), Some(0));
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(!default.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM stops the VM through the normal end of a run: statistics printed and written —
/// even when its control socket file was deleted under it.
#[test]
fn sigterm_stops_the_vm_and_still_reports() {
    let dir = scratch("sigterm");
    let stats = dir.join("stats.json");
    let sock = dir.join("vm.sock");
    let mut vm = Vm::start(
        &dir,
        &[
            guest("hcloop"),
            "--backend",
            "emu",
            "--control",
            sock.to_str().unwrap(),
            "--hypercall",
            "20=const:1",
            "--stats",
            "--stats-json",
            stats.to_str().unwrap(),
            "--timeout",
            "60s",
        ],
    );
    vm.wait_stdout("the guest running", |o| o.contains("-> 1 (call #1)"));
    vm.wait_socket(&sock);
    std::fs::remove_file(&sock).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let kill = Command::new("kill").args(["-TERM", &vm.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    assert_eq!(vm.wait(), 143, "128 + SIGTERM");
    let err = vm.stderr();
    assert!(err.contains("SIGTERM: stopping the VM") && err.contains("const:1"), "{err}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert!(doc["hypercalls"][0]["count"].as_u64().unwrap() > 0, "{doc}");
    let _ = std::fs::remove_dir_all(&dir);
}
