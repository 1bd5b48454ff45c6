//! Recordings of a run's hypercalls (`vmcall run --record FILE`), read back to replay them
//! against another handler table, to compare a re-run with them, or to compute statistics.
//!
//! The format (docs/record.md) is JSON Lines: one object per line, each with a `type`. The
//! first line is the [`Header`] (`"type":"header"`: the format's name and version, vmcall's
//! version, the backend, the guest and its settings, the handler table at the start), then one
//! [`CallEntry`] per answered hypercall (`"type":"call"`) in the order the host answered them,
//! and last an [`End`] (`"type":"end"`) when the run ended normally. 64-bit values (numbers,
//! arguments, results, addresses) are hex strings, which every JSON reader keeps exact.
//!
//! [`Recorder`] is the writer, a [`CallSink`]; [`Recording::read`] the reader of a whole
//! recording, [`RecordingReader`] of one call at a time; [`replay`] (or [`Replayer`], call by
//! call) answers recorded calls again with a table, without a guest; [`compare_streams`] finds where
//! a re-run's calls part from the recorded ones.

use std::io::{BufRead, Write};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::hypercall::{emulate_with, AnsweredBy, HypercallExit, HypercallInsn, HypercallTable};
use crate::hypercall::{Platform, TableSnapshot};
use crate::memory::{GuestRam, RamError};
use crate::trace::{CallRecord, CallSink};
use crate::x86::cpuid::PvCpuid;
use crate::x86::{CpuMode, PagingContext};
use vmcall_abi::layout::MAX_VCPUS;

/// The `format` of every recording's header.
pub const FORMAT: &str = "vmcall-record";
/// The format version this vmcall writes, and the newest it reads.
pub const VERSION: u32 = 1;

/// 64-bit values as `"0x..."` strings (read back from hex strings, decimal strings or numbers).
mod hex {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{v:#x}"))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Text(String),
    }

    pub fn parse(t: &str) -> Option<u64> {
        match t.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => t.parse().ok(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(n),
            Raw::Text(t) => parse(&t).ok_or_else(|| D::Error::custom(format!("'{t}' is not hex"))),
        }
    }

    pub mod four {
        use serde::ser::SerializeSeq;
        use serde::{de::Error, Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &[u64; 4], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(4))?;
            for a in v {
                seq.serialize_element(&format!("{a:#x}"))?;
            }
            seq.end()
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u64; 4], D::Error> {
            let raw = Vec::<String>::deserialize(d)?;
            let vals: Vec<u64> = raw
                .iter()
                .map(|t| {
                    super::parse(t).ok_or_else(|| D::Error::custom(format!("'{t}' is not hex")))
                })
                .collect::<Result<_, _>>()?;
            vals.try_into().map_err(|_| D::Error::custom("args must have four values"))
        }
    }
}

/// One handler of the table when the recording started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// Its hypercall number.
    #[serde(with = "hex")]
    pub nr: u64,
    /// Its name: for handlers given on vmcall's command line, the handler spec itself
    /// (`const:3`, `wasm:h.wat`, `exec:...`), from which a replay rebuilds it.
    pub name: String,
    /// Its kind (`const`, `wasm`, `exec`, `native`, ...).
    pub kind: String,
    /// Whether it replaces a standard `KVM_HC_*` number's behaviour.
    pub overrides_standard: bool,
}

/// The first line of a recording: what made it, and how the VM was set up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format version ([`VERSION`] when this vmcall wrote it).
    pub version: u32,
    /// The vmcall version that recorded it.
    pub vmcall: String,
    /// The backend: `kvm` or `emu`.
    pub backend: String,
    /// How the backend trapped hypercalls (its one-line description).
    pub backend_detail: String,
    /// The guest, as named on the command line (`demo` for the built-in one).
    pub guest: String,
    /// The guest's command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The boot protocol option (`auto`, `elf64`, `multiboot`).
    pub boot: String,
    /// The foreign hypercall instruction option (`patch`, `ud`, `answer`).
    pub foreign_hypercall: String,
    /// CPUID 0x40000001's PV features.
    #[serde(with = "hex")]
    pub pv_features: u64,
    /// Whether hypercalls the PV features do not offer were refused.
    pub enforce_pv_cpuid: bool,
    /// The custom handlers when the run started, by number.
    pub table: Vec<TableEntry>,
}

impl Header {
    /// A header for the current vmcall and format version; the rest is the caller's.
    pub fn new(backend: &str, guest: &str) -> Self {
        Header {
            format: FORMAT.into(),
            version: VERSION,
            vmcall: env!("CARGO_PKG_VERSION").into(),
            backend: backend.into(),
            backend_detail: String::new(),
            guest: guest.into(),
            cmdline: String::new(),
            memory: crate::vm::DEFAULT_MEMORY,
            vcpus: 1,
            boot: "auto".into(),
            foreign_hypercall: "patch".into(),
            pv_features: u64::from(crate::x86::cpuid::PV_FEATURES),
            enforce_pv_cpuid: false,
            table: Vec::new(),
        }
    }

    /// The entries of `table` as it is now, sorted by number.
    pub fn table_of(table: &HypercallTable) -> Vec<TableEntry> {
        let mut rows: Vec<TableEntry> = table
            .list()
            .into_iter()
            .map(|l| TableEntry {
                nr: l.nr,
                name: l.name,
                kind: l.kind,
                overrides_standard: l.overrides_standard,
            })
            .collect();
        rows.sort_by_key(|r| r.nr);
        rows
    }
}

/// One answered hypercall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallEntry {
    /// Position in the recording (0, 1, 2, ... in the order the host answered the calls).
    pub seq: u64,
    /// The calling vCPU.
    pub vcpu: u32,
    /// The number, after truncation.
    #[serde(with = "hex")]
    pub nr: u64,
    /// a0..a3, after truncation.
    #[serde(with = "hex::four")]
    pub args: [u64; 4],
    /// The value written to RAX.
    #[serde(with = "hex")]
    pub result: u64,
    /// The caller's privilege level.
    pub cpl: u8,
    /// The caller's mode ([`CpuMode::name`]).
    pub mode: String,
    /// Address of the hypercall instruction.
    #[serde(with = "hex")]
    pub rip: u64,
    /// Who answered it ([`AnsweredBy::name`]).
    pub by: String,
    /// The custom handler that answered, by its name at the time.
    pub handler: Option<String>,
    /// When it was answered, in nanoseconds since the recording started (not compared).
    pub time_ns: u64,
    /// Host handling time (not compared).
    pub latency_ns: u64,
}

impl CallEntry {
    /// The entry of call `c`, number `seq` of its recording, answered at `time_ns`.
    fn of(seq: u64, c: &CallRecord<'_>, time_ns: u64) -> Self {
        CallEntry {
            seq,
            vcpu: c.vcpu,
            nr: c.nr,
            args: c.args,
            result: c.ret,
            cpl: c.cpl,
            mode: c.mode.name().into(),
            rip: c.rip,
            by: c.answered_by.name().into(),
            handler: c.handler.map(String::from),
            time_ns,
            latency_ns: c.latency_ns,
        }
    }

    /// The caller's mode (64-bit for a name this vmcall does not know).
    pub fn cpu_mode(&self) -> CpuMode {
        CpuMode::from_name(&self.mode).unwrap_or(CpuMode::Long64)
    }

    /// Who answered it, if the name is known.
    pub fn answered_by(&self) -> Option<AnsweredBy> {
        AnsweredBy::from_name(&self.by)
    }

    /// Whether `other` is the same call as the guest sees it: number, arguments, result,
    /// privilege, mode and address. Sequence, time, latency and handler names are not compared.
    pub fn same_call(&self, other: &CallEntry) -> bool {
        (self.vcpu, self.nr, self.args, self.result, self.cpl, &self.mode, self.rip)
            == (other.vcpu, other.nr, other.args, other.result, other.cpl, &other.mode, other.rip)
    }
}

/// The last line of a recording whose run ended (a recording without one was cut short).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// Calls recorded.
    pub calls: u64,
    /// How long the run took.
    pub elapsed_ns: u64,
    /// How it ended: `exited N`, `halted`, `stopped`, `timeout`, or `error: ...`.
    pub outcome: String,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Line {
    Header(Header),
    Call(CallEntry),
    End(End),
}

/// Why a recording could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading failed.
    #[error("cannot read the recording")]
    Io(#[from] std::io::Error),
    /// The first line is not a recording header.
    #[error("not a vmcall recording (the first line is not a {FORMAT} header)")]
    NotARecording,
    /// Written by a newer vmcall.
    #[error("recording format version {0}; this vmcall reads versions 1 to {VERSION}")]
    Version(u32),
    /// A line that does not parse.
    #[error("line {line}: {source}")]
    Line {
        /// 1-based.
        line: usize,
        /// What is wrong with it.
        source: serde_json::Error,
    },
    /// A line after the end line, or a second header.
    #[error("line {0}: unexpected {1} line")]
    Unexpected(usize, &'static str),
    /// A vCPU count or number no run of vmcall can have (a header outside
    /// `1..=MAX_VCPUS`, or a call on a vCPU the header does not have).
    #[error("line {line}: vCPU {vcpu} (the recording's VM has {vcpus}; vmcall runs at most {max})", max = MAX_VCPUS)]
    Vcpu {
        /// 1-based.
        line: usize,
        /// The vCPU number, or the header's count.
        vcpu: u32,
        /// The header's vCPU count.
        vcpus: u32,
    },
}

/// A recording read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recording {
    /// The header.
    pub header: Header,
    /// Every call, in order.
    pub calls: Vec<CallEntry>,
    /// The end line, if the run ended normally.
    pub end: Option<End>,
}

impl Recording {
    /// Parse a whole recording into memory (empty lines are skipped). [`RecordingReader`]
    /// reads one call at a time instead.
    pub fn read(input: impl BufRead) -> Result<Self, RecordError> {
        let mut reader = RecordingReader::new(input)?;
        let calls = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
        let RecordingReader { header, end, .. } = reader;
        Ok(Recording { header, calls, end })
    }

    /// The calls of vCPU `vcpu`, in order.
    pub fn calls_of(&self, vcpu: u32) -> impl Iterator<Item = &CallEntry> {
        self.calls.iter().filter(move |c| c.vcpu == vcpu)
    }
}

/// Reads a recording one call at a time: the header when created, then each call as an
/// iterator item (`Err` for the first line that is not one, after which it yields nothing),
/// then [`RecordingReader::end`] once the calls are exhausted. Memory stays that of one line.
#[derive(Debug)]
pub struct RecordingReader<R> {
    input: R,
    header: Header,
    end: Option<End>,
    /// 1-based number of the last line read.
    line_no: usize,
    /// The line being parsed, reused from line to line.
    buf: String,
    done: bool,
}

impl<R: BufRead> RecordingReader<R> {
    /// Start reading `input`: its first non-empty line must be a recording header of a
    /// version this vmcall reads.
    pub fn new(mut input: R) -> Result<Self, RecordError> {
        let mut buf = String::new();
        let mut line_no = 0;
        loop {
            buf.clear();
            line_no += 1;
            match input.read_line(&mut buf) {
                Ok(0) => return Err(RecordError::NotARecording),
                Ok(_) => {}
                // Bytes that are not text before any header: some other file.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(RecordError::NotARecording)
                }
                Err(e) => return Err(e.into()),
            }
            if !buf.trim().is_empty() {
                break;
            }
        }
        let header = match serde_json::from_str::<Line>(buf.trim_end_matches(['\n', '\r'])) {
            Ok(Line::Header(h)) => h,
            _ => return Err(RecordError::NotARecording),
        };
        if header.format != FORMAT {
            return Err(RecordError::NotARecording);
        }
        if header.version == 0 || header.version > VERSION {
            return Err(RecordError::Version(header.version));
        }
        // Readers size per-vCPU state from these numbers: a file may not make them allocate
        // more than a real run could have.
        if !(1..=MAX_VCPUS).contains(&header.vcpus) {
            let vcpus = header.vcpus;
            return Err(RecordError::Vcpu { line: line_no, vcpu: vcpus, vcpus });
        }
        Ok(RecordingReader { input, header, end: None, line_no, buf, done: false })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The end line, once the iterator has returned `None` (`None` here then means the
    /// recording was cut short: its run did not end normally).
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    fn next_call(&mut self) -> Result<Option<CallEntry>, RecordError> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            if self.input.read_line(&mut self.buf)? == 0 {
                return Ok(None);
            }
            if self.buf.trim().is_empty() {
                continue;
            }
            let line = self.line_no;
            // Call lines as vmcall writes them (nearly every line) parse straight into a
            // CallEntry, which ignores the `type` field: the tagged enum buffers each line's fields
            // before it picks the variant (a million calls: `vmcall stats` 1.9 s -> 1.3 s).
            // A line that fails is parsed again through the enum, for the same error either way.
            let text = self.buf.trim_end_matches(['\n', '\r']);
            let fast = text.starts_with("{\"type\":\"call\",");
            let parsed = match fast.then(|| serde_json::from_str(text)) {
                Some(Ok(call)) => Line::Call(call),
                _ => serde_json::from_str(text)
                    .map_err(|source| RecordError::Line { line, source })?,
            };
            match (parsed, &self.end) {
                (Line::Header(_), _) => {
                    return Err(RecordError::Unexpected(self.line_no, "header"))
                }
                (_, Some(_)) => {
                    return Err(RecordError::Unexpected(self.line_no, "line after the end"))
                }
                (Line::Call(c), None) if c.vcpu >= self.header.vcpus => {
                    let vcpus = self.header.vcpus;
                    return Err(RecordError::Vcpu { line, vcpu: c.vcpu, vcpus });
                }
                (Line::Call(c), None) => return Ok(Some(c)),
                (Line::End(e), None) => self.end = Some(e),
            }
        }
    }
}

impl<R: BufRead> Iterator for RecordingReader<R> {
    type Item = Result<CallEntry, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_call().transpose();
        self.done = !matches!(next, Some(Ok(_)));
        next
    }
}

struct RecState {
    out: Box<dyn Write + Send>,
    seq: u64,
    error: Option<std::io::Error>,
    /// The line being written, reused from call to call.
    line: String,
}

/// Writes a recording: the header when created, a line per call as a [`CallSink`], the end
/// line at [`Recorder::finish`].
pub struct Recorder {
    state: Mutex<RecState>,
    start: Instant,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recording to `out`, starting with `header`'s line.
    pub fn new(out: Box<dyn Write + Send>, header: &Header) -> std::io::Result<Self> {
        let rec = Self::create(out);
        rec.begin(header)?;
        Ok(rec)
    }

    /// A recording to `out` whose header [`Recorder::begin`] writes, once the VM is built
    /// (and its backend can say how it traps hypercalls) but before it runs.
    pub fn create(out: Box<dyn Write + Send>) -> Self {
        Recorder {
            state: Mutex::new(RecState { out, seq: 0, error: None, line: String::new() }),
            start: Instant::now(),
        }
    }

    /// Write the header line: call it once, before the first call is recorded.
    pub fn begin(&self, header: &Header) -> std::io::Result<()> {
        let mut line = serde_json::to_string(&Line::Header(header.clone()))?;
        line.push('\n');
        self.lock().out.write_all(line.as_bytes())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write the end line (`outcome`: how the run ended) and flush. Returns the first write
    /// error of the whole recording, if any.
    pub fn finish(&self, outcome: &str) -> std::io::Result<()> {
        let elapsed_ns = self.start.elapsed().as_nanos() as u64;
        let mut st = self.lock();
        let end = End { calls: st.seq, elapsed_ns, outcome: outcome.into() };
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        let mut line = serde_json::to_string(&Line::End(end))?;
        line.push('\n');
        st.out.write_all(line.as_bytes())?;
        st.out.flush()
    }
}

impl CallSink for Recorder {
    fn record(&self, c: &CallRecord<'_>) {
        let time_ns = self.start.elapsed().as_nanos() as u64;
        let mut guard = self.lock();
        let st = &mut *guard;
        let seq = st.seq;
        st.seq += 1;
        call_line(&mut st.line, seq, c, time_ns);
        if let Err(e) = st.out.write_all(st.line.as_bytes()) {
            if st.error.is_none() {
                tracing::warn!("cannot write the recording ({e}); later calls are lost");
                st.error = Some(e);
            }
        }
    }
}

/// `call`'s line, written by hand into `line` (a call line is what a recording is mostly made
/// of, and this costs a fraction of serialising a [`CallEntry`]): the same fields in the same
/// form, which the format's tests read back through [`Recording::read`].
fn call_line(line: &mut String, seq: u64, c: &CallRecord<'_>, time_ns: u64) {
    use std::fmt::Write as _;
    line.clear();
    let [a0, a1, a2, a3] = c.args;
    let _ = write!(
        line,
        "{{\"type\":\"call\",\"seq\":{seq},\"vcpu\":{},\"nr\":\"{:#x}\",\"args\":[\"{a0:#x}\",\"{a1:#x}\",\
         \"{a2:#x}\",\"{a3:#x}\"],\"result\":\"{:#x}\",\"cpl\":{},\"mode\":\"{}\",\"rip\":\"{:#x}\",\
         \"by\":\"{}\",\"handler\":",
        c.vcpu,
        c.nr,
        c.ret,
        c.cpl,
        c.mode.name(),
        c.rip,
        c.answered_by.name(),
    );
    match c.handler {
        None => line.push_str("null"),
        // Names needing no escapes (nearly all) go in as they are.
        Some(h) if !h.chars().any(|ch| ch == '"' || ch == '\\' || ch.is_control()) => {
            let _ = write!(line, "\"{h}\"");
        }
        Some(h) => line.push_str(&serde_json::to_string(h).expect("a string serialises")),
    }
    let _ = writeln!(line, ",\"time_ns\":{time_ns},\"latency_ns\":{}}}", c.latency_ns);
}

/// What a replay found for one recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The same result.
    Same,
    /// A different result: what the replay answered, and who answered it.
    Changed {
        /// The new result.
        result: u64,
        /// Who answered it now.
        by: AnsweredBy,
        /// The custom handler that answered it now.
        handler: Option<String>,
    },
    /// Its answer depends on guest memory the recording does not hold (a batch, or a handler
    /// that reads or writes guest memory): not replayable without the guest.
    NeedsGuestMemory,
}

/// The result of [`replay`]: one verdict per recorded call, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// `verdicts[i]` is for `recording.calls[i]`.
    pub verdicts: Vec<Verdict>,
}

impl Replay {
    /// Indices of the calls whose result changed.
    pub fn changed(&self) -> impl Iterator<Item = usize> + '_ {
        self.verdicts
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v, Verdict::Changed { .. }))
            .map(|(i, _)| i)
    }

    /// (same, changed, needing guest memory).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut n = (0, 0, 0);
        for v in &self.verdicts {
            match v {
                Verdict::Same => n.0 += 1,
                Verdict::Changed { .. } => n.1 += 1,
                Verdict::NeedsGuestMemory => n.2 += 1,
            }
        }
        n
    }
}

/// The platform of a replay: the recorded vCPU count and PV CPUID; kicks and yields reach
/// nothing and the TSC reads 0 (no standard result depends on them).
struct ReplayPlatform {
    vcpus: u32,
    pv: PvCpuid,
}

impl Platform for ReplayPlatform {
    fn vcpu_count(&self) -> u32 {
        self.vcpus
    }
    fn kick_cpu(&self, _: u64) {}
    fn yield_to(&self, _: u64) {}
    fn guest_tsc(&self) -> u64 {
        0
    }
    fn pv_has(&self, bit: u32) -> bool {
        self.pv.has(bit)
    }
}

/// Whether a call to `nr` from `cpl` needs guest memory that a replay does not have, with
/// `snapshot` answering it.
fn needs_guest_memory(snapshot: &TableSnapshot, nr: u64, cpl: u8) -> bool {
    if cpl != 0 {
        return false; // refused before any handler runs
    }
    match snapshot.get(nr) {
        Some(entry) => entry.handler.uses_guest_memory(),
        // A batch reads its entries from guest memory. The other standard numbers that touch
        // memory (CLOCK_PAIRING, LIST) only write it: their results depend on the address
        // being inside RAM, which a replay's scratch RAM of the recorded size reproduces.
        None => nr == vmcall_abi::hc::VMCALL_HC_BATCH,
    }
}

/// Answer every call of `recording` again with `table`, without a guest, through the same
/// emulation as a run (KVM's CPL and truncation rules, its standard hypercalls), and compare
/// each result with the recorded one. Handlers get a zeroed scratch RAM of the recorded size;
/// calls whose answer would depend on guest memory are not answered but reported as
/// [`Verdict::NeedsGuestMemory`]. [`Replayer`] does the same one call at a time.
pub fn replay(recording: &Recording, table: &HypercallTable) -> Result<Replay, RamError> {
    let replayer = Replayer::new(&recording.header, table)?;
    let verdicts = recording.calls.iter().map(|c| replayer.verdict(c)).collect();
    Ok(Replay { verdicts })
}

/// [`replay`] one call at a time, for calls streamed from a [`RecordingReader`].
pub struct Replayer<'t> {
    table: &'t HypercallTable,
    snapshot: TableSnapshot,
    ram: GuestRam,
    platform: ReplayPlatform,
}

impl std::fmt::Debug for Replayer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer").finish_non_exhaustive()
    }
}

impl<'t> Replayer<'t> {
    /// A replay of calls recorded under `header` (its memory size, vCPU count and PV CPUID),
    /// answered by `table`.
    pub fn new(header: &Header, table: &'t HypercallTable) -> Result<Self, RamError> {
        let ram = GuestRam::new(header.memory)?;
        let pv = PvCpuid { features: header.pv_features as u32, enforce: header.enforce_pv_cpuid };
        let platform = ReplayPlatform { vcpus: header.vcpus, pv };
        Ok(Replayer { table, snapshot: table.snapshot(), ram, platform })
    }

    /// Answer `c` again and compare the result with the recorded one.
    pub fn verdict(&self, c: &CallEntry) -> Verdict {
        if needs_guest_memory(&self.snapshot, c.nr, c.cpl) {
            return Verdict::NeedsGuestMemory;
        }
        let exit = HypercallExit {
            nr: c.nr,
            args: c.args,
            cpl: c.cpl,
            mode: c.cpu_mode(),
            rip: c.rip,
            insn: HypercallInsn::Vmcall,
            paging: PagingContext::default(),
        };
        emulate_with(self.table, &exit, c.vcpu, &self.ram, &self.platform, |done, entry| {
            if done.rax == c.result {
                Verdict::Same
            } else {
                Verdict::Changed {
                    result: done.rax,
                    by: done.answered_by,
                    handler: entry.map(|e| e.name.to_string()),
                }
            }
        })
    }
}

/// Where a vCPU's calls in a re-run part from its recorded ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The vCPU.
    pub vcpu: u32,
    /// Index of the first differing call among that vCPU's calls (0-based).
    pub index: usize,
    /// The recorded call there (`None`: the recording has no more calls on this vCPU).
    pub recorded: Option<CallEntry>,
    /// The re-run's call there (`None`: the re-run made no more calls on this vCPU).
    pub rerun: Option<CallEntry>,
}

mod compare;
pub use compare::{compare_streams, Comparison, StreamComparer, READ_AHEAD};

#[cfg(test)]
mod tests;
