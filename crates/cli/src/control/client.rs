//! `vmcall ctl PATH COMMAND`: one request to a running VM's control socket, its reply printed
//! for people (or as the raw JSON line with `--json`). Exit status: 0 for an ok reply, 1 for an
//! error reply or a VM that cannot be reached, 2 for usage errors (docs/control.md).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// How long the client waits for a reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `vmcall ctl` command, as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    List,
    Set(String),
    Override(String),
    Remove(String),
    Stats,
    Trace(bool),
    Stop,
}

/// Why `vmcall ctl` failed: a usage error (status 2) or anything else (status 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Usage(String),
    Error(String),
}

/// The request line for `cmd`.
pub fn request(cmd: &Command) -> Result<Value, Failure> {
    let assignment = |s: &str, what: &str| {
        s.split_once('=')
            .map(|(nr, kind)| (nr.trim().to_string(), kind.trim().to_string()))
            .ok_or_else(|| Failure::Usage(format!("{what} takes NR=KIND, e.g. 20=const:2")))
    };
    Ok(match cmd {
        Command::List => json!({"cmd": "list"}),
        Command::Stats => json!({"cmd": "stats"}),
        Command::Stop => json!({"cmd": "stop"}),
        Command::Trace(on) => json!({"cmd": "trace", "on": on}),
        Command::Remove(nr) => json!({"cmd": "remove", "nr": nr}),
        Command::Set(a) => {
            let (nr, kind) = assignment(a, "set")?;
            json!({"cmd": "set", "nr": nr, "handler": kind})
        }
        Command::Override(a) => {
            let (nr, kind) = assignment(a, "override")?;
            json!({"cmd": "override", "nr": nr, "handler": kind})
        }
    })
}

/// Send one request to the socket at `path` and return its reply.
pub fn exchange(path: &Path, req: &Value) -> Result<Value, Failure> {
    let shown = path.display();
    let err = |m: String| Failure::Error(m);
    match std::fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(err(format!(
                "no control socket at {shown} (is the VM running, started with --control?)"
            )))
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            return Err(err(format!("permission denied: cannot reach {shown}: {e}")))
        }
        Err(e) => return Err(err(format!("{shown}: {e}"))),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(err(format!("{shown} is not a socket (not a vmcall control socket)")))
        }
        Ok(_) => {}
    }
    let mut conn = UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::ConnectionRefused => err(format!(
            "nobody is listening on {shown}: the VM that made it is gone (a stale socket)"
        )),
        ErrorKind::PermissionDenied => err(format!(
            "permission denied: {shown} belongs to another user (control sockets are mode 0600)"
        )),
        _ => err(format!("cannot connect to {shown}: {e}")),
    })?;
    let _ = conn.set_read_timeout(Some(REPLY_TIMEOUT));
    let _ = conn.set_write_timeout(Some(REPLY_TIMEOUT));
    let mut line = req.to_string();
    line.push('\n');
    // A server that refuses the connection replies and closes without reading: the write may
    // fail while its reply waits to be read.
    let sent = conn.write_all(line.as_bytes());
    let mut reply = Vec::new();
    let got = BufReader::new(conn).take(1 << 24).read_until(b'\n', &mut reply);
    let not_vmcall = |what: &str| {
        err(format!("{shown} is not a vmcall control socket (or not a working one): {what}"))
    };
    if let (Err(e), Ok(0) | Err(_)) = (&sent, &got) {
        return Err(err(format!("cannot send the request to {shown}: {e}")));
    }
    match got {
        Ok(0) => return Err(not_vmcall("it closed the connection without a reply")),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(not_vmcall(&format!("no reply within {REPLY_TIMEOUT:?}")))
        }
        Err(e) => return Err(err(format!("cannot read the reply from {shown}: {e}"))),
        Ok(_) => {}
    }
    let text = String::from_utf8_lossy(&reply);
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if v.get("ok").is_some_and(Value::is_boolean) => Ok(v),
        _ => {
            let shown: String = text.trim_end().chars().take(60).collect();
            Err(not_vmcall(&format!("it answered {shown:?}")))
        }
    }
}

/// A value for a table cell: strings as they are, control characters (a newline in an exec
/// command) as spaces.
fn cell(v: &Value) -> String {
    let text = v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// How a reply looks to a person.
pub fn render(cmd: &Command, reply: &Value) -> String {
    let s = cell;
    match cmd {
        Command::List => {
            let rows = reply["handlers"].as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                return "no custom hypercalls registered\n".into();
            }
            let mut out = format!("{:>10}  {:<32} {:<8} {:>12}\n", "nr", "name", "kind", "calls");
            for r in rows {
                let tag = if r["override"] == true { " (override)" } else { "" };
                out += &format!(
                    "{:>10}  {:<32} {:<8} {:>12}{tag}\n",
                    s(&r["nr"]),
                    s(&r["name"]),
                    s(&r["kind"]),
                    s(&r["calls"])
                );
            }
            out
        }
        Command::Set(_) | Command::Override(_) => {
            let was = match &reply["replaced"] {
                Value::Null => " (new)".to_string(),
                v => format!(" (replaced {})", s(v)),
            };
            format!("hypercall {}: {}{was}\n", s(&reply["nr"]), s(&reply["handler"]))
        }
        Command::Remove(_) => {
            format!("hypercall {}: removed {}\n", s(&reply["nr"]), s(&reply["removed"]))
        }
        Command::Trace(_) => {
            format!("trace {}\n", if reply["trace"] == true { "on" } else { "off" })
        }
        Command::Stop => "stopping the VM\n".into(),
        Command::Stats => render_stats(reply),
    }
}

/// The same table as `vmcall run --stats` (`vmcall_vmm::stats_table`), from the JSON reply.
fn render_stats(reply: &Value) -> String {
    use vmcall_vmm::stats_table::{render, Figures, Row};
    let figures = |o: &Value| {
        let n = |k: &str| o[k].as_u64().unwrap_or(0);
        Figures {
            count: n("count"),
            sum_ns: n("sum_ns"),
            min_ns: n("min_ns"),
            mean_ns: n("mean_ns"),
            median_ns: n("median_ns"),
            p99_ns: n("p99_ns"),
            max_ns: n("max_ns"),
        }
    };
    let mut rows = Vec::new();
    for n in reply["hypercalls"].as_array().into_iter().flatten() {
        let nr = n["nr"].as_u64().map_or_else(|| n["nr"].to_string(), |nr| format!("{nr:#x}"));
        rows.push(Row::Calls { nr, name: cell(&n["name"]), figures: figures(n) });
        let handlers = n["handlers"].as_array().cloned().unwrap_or_default();
        if handlers.len() > 1 {
            for h in handlers {
                rows.push(Row::By {
                    name: cell(&h["name"]),
                    count: h["count"].as_u64().unwrap_or(0),
                });
            }
        }
    }
    rows.push(Row::Calls {
        nr: "total".into(),
        name: String::new(),
        figures: figures(&reply["total"]),
    });
    format!(
        "{} hypercalls in {:.3} s\n{}",
        reply["hypercalls_total"],
        reply["elapsed_s"].as_f64().unwrap_or(0.0),
        render(&rows)
    )
}

/// `vmcall ctl`: 0, 1 or 2 (see the module comment).
pub fn run(path: &Path, cmd: &Command, raw: bool) -> u8 {
    let result = request(cmd).and_then(|req| exchange(path, &req));
    match result {
        Ok(reply) if raw => {
            println!("{reply}");
            if reply["ok"] == true {
                0
            } else {
                1
            }
        }
        Ok(reply) if reply["ok"] == true => {
            print!("{}", render(cmd, &reply));
            0
        }
        Ok(reply) => {
            eprintln!("vmcall ctl: error: {}", reply["error"].as_str().unwrap_or("(no message)"));
            1
        }
        Err(Failure::Usage(m)) => {
            eprintln!("vmcall ctl: {m}");
            2
        }
        Err(Failure::Error(m)) => {
            eprintln!("vmcall ctl: error: {m}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_become_requests() {
        assert_eq!(request(&Command::List), Ok(json!({"cmd":"list"})));
        assert_eq!(
            request(&Command::Set(" 20 = const:2 ".into())),
            Ok(json!({"cmd":"set","nr":"20","handler":"const:2"}))
        );
        assert!(matches!(request(&Command::Set("20".into())), Err(Failure::Usage(_))));
        assert_eq!(request(&Command::Trace(true)), Ok(json!({"cmd":"trace","on":true})));
    }

    #[test]
    fn replies_render_for_people() {
        let r = json!({"ok":true,"handlers":[
            {"nr":20,"name":"const:2","kind":"const","override":false,"calls":7}]});
        let text = render(&Command::List, &r);
        assert!(text.contains("const:2") && text.contains(" 7"), "{text}");
        let r = json!({"ok":true,"nr":20,"handler":"const:2","replaced":"const:1"});
        assert_eq!(
            render(&Command::Set(String::new()), &r),
            "hypercall 20: const:2 (replaced const:1)\n"
        );
        let r = json!({"ok":true,"hypercalls_total":2,"elapsed_s":1.0,"hypercalls":[
            {"nr":20,"name":"x","count":2,"min_ns":1,"median_ns":1,"p99_ns":1,"max_ns":1,
             "handlers":[{"name":"a","count":1},{"name":"b","count":1}]}]});
        let text = render(&Command::Stats, &r);
        assert!(text.contains("by a") && text.contains("by b"), "{text}");
    }
}
