//! `exec:CMD` handlers: an external process answering hypercalls, one JSON line per call on its
//! stdin and stdout (docs/hypercalls.md, "External-process handlers").
//!
//! The process is started through `sh -c CMD` on the first call, in its own process group, and
//! kept for the following ones; calls from several vCPUs are serialised on a mutex. A line
//! `{"nr":20,"args":[a0,a1,a2,a3],"vcpu":0,"mode":"64-bit"}` goes to its stdin and one line
//! `{"ret":N}` (N a u64, or a negative i64) must come back within the deadline. A process that
//! cannot start, dies, answers late or answers garbage is killed, reported on stderr once, and
//! the call gets -KVM_EFAULT; the next call starts it again, after a growing pause, and after
//! [`MAX_FAILURES`] failures in a row the handler gives up until it is replaced.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmcall_abi::errno::KVM_EFAULT;
use vmcall_vmm::hypercall::{Call, HypercallError, HypercallHandler, HypercallResult};

/// How long a call waits for the process's answer unless `--exec-deadline` says otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(1);
/// Failures in a row (without an answer in between) after which the handler gives up.
pub const MAX_FAILURES: u32 = 5;
/// Longest answer line accepted.
pub const MAX_LINE: usize = 4096;

/// The pause before restart number `failures` (counted from 1): none after the first failure,
/// then 100 ms, doubling.
fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(100 << (n - 2).min(6)),
    }
}

/// An `exec:` handler.
#[derive(Debug)]
pub struct ExecHandler {
    nr: u64,
    cmd: String,
    deadline: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    proc: Option<Proc>,
    /// Failures since the last good answer.
    failures: u32,
    /// No restart before this.
    retry_at: Option<Instant>,
}

#[derive(Debug)]
struct Proc {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Result<String, String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The whole group: `sh -c` may have started the command as its own child.
        let _ = rustix::process::kill_process_group(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::KILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ExecHandler {
    pub fn new(nr: u64, cmd: &str, deadline: Duration) -> Self {
        Self { nr, cmd: cmd.to_string(), deadline, state: Mutex::default() }
    }

    fn start(&self) -> Result<Proc, String> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start it: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("exec-{}", self.nr))
            .spawn(move || read_lines(stdout, &tx))
            .map_err(|e| format!("cannot start its reader thread: {e}"))?;
        Ok(Proc { child, stdin, lines })
    }

    /// One exchange with a running process.
    fn exchange(&self, proc: &mut Proc, c: &Call<'_>) -> Result<u64, String> {
        // A line nobody asked for means the process is out of step with the calls.
        if let Ok(extra) = proc.lines.try_recv() {
            return Err(match extra {
                Ok(line) => format!("answered without a call: {}", shorten(&line)),
                Err(e) => e,
            });
        }
        let [a0, a1, a2, a3] = c.args;
        let request = format!(
            "{{\"nr\":{},\"args\":[{a0},{a1},{a2},{a3}],\"vcpu\":{},\"mode\":\"{}\"}}\n",
            c.nr,
            c.vcpu_id,
            c.mode.name()
        );
        if let Err(e) = proc.stdin.write_all(request.as_bytes()).and_then(|()| proc.stdin.flush()) {
            return Err(format!("cannot write the call to it ({e}){}", exit_status(proc)));
        }
        match proc.lines.recv_timeout(self.deadline) {
            Ok(Ok(line)) => parse_reply(&line),
            Ok(Err(e)) => Err(format!("{e}{}", exit_status(proc))),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("no answer within {:?} (the per-call deadline)", self.deadline))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(format!("closed its output{}", exit_status(proc)))
            }
        }
    }

    fn fail(&self, state: &mut State, why: &str) {
        state.proc = None; // kills it
        state.failures += 1;
        let then = if state.failures >= MAX_FAILURES {
            format!(
                "giving up after {MAX_FAILURES} failures in a row: hypercall {} answers -14 until \
                 it is set again",
                self.nr
            )
        } else {
            let pause = backoff(state.failures);
            state.retry_at = Some(Instant::now() + pause);
            if pause.is_zero() {
                "restarting it on the next call".into()
            } else {
                format!("restarting it on the first call after {pause:?}")
            }
        };
        eprintln!(
            "vmcall: exec handler `{}` (hypercall {}): {why}; the guest gets -KVM_EFAULT (-14); {then}",
            self.cmd, self.nr
        );
    }
}

/// ", exit status N" once the process has ended, if it has.
fn exit_status(proc: &mut Proc) -> String {
    // Give a dying process a moment to be reaped, so the message can say how it ended.
    for _ in 0..20 {
        if let Ok(Some(status)) = proc.child.try_wait() {
            return format!("; it exited ({status})");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    String::new()
}

fn shorten(s: &str) -> String {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end < s.len() {
        format!("{:?}...", &s[..end])
    } else {
        format!("{s:?}")
    }
}

/// `{"ret": N}`: N a u64 or a negative i64; other members are ignored.
pub fn parse_reply(line: &str) -> Result<u64, String> {
    let garbage = |why: &str| format!("answered {} ({why})", shorten(line.trim_end()));
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|_| garbage("not JSON; expected {\"ret\": N}"))?;
    let ret = v.get("ret").ok_or_else(|| garbage("no \"ret\""))?;
    ret.as_u64()
        .or_else(|| ret.as_i64().map(|r| r as u64))
        .ok_or_else(|| garbage("\"ret\" is not a 64-bit integer"))
}

/// The reader thread: each line of the process's output, until it closes it.
fn read_lines(stdout: impl Read, tx: &mpsc::Sender<Result<String, String>>) {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let got = (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf);
        let msg = match got {
            Ok(0) => Err("closed its output".to_string()),
            Ok(_) if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE => {
                Err(format!("answered a line longer than {MAX_LINE} bytes"))
            }
            Ok(_) => Ok(String::from_utf8_lossy(&buf).into_owned()),
            Err(e) => Err(format!("cannot read its output: {e}")),
        };
        let end = msg.is_err();
        if tx.send(msg).is_err() || end {
            return;
        }
    }
}

impl HypercallHandler for ExecHandler {
    fn call(&self, c: &Call<'_>) -> HypercallResult {
        let efault = Err(HypercallError::Errno(KVM_EFAULT));
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.failures >= MAX_FAILURES {
            return efault;
        }
        if state.proc.is_none() {
            if state.retry_at.is_some_and(|t| Instant::now() < t) {
                return efault;
            }
            match self.start() {
                Ok(p) => state.proc = Some(p),
                Err(why) => {
                    self.fail(&mut state, &why);
                    return efault;
                }
            }
        }
        let proc = state.proc.as_mut().expect("started above");
        match self.exchange(proc, c) {
            Ok(v) => {
                state.failures = 0;
                Ok(v)
            }
            Err(why) => {
                self.fail(&mut state, &why);
                efault
            }
        }
    }

    fn kind(&self) -> &str {
        "exec"
    }

    /// The process sees the call's number, arguments, vCPU and mode, never guest memory.
    fn uses_guest_memory(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_vmm::memory::GuestRam;
    use vmcall_vmm::x86::{CpuMode, PagingContext};

    fn call(h: &ExecHandler, a0: u64) -> HypercallResult {
        let ram = GuestRam::new(2 << 20).unwrap();
        let c = Call {
            nr: 20,
            args: [a0, 2, 3, 4],
            vcpu_id: 0,
            mode: CpuMode::Long64,
            mem: &ram,
            paging: PagingContext::default(),
        };
        h.call(&c)
    }

    const EFAULT: HypercallResult = Err(HypercallError::Errno(KVM_EFAULT));

    #[test]
    fn replies_are_parsed_strictly() {
        assert_eq!(parse_reply("{\"ret\": 42}\n"), Ok(42));
        assert_eq!(parse_reply("{\"ret\": -22, \"note\": 1}"), Ok((-22i64) as u64));
        assert_eq!(parse_reply("{\"ret\": 18446744073709551615}"), Ok(u64::MAX));
        for bad in ["", "42", "{\"ret\": 1.5}", "{\"ret\": \"1\"}", "{\"r\": 1}", "{\"ret\": 1e30}"]
        {
            assert!(parse_reply(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_process_answers_each_call_and_keeps_its_state() {
        // A shell handler that answers a running count plus a0.
        let h = ExecHandler::new(
            20,
            "n=0; while read -r line; do n=$((n+1)); echo \"{\\\"ret\\\": $n}\"; done",
            Duration::from_secs(5),
        );
        assert_eq!(call(&h, 0), Ok(1));
        assert_eq!(call(&h, 0), Ok(2), "the same process, started once");
        assert_eq!(h.kind(), "exec");
    }

    #[test]
    fn failures_answer_efault_and_restart_then_give_up() {
        // Dies after each answer: every other call finds it dead and restarts it.
        let h = ExecHandler::new(20, "read -r l; echo '{\"ret\": 7}'", Duration::from_secs(5));
        assert_eq!(call(&h, 0), Ok(7));
        assert_eq!(call(&h, 0), EFAULT, "died after its first answer");
        assert_eq!(call(&h, 0), Ok(7), "restarted at once after one failure");

        let h = ExecHandler::new(20, "sleep 5", Duration::from_millis(100));
        let t = Instant::now();
        assert_eq!(call(&h, 0), EFAULT);
        assert!(t.elapsed() < Duration::from_secs(2), "the deadline holds");

        let h = ExecHandler::new(20, "while read -r l; do echo garbage; done", DEFAULT_DEADLINE);
        assert_eq!(call(&h, 0), EFAULT);
        for _ in 0..80 {
            let _ = call(&h, 0);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(h.state.lock().unwrap().failures, MAX_FAILURES, "gave up");
        assert!(h.state.lock().unwrap().proc.is_none());

        let h = ExecHandler::new(20, "exec /nonexistent/handler", DEFAULT_DEADLINE);
        assert_eq!(call(&h, 0), EFAULT);

        // Two answers to one call: the extra one is caught at the next call, once it is there.
        let two = r#"while read -r l; do echo '{"ret": 1}'; echo '{"ret": 2}'; done"#;
        let h = ExecHandler::new(20, two, DEFAULT_DEADLINE);
        assert_eq!(call(&h, 0), Ok(1));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(call(&h, 0), EFAULT);
    }

    #[test]
    fn backoff_grows() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(4), Duration::from_millis(400));
    }
}
