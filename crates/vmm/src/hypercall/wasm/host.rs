//! The host API a handler module imports from module `"vmcall"` (docs/wasm.md, "Host API").
//!
//! Guest-memory functions copy between guest memory and the handler's linear memory (its
//! export `memory`), and return 0 or `-KVM_EFAULT` (-14) when the guest range is not guest RAM
//! (physical) or not mapped as the caller needs it (virtual); nothing is written then. A buffer
//! outside the handler's own linear memory, or a module without an exported memory, is a bug of
//! the handler: the call traps. Each copy is charged fuel: 1 + len/8 units, and 16 more per
//! guest page for the virtual ones (the page walk).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use vmcall_abi::errno::KVM_EFAULT;
use wasmi::{Caller, Error, Linker, Memory, StoreLimits, TrapCode, ValType};

use super::{LogSink, LOG_LINE_MAX};
use crate::memory::GuestRam;
use crate::x86::paging::{PagingContext, VirtualMemory};

const I32: ValType = ValType::I32;
const I64: ValType = ValType::I64;

/// One host function: its import name and wasm type.
#[derive(Debug, Clone, Copy)]
pub struct HostFn {
    /// The import's field name.
    pub name: &'static str,
    /// Its parameter types.
    pub params: &'static [ValType],
    /// Its result types.
    pub results: &'static [ValType],
    /// One line on what it does.
    pub doc: &'static str,
}

/// Everything module `"vmcall"` provides.
pub const HOST_API: &[HostFn] = &[
    HostFn {
        name: "read_phys",
        params: &[I64, I32, I32],
        results: &[I32],
        doc: "(gpa, buf, len): copy len bytes of guest RAM at guest-physical gpa to buf; 0 or -14",
    },
    HostFn {
        name: "write_phys",
        params: &[I64, I32, I32],
        results: &[I32],
        doc:
            "(gpa, buf, len): copy len bytes from buf to guest RAM at guest-physical gpa; 0 or -14",
    },
    HostFn {
        name: "read_virt",
        params: &[I64, I32, I32],
        results: &[I32],
        doc: "(va, buf, len): the same through the calling vCPU's page tables; 0 or -14",
    },
    HostFn {
        name: "write_virt",
        params: &[I64, I32, I32],
        results: &[I32],
        doc: "(va, buf, len): the same, writing; every page is checked before any byte is written",
    },
    HostFn {
        name: "log",
        params: &[I32, I32],
        results: &[],
        doc: "(ptr, len): print a UTF-8 line to the host's stderr (bounded and rate-limited)",
    },
    HostFn {
        name: "now_ns",
        params: &[],
        results: &[I64],
        doc: "(): the host's wall-clock time, nanoseconds since the Unix epoch",
    },
];

/// "read_phys, write_phys, ..." for error messages.
pub(super) fn api_list() -> String {
    HOST_API
        .iter()
        .map(|f| format!("{}{}", f.name, super::func_sig(f.params, f.results)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the call in progress lets the host API see.
#[derive(Debug, Clone, Copy)]
pub(super) struct CallCtx {
    pub paging: PagingContext,
    pub vcpu: u32,
}

/// The store's data: limits, the instance's memory, and the call in progress.
pub(super) struct HostState {
    pub limits: StoreLimits,
    /// The instance's exported `memory`, if it has one.
    pub memory: Option<Memory>,
    /// A handle to the RAM of the guest that called last (kept between calls: comparing its
    /// mapping with the next caller's is cheaper than taking a new handle each call). While it
    /// is held the mapping cannot go away, so an equal `ram_key` means the same RAM.
    pub ram: Option<GuestRam>,
    /// `ram`'s host mapping: address and length.
    pub ram_key: (usize, usize),
    /// Set while a call runs; `None` during instantiation (no guest to see).
    pub call: Option<CallCtx>,
    pub log: LogLimiter,
    pub name: Arc<str>,
}

impl HostState {
    fn guest(&self) -> Option<(&GuestRam, CallCtx)> {
        Some((self.ram.as_ref()?, self.call?))
    }
}

fn efault() -> i32 {
    -(KVM_EFAULT as i32)
}

/// Take `cost` units of fuel, or trap as out of fuel.
fn charge(caller: &mut Caller<'_, HostState>, cost: u64) -> Result<(), Error> {
    let fuel = caller.get_fuel()?;
    if fuel < cost {
        caller.set_fuel(0)?;
        return Err(TrapCode::OutOfFuel.into());
    }
    caller.set_fuel(fuel - cost)
}

fn copy_cost(len: u32) -> u64 {
    1 + u64::from(len) / 8
}

/// Guest pages touched by `len` bytes at `va`.
fn pages(va: u64, len: u32) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = va >> 12;
    let last = va.wrapping_add(u64::from(len) - 1) >> 12;
    last.wrapping_sub(first).wrapping_add(1).min(u64::from(len))
}

/// The handler's linear memory and its host state; traps without an exported memory.
fn memory_and_state<'a>(
    caller: &'a mut Caller<'_, HostState>,
    func: &str,
) -> Result<(&'a mut [u8], &'a mut HostState), Error> {
    let memory = match caller.data().memory {
        Some(m) => m,
        // During instantiation (a start function) it is not cached yet.
        None => caller.get_export("memory").and_then(|e| e.into_memory()).ok_or_else(|| {
            Error::new(format!("vmcall.{func}: the handler exports no `memory` to copy into"))
        })?,
    };
    Ok(memory.data_and_store_mut(caller))
}

/// `buf..buf+len` of linear memory, or a trap.
fn wasm_range(
    mem_len: usize,
    func: &str,
    buf: u32,
    len: u32,
) -> Result<std::ops::Range<usize>, Error> {
    let (start, len) = (buf as usize, len as usize);
    match start.checked_add(len) {
        Some(end) if end <= mem_len => Ok(start..end),
        _ => Err(Error::new(format!(
            "vmcall.{func}: buffer {buf:#x}+{len:#x} is outside the handler's linear memory ({mem_len:#x} bytes)"
        ))),
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

#[derive(Clone, Copy)]
enum Space {
    Phys,
    Virt,
}

fn copy(
    mut caller: Caller<'_, HostState>,
    func: &'static str,
    dir: Dir,
    space: Space,
    addr: i64,
    buf: i32,
    len: i32,
) -> Result<i32, Error> {
    let (addr, buf, len) = (addr as u64, buf as u32, len as u32);
    let mut cost = copy_cost(len);
    if let Space::Virt = space {
        cost += 16 * pages(addr, len);
    }
    charge(&mut caller, cost)?;
    let (mem, state) = memory_and_state(&mut caller, func)?;
    let range = wasm_range(mem.len(), func, buf, len)?;
    let Some((ram, ctx)) = state.guest() else {
        return Ok(efault());
    };
    let bytes = &mut mem[range];
    let ok = match (space, dir) {
        (Space::Phys, Dir::Read) => ram.read(addr, bytes).is_ok(),
        (Space::Phys, Dir::Write) => ram.write(addr, bytes).is_ok(),
        (Space::Virt, Dir::Read) => VirtualMemory::new(ram, ctx.paging).read(addr, bytes).is_ok(),
        (Space::Virt, Dir::Write) => VirtualMemory::new(ram, ctx.paging).write(addr, bytes).is_ok(),
    };
    Ok(if ok { 0 } else { efault() })
}

fn log(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> Result<(), Error> {
    let len = (len as u32).min(LOG_LINE_MAX as u32 + 1);
    charge(&mut caller, copy_cost(len))?;
    let (mem, state) = memory_and_state(&mut caller, "log")?;
    let range = wasm_range(mem.len(), "log", ptr as u32, len)?;
    let vcpu = state.call.map(|c| c.vcpu);
    state.log.line(&state.name, vcpu, &mem[range]);
    Ok(())
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// Define [`HOST_API`] in `linker`.
pub(super) fn define(linker: &mut Linker<HostState>) -> Result<(), Error> {
    linker.func_wrap(
        "vmcall",
        "read_phys",
        |c: Caller<'_, HostState>, gpa: i64, buf: i32, len: i32| {
            copy(c, "read_phys", Dir::Read, Space::Phys, gpa, buf, len)
        },
    )?;
    linker.func_wrap(
        "vmcall",
        "write_phys",
        |c: Caller<'_, HostState>, gpa: i64, buf: i32, len: i32| {
            copy(c, "write_phys", Dir::Write, Space::Phys, gpa, buf, len)
        },
    )?;
    linker.func_wrap(
        "vmcall",
        "read_virt",
        |c: Caller<'_, HostState>, va: i64, buf: i32, len: i32| {
            copy(c, "read_virt", Dir::Read, Space::Virt, va, buf, len)
        },
    )?;
    linker.func_wrap(
        "vmcall",
        "write_virt",
        |c: Caller<'_, HostState>, va: i64, buf: i32, len: i32| {
            copy(c, "write_virt", Dir::Write, Space::Virt, va, buf, len)
        },
    )?;
    linker.func_wrap("vmcall", "log", log)?;
    linker.func_wrap("vmcall", "now_ns", |_: Caller<'_, HostState>| now_ns())?;
    Ok(())
}

/// `log`'s limits: control characters are escaped, lines cut at about [`LOG_LINE_MAX`]
/// bytes, and a
/// token bucket lets through `per_sec` lines a second (and a burst of as many); the lines it
/// drops are counted and the count is printed with the next line that gets through.
pub(super) struct LogLimiter {
    per_sec: u32,
    tokens: f64,
    last: Instant,
    dropped: u64,
    sink: LogSink,
}

impl LogLimiter {
    pub fn new(per_sec: u32, sink: LogSink) -> Self {
        Self { per_sec, tokens: f64::from(per_sec), last: Instant::now(), dropped: 0, sink }
    }

    fn admit(&mut self) -> bool {
        let now = Instant::now();
        let rate = f64::from(self.per_sec);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    pub fn line(&mut self, name: &str, vcpu: Option<u32>, bytes: &[u8]) {
        if !self.admit() {
            return;
        }
        let mut cut = bytes.len() > LOG_LINE_MAX;
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(LOG_LINE_MAX)]);
        let mut line = format!("vmcall: wasm {name}:");
        if let Some(v) = vcpu {
            line += &format!(" vCPU {v}:");
        }
        line.push(' ');
        let limit = line.len() + LOG_LINE_MAX;
        for ch in text.trim_end_matches('\n').chars() {
            if ch.is_control() && ch != '\t' {
                line.extend(ch.escape_default());
            } else {
                line.push(ch);
            }
            if line.len() >= limit {
                cut = true;
                break;
            }
        }
        if cut {
            line += " [cut]";
        }
        if self.dropped > 0 {
            line += &format!(
                " ({} earlier lines dropped: over {} lines/s)",
                self.dropped, self.per_sec
            );
            self.dropped = 0;
        }
        (self.sink)(&line);
    }
}

#[cfg(test)]
pub(super) fn pages_for_test(va: u64, len: u32) -> u64 {
    pages(va, len)
}
