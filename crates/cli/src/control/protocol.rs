//! The control protocol (docs/control.md): one JSON object per line each way. Requests are
//! parsed strictly — an unknown command or field, a missing field or a bad number is an error
//! reply naming it — and answered against a [`Target`], so every case is unit-tested without a
//! socket or a VM.

use serde_json::{json, Map, Value};
use vmcall_vmm::hypercall::handlers::parse_u64;
use vmcall_vmm::hypercall::{HypercallTable, TableError};

use crate::handlers::{BuildOptions, HandlerSpec};

/// Longest request line the server reads; a longer one is refused and the connection closed.
pub const MAX_REQUEST: usize = 64 * 1024;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    List,
    Set { nr: u64, spec: HandlerSpec },
    Override { nr: u64, spec: HandlerSpec },
    Remove { nr: u64 },
    Stats,
    Trace { on: bool },
    Stop,
}

/// What requests act on: the running VM.
pub trait Target {
    fn table(&self) -> &HypercallTable;
    /// The `stats` reply's body.
    fn stats(&self) -> Value;
    fn set_trace(&self, on: bool);
    fn stop(&self);
    fn build_options(&self) -> BuildOptions;
}

/// A reply: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
pub fn ok(mut body: Map<String, Value>) -> Value {
    body.insert("ok".into(), Value::Bool(true));
    Value::Object(body)
}

pub fn error(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

/// Parse one request line.
pub fn parse(line: &str) -> Result<Request, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let Value::Object(obj) = v else {
        return Err("a request is a JSON object, e.g. {\"cmd\":\"list\"}".into());
    };
    let cmd = match obj.get("cmd") {
        Some(Value::String(c)) => c.as_str(),
        Some(_) => return Err("\"cmd\" must be a string".into()),
        None => {
            return Err("missing \"cmd\" (list, set, override, remove, stats, trace, stop)".into())
        }
    };
    let allowed: &[&str] = match cmd {
        "list" | "stats" | "stop" => &[],
        "set" | "override" => &["nr", "handler"],
        "remove" => &["nr"],
        "trace" => &["on"],
        other => {
            return Err(format!(
                "unknown command {:?}; expected list, set, override, remove, stats, trace or stop",
                short(other)
            ))
        }
    };
    if let Some(k) = obj.keys().find(|k| *k != "cmd" && !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field {:?} for {cmd}", short(k)));
    }
    let field = |k: &str| obj.get(k).ok_or_else(|| format!("{cmd} needs \"{k}\""));
    let spec = || -> Result<HandlerSpec, String> {
        match field("handler")? {
            Value::String(s) => {
                s.parse().map_err(|e: crate::handlers::SpecParseError| e.to_string())
            }
            _ => Err("\"handler\" must be a string such as \"const:2\"".into()),
        }
    };
    Ok(match cmd {
        "list" => Request::List,
        "stats" => Request::Stats,
        "stop" => Request::Stop,
        "set" => Request::Set { nr: number(field("nr")?)?, spec: spec()? },
        "override" => Request::Override { nr: number(field("nr")?)?, spec: spec()? },
        "remove" => Request::Remove { nr: number(field("nr")?)? },
        "trace" => match field("on")? {
            Value::Bool(on) => Request::Trace { on: *on },
            _ => return Err("\"on\" must be true or false".into()),
        },
        _ => unreachable!("checked above"),
    })
}

/// A hypercall number: a JSON integer 0..2^64, or a string (decimal, 0x hex, negative decimal).
fn number(v: &Value) -> Result<u64, String> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            format!("\"nr\" {n} is not a hypercall number (an integer 0..2^64, or a string)")
        }),
        Value::String(s) => parse_u64(s.trim()).map_err(|e| e.to_string()),
        _ => Err("\"nr\" must be a number or a string".into()),
    }
}

/// At most 40 characters of something a client sent, for an error message.
fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Answer one request line.
pub fn answer(line: &str, target: &dyn Target) -> Value {
    match parse(line) {
        Ok(req) => execute(req, target),
        Err(e) => error(e),
    }
}

/// Carry out a request.
pub fn execute(req: Request, target: &dyn Target) -> Value {
    let table = target.table();
    match req {
        Request::List => {
            let rows: Vec<Value> = table
                .list()
                .into_iter()
                .map(|l| {
                    json!({"nr": l.nr, "name": l.name, "kind": l.kind,
                           "override": l.overrides_standard, "calls": l.calls})
                })
                .collect();
            ok(obj(json!({ "handlers": rows })))
        }
        Request::Set { nr, spec } => install(target, nr, &spec, false),
        Request::Override { nr, spec } => install(target, nr, &spec, true),
        Request::Remove { nr } => match table.unregister(nr) {
            Some(old) => ok(obj(json!({"nr": nr, "removed": &*old.name}))),
            None => error(format!("hypercall {nr} has no custom handler")),
        },
        Request::Stats => ok(obj(target.stats())),
        Request::Trace { on } => {
            target.set_trace(on);
            ok(obj(json!({ "trace": on })))
        }
        Request::Stop => {
            target.stop();
            ok(obj(json!({ "stopping": true })))
        }
    }
}

/// `set` (register or replace) or `override` (any number, explicitly).
fn install(target: &dyn Target, nr: u64, spec: &HandlerSpec, overriding: bool) -> Value {
    let handler = spec.build(nr, &target.build_options());
    let name = spec.to_string();
    let table = target.table();
    let replaced = if overriding {
        Ok(table.override_shared(nr, &name, handler))
    } else {
        table.set(nr, &name, handler)
    };
    match replaced {
        Ok(old) => ok(obj(json!({
            "nr": nr,
            "handler": name,
            "replaced": old.map(|e| e.name.to_string()),
        }))),
        Err(e @ TableError::Standard { .. }) => error(format!("{e} (use override)")),
        Err(e) => error(e.to_string()),
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use vmcall_vmm::hypercall::handlers::Builtin;

    #[derive(Default)]
    struct Fake {
        table: HypercallTable,
        trace: AtomicBool,
        stopped: AtomicBool,
    }

    impl Target for Fake {
        fn table(&self) -> &HypercallTable {
            &self.table
        }
        fn stats(&self) -> Value {
            json!({"hypercalls": []})
        }
        fn set_trace(&self, on: bool) {
            self.trace.store(on, Ordering::Relaxed);
        }
        fn stop(&self) {
            self.stopped.store(true, Ordering::Relaxed);
        }
        fn build_options(&self) -> BuildOptions {
            BuildOptions::default()
        }
    }

    fn err(line: &str) -> String {
        parse(line).unwrap_err()
    }

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(parse(r#"{"cmd":"list"}"#), Ok(Request::List));
        assert_eq!(
            parse(r#"{"cmd":"set","nr":20,"handler":"const:2"}"#),
            Ok(Request::Set { nr: 20, spec: HandlerSpec::Builtin(Builtin::Const(2)) })
        );
        assert_eq!(
            parse(r#"{"cmd":"override","nr":"0x1","handler":"echo"}"#),
            Ok(Request::Override { nr: 1, spec: HandlerSpec::Builtin(Builtin::Echo) })
        );
        assert_eq!(parse(r#"{"nr":"20","cmd":"remove"}"#), Ok(Request::Remove { nr: 20 }));
        assert_eq!(parse(r#"{"cmd":"trace","on":false}"#), Ok(Request::Trace { on: false }));
        assert_eq!(parse(r#" {"cmd":"stop"} "#), Ok(Request::Stop));

        assert!(err("garbage").starts_with("not a JSON object"));
        assert!(err("[1,2]").contains("a request is a JSON object"));
        assert!(err("{}").contains("missing \"cmd\""));
        assert!(err(r#"{"cmd":7}"#).contains("must be a string"));
        assert!(err(r#"{"cmd":"reboot"}"#).contains("unknown command \"reboot\""));
        assert!(err(r#"{"cmd":"list","x":1}"#).contains("unknown field \"x\" for list"));
        assert!(err(r#"{"cmd":"set","nr":20}"#).contains("set needs \"handler\""));
        assert!(err(r#"{"cmd":"set","nr":-1,"handler":"echo"}"#).contains("not a hypercall number"));
        assert!(
            err(r#"{"cmd":"set","nr":1.5,"handler":"echo"}"#).contains("not a hypercall number")
        );
        assert!(err(r#"{"cmd":"set","nr":"x","handler":"echo"}"#).contains("not a number"));
        assert!(err(r#"{"cmd":"set","nr":[],"handler":"echo"}"#).contains("number or a string"));
        assert!(err(r#"{"cmd":"set","nr":20,"handler":"bogus"}"#).contains("unknown handler kind"));
        assert!(err(r#"{"cmd":"set","nr":20,"handler":5}"#).contains("must be a string"));
        assert!(err(r#"{"cmd":"trace","on":"yes"}"#).contains("true or false"));
        let long = format!(r#"{{"cmd":"{}"}}"#, "x".repeat(1000));
        assert!(err(&long).len() < 200, "errors quote at most a little of the request");
    }

    #[test]
    fn requests_act_on_the_target_and_reply() {
        let f = Fake::default();
        let r = answer(r#"{"cmd":"set","nr":20,"handler":"const:1"}"#, &f);
        assert_eq!(r, json!({"ok":true,"nr":20,"handler":"const:1","replaced":null}));
        let r = answer(r#"{"cmd":"set","nr":20,"handler":"const:2"}"#, &f);
        assert_eq!(r["replaced"], "const:1");
        let r = answer(r#"{"cmd":"set","nr":1,"handler":"const:2"}"#, &f);
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("use override"), "{r}");
        let r = answer(r#"{"cmd":"override","nr":1,"handler":"const:5"}"#, &f);
        assert_eq!(r["ok"], true, "{r}");
        let r = answer(r#"{"cmd":"list"}"#, &f);
        assert_eq!(
            r["handlers"],
            json!([
                {"nr":1,"name":"const:5","kind":"const","override":true,"calls":0},
                {"nr":20,"name":"const:2","kind":"const","override":false,"calls":0}
            ])
        );
        assert_eq!(answer(r#"{"cmd":"remove","nr":20}"#, &f)["removed"], "const:2");
        let r = answer(r#"{"cmd":"remove","nr":20}"#, &f);
        assert_eq!(r, json!({"ok":false,"error":"hypercall 20 has no custom handler"}));
        assert_eq!(answer(r#"{"cmd":"trace","on":true}"#, &f), json!({"ok":true,"trace":true}));
        assert!(f.trace.load(Ordering::Relaxed));
        assert_eq!(answer(r#"{"cmd":"stats"}"#, &f), json!({"ok":true,"hypercalls":[]}));
        assert_eq!(answer(r#"{"cmd":"stop"}"#, &f), json!({"ok":true,"stopping":true}));
        assert!(f.stopped.load(Ordering::Relaxed));
        assert_eq!(answer("}{", &f)["ok"], false);
    }
}
