//! Hypercall handlers written in WebAssembly (feature `wasm`; docs/wasm.md).
//!
//! A [`WasmHandler`] loads one module (binary `.wasm` or `.wat` text), instantiates it once and
//! answers each call by running its export [`EXPORT`]`(nr, a0, a1, a2, a3, vcpu) -> i64`; the
//! value it returns goes to RAX. The module may import the host API [`HOST_API`] from the
//! module [`HOST_MODULE`]: guest memory by guest-physical and guest-virtual address, a log, the
//! time. The runtime is wasmi, an interpreter, picked by measurement (docs/wasm.md).
//!
//! - **State** lives in the one instance: its globals and linear memory persist from call to
//!   call. Calls from several vCPUs to the same handler run one at a time (a mutex around the
//!   instance), so a handler sees a simple sequence of calls, as a single-threaded program.
//! - **Limits**: each call runs with a budget of [`WasmConfig::fuel`] (about one unit per wasm
//!   instruction executed; host API copies are charged per byte), and linear memory is capped
//!   at [`WasmConfig::memory_limit`].
//! - **Failures**: a trap, an exhausted budget or a `memory.grow` past the cap answers the guest
//!   `-KVM_EFAULT` (-14), as a panicking native handler does; it is counted
//!   ([`WasmHandler::counters`]) and reported with `tracing` (the 1st, 2nd, 4th, 8th, ...
//!   failure of each handler, so a failing loop cannot flood the log). The instance stays as the
//!   trap left it and answers the next call: what the call had changed before it failed
//!   (globals, memory) stays changed.

mod host;
#[cfg(test)]
mod tests;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use vmcall_abi::errno::KVM_EFAULT;
use wasmi::{
    Config, Engine, ExternType, Linker, Module, Store, StoreLimitsBuilder, TrapCode, TypedFunc,
    ValType,
};

use super::call::{Call, HypercallError, HypercallHandler, HypercallResult};
use host::{CallCtx, HostState, LogLimiter};
pub use host::{HostFn, HOST_API};

/// The function a handler module exports: `(nr: i64, a0: i64, a1: i64, a2: i64, a3: i64,
/// vcpu: i32) -> i64`.
pub const EXPORT: &str = "vmcall_handle";
/// The module name of the host API's imports.
pub const HOST_MODULE: &str = "vmcall";
/// Default budget per call: 10 million units of fuel, about 10 ms of straight-line wasm on the
/// project's machines (a tight loop burns it in 12 ms).
pub const DEFAULT_FUEL: u64 = 10_000_000;
/// Default cap of a handler's linear memory: 16 MiB.
pub const DEFAULT_MEMORY_LIMIT: usize = 16 << 20;
/// Default rate of `log` lines a handler may print, per second (and in one burst).
pub const DEFAULT_LOG_LINES_PER_SEC: u32 = 50;
/// Longest `log` line printed; longer ones are cut there.
pub const LOG_LINE_MAX: usize = 1024;

type Params = (i64, i64, i64, i64, i64, i32);

/// Where `log` lines go.
pub type LogSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Limits and the log of one handler.
#[derive(Clone)]
pub struct WasmConfig {
    /// Fuel per call (and for the module's start function): the time budget.
    pub fuel: u64,
    /// Most bytes of linear memory the instance may have (at instantiation and after
    /// `memory.grow`).
    pub memory_limit: usize,
    /// `log` lines per second (and burst); lines beyond it are dropped and counted.
    pub log_lines_per_sec: u32,
    /// Receives each `log` line, already prefixed; stderr by default.
    pub log_sink: LogSink,
}

impl Default for WasmConfig {
    fn default() -> Self {
        Self {
            fuel: DEFAULT_FUEL,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            log_lines_per_sec: DEFAULT_LOG_LINES_PER_SEC,
            log_sink: Arc::new(|line: &str| eprintln!("{line}")),
        }
    }
}

impl std::fmt::Debug for WasmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmConfig")
            .field("fuel", &self.fuel)
            .field("memory_limit", &self.memory_limit)
            .field("log_lines_per_sec", &self.log_lines_per_sec)
            .finish_non_exhaustive()
    }
}

/// Why a module could not become a handler. Every variant names the module.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The file could not be read.
    #[error("cannot read wasm handler '{name}'")]
    Read {
        /// The module's name (its path).
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a valid module.
    #[error("'{name}' is not a valid WebAssembly module (binary .wasm or .wat text)")]
    Invalid {
        /// The module's name (its path).
        name: String,
        /// What the parser or validator said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The module exports no handler function.
    #[error(
        "'{name}' exports no function `{EXPORT}`; a handler must export `{EXPORT}{SIGNATURE}`"
    )]
    MissingExport {
        /// The module's name (its path).
        name: String,
    },
    /// The handler function has the wrong signature.
    #[error("'{name}' exports `{EXPORT}` as {found}; it must be `{EXPORT}{SIGNATURE}`")]
    WrongSignature {
        /// The module's name (its path).
        name: String,
        /// What the module has.
        found: String,
    },
    /// The module imports something vmcall does not provide.
    #[error("'{name}' imports {module}.{field} ({found}), which vmcall does not provide; the host \
             API is module \"{HOST_MODULE}\" with {api}", api = host::api_list())]
    UnknownImport {
        /// The module's name (its path).
        name: String,
        /// The import's module.
        module: String,
        /// The import's field.
        field: String,
        /// What the module has.
        found: String,
    },
    /// The module imports a host function with the wrong signature.
    #[error("'{name}' imports {HOST_MODULE}.{field} as {found}; vmcall provides {HOST_MODULE}.{field}{expected}")]
    ImportSignature {
        /// The module's name (its path).
        name: String,
        /// The import's field.
        field: String,
        /// What the module has.
        found: String,
        /// What vmcall provides.
        expected: String,
    },
    /// The module could not be instantiated.
    #[error("'{name}' cannot be instantiated (memory over the {limit}-byte cap, or its start function failed)")]
    Instantiate {
        /// The module's name (its path).
        name: String,
        /// The memory cap, in bytes.
        limit: usize,
        /// What the runtime said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

const SIGNATURE: &str = "(i64 nr, i64 a0, i64 a1, i64 a2, i64 a3, i32 vcpu) -> i64";

/// Calls and failures of one handler so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WasmCounters {
    /// Calls made (failed ones included).
    pub calls: u64,
    /// Calls that trapped (`unreachable`, an out-of-bounds access, a bad host API buffer, ...).
    pub traps: u64,
    /// Calls that ran out of fuel.
    pub out_of_fuel: u64,
    /// Calls that tried to grow linear memory past the cap.
    pub memory_limit: u64,
}

impl WasmCounters {
    /// Calls that answered `-KVM_EFAULT` because the handler failed.
    pub fn failures(&self) -> u64 {
        self.traps + self.out_of_fuel + self.memory_limit
    }
}

struct Instance {
    store: Store<HostState>,
    func: TypedFunc<Params, i64>,
    /// Kept under the instance's lock, which every call takes anyway.
    counters: WasmCounters,
}

/// A hypercall handler running a WebAssembly module (see the module documentation).
pub struct WasmHandler {
    name: Arc<str>,
    fuel: u64,
    /// Whether the module imports a host function that reads or writes guest RAM.
    memory_access: bool,
    instance: Mutex<Instance>,
}

impl std::fmt::Debug for WasmHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // try_lock: formatting must not wait for (or deadlock on) a call in progress.
        let counters = self.instance.try_lock().map(|i| i.counters).ok();
        f.debug_struct("WasmHandler")
            .field("name", &self.name)
            .field("fuel", &self.fuel)
            .field("counters", &counters)
            .finish_non_exhaustive()
    }
}

impl WasmHandler {
    /// Load the module at `path` (binary or text) with the default limits.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, WasmError> {
        Self::load_with(path, WasmConfig::default())
    }

    /// Load the module at `path` (binary or text) with `config`.
    pub fn load_with(path: impl AsRef<Path>, config: WasmConfig) -> Result<Self, WasmError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let bytes =
            std::fs::read(path).map_err(|source| WasmError::Read { name: name.clone(), source })?;
        Self::from_bytes(&name, &bytes, config)
    }

    /// A handler from a module's bytes (binary, or `.wat` text); `name` names it in errors,
    /// logs and statistics.
    pub fn from_bytes(name: &str, bytes: &[u8], config: WasmConfig) -> Result<Self, WasmError> {
        let name: Arc<str> = name.into();
        let invalid = |source: Box<dyn std::error::Error + Send + Sync>| WasmError::Invalid {
            name: name.to_string(),
            source,
        };
        let mut wasm_config = Config::default();
        wasm_config.consume_fuel(true);
        let engine = Engine::new(&wasm_config);
        // A runtime bug on a strange module must not take the host down: report it as invalid
        // (the engine is dropped with the error, so no state a panic left behind is reused).
        let module = std::panic::catch_unwind(AssertUnwindSafe(|| Module::new(&engine, bytes)))
            .map_err(|_| invalid("the WebAssembly runtime failed on this module".into()))?
            .map_err(|e| invalid(Box::new(e)))?;
        check_export(&name, &module)?;
        check_imports(&name, &module)?;
        let memory_access = module.imports().any(|i| {
            i.module() == HOST_MODULE
                && matches!(i.name(), "read_phys" | "write_phys" | "read_virt" | "write_virt")
        });

        let state = HostState {
            limits: StoreLimitsBuilder::new()
                .memory_size(config.memory_limit)
                .table_elements(64 * 1024)
                .instances(1)
                .memories(1)
                .tables(4)
                .trap_on_grow_failure(true)
                .build(),
            memory: None,
            ram: None,
            ram_key: (0, 0),
            call: None,
            log: LogLimiter::new(config.log_lines_per_sec, config.log_sink.clone()),
            name: name.clone(),
        };
        let mut store = Store::new(&engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(config.fuel).expect("fuel is enabled");
        let mut linker = Linker::new(&engine);
        host::define(&mut linker).expect("the host API's names are distinct");
        let instance = linker.instantiate_and_start(&mut store, &module).map_err(|e| {
            WasmError::Instantiate {
                name: name.to_string(),
                limit: config.memory_limit,
                source: Box::new(e),
            }
        })?;
        store.data_mut().memory = instance.get_memory(&store, "memory");
        let func = instance
            .get_typed_func::<Params, i64>(&store, EXPORT)
            .map_err(|_| WasmError::MissingExport { name: name.to_string() })?;
        Ok(Self {
            name,
            fuel: config.fuel,
            memory_access,
            instance: Mutex::new(Instance { store, func, counters: WasmCounters::default() }),
        })
    }

    /// The name given at load (the path, for [`WasmHandler::load`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls and failures so far.
    pub fn counters(&self) -> WasmCounters {
        self.lock().counters
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Instance> {
        self.instance.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Count a failed call; what to report, if this one is to be reported.
fn failed(counters: &mut WasmCounters, err: &wasmi::Error) -> Option<(&'static str, u64)> {
    let (what, counter) = match err.as_trap_code() {
        Some(TrapCode::OutOfFuel) => ("ran out of fuel", &mut counters.out_of_fuel),
        Some(TrapCode::GrowthOperationLimited) => {
            ("grew its memory past the cap", &mut counters.memory_limit)
        }
        _ => ("trapped", &mut counters.traps),
    };
    *counter += 1;
    let failures = counters.failures();
    failures.is_power_of_two().then_some((what, failures))
}

impl HypercallHandler for WasmHandler {
    fn call(&self, c: &Call<'_>) -> HypercallResult {
        let mut guard = self.lock();
        let Instance { store, func, counters } = &mut *guard;
        counters.calls += 1;
        let state = store.data_mut();
        let (ptr, len) = c.mem.host_mapping();
        if state.ram_key != (ptr as usize, len) {
            state.ram = Some(c.mem.clone());
            state.ram_key = (ptr as usize, len);
        }
        state.call = Some(CallCtx { paging: c.paging, vcpu: c.vcpu_id });
        store.set_fuel(self.fuel).expect("fuel is enabled");
        let [a0, a1, a2, a3] = c.args.map(|a| a as i64);
        let result = func.call(&mut *store, (c.nr as i64, a0, a1, a2, a3, c.vcpu_id as i32));
        store.data_mut().call = None;
        let err = match result {
            Ok(v) => return Ok(v as u64),
            Err(e) => e,
        };
        let report = failed(counters, &err);
        drop(guard);
        if let Some((what, failures)) = report {
            tracing::warn!(
                handler = %self.name,
                nr = c.nr,
                vcpu = c.vcpu_id,
                "wasm handler {what}: {err}; the guest gets -KVM_EFAULT ({failures} failed calls so far; reporting the 1st, 2nd, 4th, 8th, ...)"
            );
        }
        Err(HypercallError::Errno(KVM_EFAULT))
    }

    fn kind(&self) -> &str {
        "wasm"
    }

    fn uses_guest_memory(&self) -> bool {
        self.memory_access
    }
}

fn type_name(t: &ValType) -> &'static str {
    match t {
        ValType::I32 => "i32",
        ValType::I64 => "i64",
        ValType::F32 => "f32",
        ValType::F64 => "f64",
        ValType::V128 => "v128",
        ValType::FuncRef => "funcref",
        ValType::ExternRef => "externref",
    }
}

/// `(i64, i32) -> i64` for a function type.
fn func_sig(params: &[ValType], results: &[ValType]) -> String {
    let list = |l: &[ValType]| l.iter().map(type_name).collect::<Vec<_>>().join(", ");
    match results {
        [] => format!("({})", list(params)),
        [r] => format!("({}) -> {}", list(params), type_name(r)),
        _ => format!("({}) -> ({})", list(params), list(results)),
    }
}

fn extern_desc(ty: &ExternType) -> String {
    match ty {
        ExternType::Func(f) => format!("a function {}", func_sig(f.params(), f.results())),
        ExternType::Memory(_) => "a memory".into(),
        ExternType::Table(_) => "a table".into(),
        ExternType::Global(_) => "a global".into(),
    }
}

fn check_export(name: &str, module: &Module) -> Result<(), WasmError> {
    let ty = module.get_export(EXPORT).ok_or(WasmError::MissingExport { name: name.into() })?;
    let want = [ValType::I64, ValType::I64, ValType::I64, ValType::I64, ValType::I64, ValType::I32];
    match &ty {
        ExternType::Func(f) if f.params() == want && f.results() == [ValType::I64] => Ok(()),
        other => Err(WasmError::WrongSignature { name: name.into(), found: extern_desc(other) }),
    }
}

fn check_imports(name: &str, module: &Module) -> Result<(), WasmError> {
    for import in module.imports() {
        let api = (import.module() == HOST_MODULE)
            .then(|| HOST_API.iter().find(|f| f.name == import.name()))
            .flatten();
        let Some(api) = api else {
            return Err(WasmError::UnknownImport {
                name: name.into(),
                module: import.module().into(),
                field: import.name().into(),
                found: extern_desc(import.ty()),
            });
        };
        let matches = matches!(import.ty(), ExternType::Func(f)
            if f.params() == api.params && f.results() == api.results);
        if !matches {
            return Err(WasmError::ImportSignature {
                name: name.into(),
                field: api.name.into(),
                found: extern_desc(import.ty()),
                expected: func_sig(api.params, api.results),
            });
        }
    }
    Ok(())
}
