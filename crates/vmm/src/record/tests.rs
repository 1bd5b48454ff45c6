use super::*;
use crate::hypercall::handlers::Builtin;
use crate::testing::Capture;

fn call(vcpu: u32, nr: u64, a0: u64, ret: u64, handler: Option<&str>) -> CallRecord<'_> {
    CallRecord {
        vcpu,
        nr,
        args: [a0, 0, 0, u64::MAX],
        ret,
        cpl: 0,
        mode: CpuMode::Long64,
        rip: 0x20_1000 + nr,
        answered_by: if handler.is_some() { AnsweredBy::Custom } else { AnsweredBy::Standard },
        handler,
        latency_ns: 100,
    }
}

fn table(spec20: &str) -> HypercallTable {
    let t = HypercallTable::new();
    t.register(20, spec20, spec20.parse::<Builtin>().unwrap()).unwrap();
    t
}

/// A recording of: 20(7) -> 8 twice by `const:8`, a standard poll, 21 unhandled, a batch.
fn recorded() -> (String, Recording) {
    let buf = Capture::default();
    let mut header = Header::new("emu", "guest.elf");
    header.vcpus = 2;
    header.table = Header::table_of(&table("const:8"));
    let rec = Recorder::new(Box::new(buf.clone()), &header).unwrap();
    rec.record(&call(0, 20, 7, 8, Some("const:8")));
    rec.record(&call(1, 1, 0, 0, None));
    rec.record(&call(0, 21, 0, crate::hypercall::neg(1000), None));
    rec.record(&call(1, 20, 9, 8, Some("const:8")));
    rec.record(&call(0, vmcall_abi::hc::VMCALL_HC_BATCH, 0x8000, 4, None));
    rec.finish("exited 0").unwrap();
    let text = String::from_utf8(buf.bytes()).unwrap();
    let parsed = Recording::read(text.as_bytes()).unwrap();
    (text, parsed)
}

#[test]
fn a_recording_is_a_header_a_line_per_call_and_an_end() {
    let (text, r) = recorded();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[0]["type"], "header");
    assert_eq!(lines[0]["format"], FORMAT);
    assert_eq!(lines[0]["version"], VERSION);
    assert_eq!(lines[0]["vmcall"], env!("CARGO_PKG_VERSION"));
    assert_eq!(lines[0]["table"][0]["nr"], "0x14");
    assert_eq!(lines[0]["table"][0]["name"], "const:8");
    assert_eq!(lines[1]["type"], "call");
    assert_eq!(lines[1]["nr"], "0x14");
    assert_eq!(lines[1]["args"][3], "0xffffffffffffffff");
    assert_eq!(lines[1]["result"], "0x8");
    assert_eq!(lines[1]["rip"], "0x201014");
    assert_eq!(
        (lines[1]["by"].as_str(), lines[1]["handler"].as_str()),
        (Some("custom"), Some("const:8"))
    );
    assert_eq!(lines[2]["handler"], serde_json::Value::Null);
    assert_eq!((lines[4]["seq"].as_u64(), lines[4]["vcpu"].as_u64()), (Some(3), Some(1)));
    assert_eq!(lines[6]["type"], "end");
    assert_eq!(
        (lines[6]["calls"].as_u64(), lines[6]["outcome"].as_str()),
        (Some(5), Some("exited 0"))
    );

    assert_eq!(r.header.vcpus, 2);
    assert_eq!(r.calls.len(), 5);
    assert_eq!(r.calls[0].args, [7, 0, 0, u64::MAX]);
    assert_eq!(r.calls[2].result, crate::hypercall::neg(1000));
    assert_eq!(r.calls[0].cpu_mode(), CpuMode::Long64);
    assert_eq!(r.calls[1].answered_by(), Some(AnsweredBy::Standard));
    assert_eq!(r.calls_of(1).count(), 2);
    assert_eq!(r.end.as_ref().map(|e| e.calls), Some(5));
}

#[test]
fn bad_recordings_are_refused_with_the_reason() {
    let err = |t: &str| Recording::read(t.as_bytes()).unwrap_err().to_string();
    assert!(err("hello\n").contains("not a vmcall recording"));
    assert!(err("").contains("not a vmcall recording"));
    let (text, _) = recorded();
    let newer = text.replacen("\"version\":1", "\"version\":99", 1);
    assert!(err(&newer).contains("format version 99"), "{}", err(&newer));
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "{\"type\":\"call\",\"seq\":\"x\"}";
    let e = err(&lines.join("\n"));
    assert!(e.starts_with("line 3:"), "{e}");
    let mut after_end = text.clone();
    after_end.push_str(text.lines().nth(1).unwrap());
    assert!(err(&after_end).contains("line 8: unexpected line after the end"));
    // A recording cut short (no end line) still reads: every call up to the cut.
    let cut: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    let r = Recording::read(cut.as_bytes()).unwrap();
    assert_eq!((r.calls.len(), r.end), (2, None));
}

/// Bytes of `text`, then a read error: what a reader gets of a file that fails part-way.
struct FailsAfter<'a>(&'a [u8]);

impl std::io::Read for FailsAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() {
            return Err(std::io::Error::other("disk on fire"));
        }
        let n = self.0.len().min(buf.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn the_reader_yields_calls_one_by_one_and_stops_at_the_first_bad_line() {
    let (text, whole) = recorded();
    // The whole recording: each call in order, then the end line.
    let mut r = RecordingReader::new(text.as_bytes()).unwrap();
    assert_eq!(r.header(), &whole.header);
    for want in &whole.calls {
        assert!(r.end().is_none());
        assert_eq!(&r.next().unwrap().unwrap(), want);
    }
    assert!(r.next().is_none());
    assert_eq!(r.end().map(|e| e.outcome.as_str()), Some("exited 0"));

    // The calls before a malformed line come out before its error, which names the line;
    // nothing comes after it.
    let mut lines: Vec<&str> = text.lines().collect();
    lines[3] = "{\"type\":\"call\",\"seq\":\"x\"}";
    let bad = lines.join("\n");
    let mut r = RecordingReader::new(bad.as_bytes()).unwrap();
    assert_eq!(r.next().unwrap().unwrap(), whole.calls[0]);
    assert_eq!(r.next().unwrap().unwrap(), whole.calls[1]);
    let e = r.next().unwrap().unwrap_err().to_string();
    assert!(e.starts_with("line 4:"), "{e}");
    assert!(r.next().is_none());

    // Calls are yielded as they are read: those before a read error arrive first.
    let head: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    let input = std::io::BufReader::with_capacity(64, FailsAfter(head.as_bytes()));
    let mut r = RecordingReader::new(input).unwrap();
    assert_eq!(r.next().unwrap().unwrap(), whole.calls[0]);
    assert_eq!(r.next().unwrap().unwrap(), whole.calls[1]);
    assert!(matches!(r.next(), Some(Err(RecordError::Io(_)))));
    assert!(r.next().is_none());

    // A recording cut short: every call up to the cut, then no end line.
    let mut r = RecordingReader::new(head.as_bytes()).unwrap();
    assert_eq!(r.by_ref().map(Result::unwrap).collect::<Vec<_>>(), whole.calls[..2]);
    assert!(r.end().is_none());

    // Not a recording: refused when opened, before any call.
    assert!(matches!(
        RecordingReader::new(&b"{\"type\":\"call\"}\n"[..]),
        Err(RecordError::NotARecording)
    ));
}

#[test]
fn the_replayer_gives_the_verdicts_of_replay_call_by_call() {
    let (_, rec) = recorded();
    let t = table("const:9");
    let whole = replay(&rec, &t).unwrap();
    let replayer = Replayer::new(&rec.header, &t).unwrap();
    let one_by_one: Vec<Verdict> = rec.calls.iter().map(|c| replayer.verdict(c)).collect();
    assert_eq!(one_by_one, whole.verdicts);
    assert_eq!(whole.counts(), (2, 2, 1));
}

#[test]
fn replay_with_the_same_table_changes_nothing() {
    let (_, r) = recorded();
    let out = replay(&r, &table("const:8")).unwrap();
    assert_eq!(
        out.verdicts,
        vec![Verdict::Same, Verdict::Same, Verdict::Same, Verdict::Same, Verdict::NeedsGuestMemory],
        "standard answers replay through the same emulation; a batch needs guest memory"
    );
    assert_eq!(out.counts(), (4, 0, 1));
}

#[test]
fn replay_with_a_changed_handler_reports_exactly_the_changed_calls() {
    let (_, r) = recorded();
    let out = replay(&r, &table("echo")).unwrap();
    // 20(7) by echo is 7 (was 8); 20(9) is 9.
    assert_eq!(out.changed().collect::<Vec<_>>(), vec![0, 3]);
    assert_eq!(
        out.verdicts[0],
        Verdict::Changed { result: 7, by: AnsweredBy::Custom, handler: Some("echo".into()) }
    );
    // const:8 again but a handler for 21 too: only the call to 21 changes.
    let t = table("const:8");
    t.register(21, "const:1", Builtin::Const(1)).unwrap();
    assert_eq!(replay(&r, &t).unwrap().changed().collect::<Vec<_>>(), vec![2]);
    // An empty table: 20 falls back to KVM's -ENOSYS.
    let out = replay(&r, &HypercallTable::new()).unwrap();
    assert_eq!(out.changed().collect::<Vec<_>>(), vec![0, 3]);
    assert!(matches!(
        &out.verdicts[0],
        Verdict::Changed { by: AnsweredBy::Standard, handler: None, .. }
    ));
}

#[test]
fn replay_keeps_kvms_rules_cpl_truncation_and_vcpu_count() {
    let mut r = recorded().1;
    r.calls.truncate(0);
    let mut c = CallEntry {
        seq: 0,
        vcpu: 0,
        nr: 20,
        args: [7, 0, 0, 0],
        result: u64::MAX, // -KVM_EPERM
        cpl: 3,
        mode: "64-bit".into(),
        rip: 0x20_0000,
        by: "not-privileged".into(),
        handler: None,
        time_ns: 0,
        latency_ns: 0,
    };
    r.calls.push(c.clone());
    // SEND_IPI to vCPUs 0..2 of a 2-vCPU VM reaches 2.
    c.cpl = 0;
    c.nr = vmcall_abi::hc::KVM_HC_SEND_IPI;
    c.args = [0b111, 0, 0, 0];
    c.result = 2;
    r.calls.push(c.clone());
    // From compat-32, the result is truncated to 32 bits.
    c.nr = 20;
    c.mode = "compat-32".into();
    c.result = 8;
    r.calls.push(c);
    let out = replay(&r, &table("const:0x100000008")).unwrap();
    assert_eq!(out.verdicts, vec![Verdict::Same; 3]);
}

#[test]
fn wasm_handlers_need_guest_memory_only_when_they_import_it() {
    #[cfg(feature = "wasm")]
    {
        use crate::hypercall::wasm::{WasmConfig, WasmHandler};
        let pure = r#"(module (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64)
            (i64.add (local.get 1) (i64.const 1))))"#;
        let reads = r#"(module
            (import "vmcall" "read_phys" (func $r (param i64 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64)
              (i64.extend_i32_s (call $r (local.get 1) (i32.const 0) (i32.const 8)))))"#;
        let (_, r) = recorded();
        for (wat, want) in [(pure, Verdict::Same), (reads, Verdict::NeedsGuestMemory)] {
            let t = HypercallTable::new();
            let h = WasmHandler::from_bytes("h", wat.as_bytes(), WasmConfig::default()).unwrap();
            t.register(20, "h", h).unwrap();
            assert_eq!(replay(&r, &t).unwrap().verdicts[0], want);
        }
    }
}

#[test]
fn streams_are_compared_vcpu_by_vcpu() {
    let (_, r) = recorded();
    assert!(compare_streams(&r.calls, &r.calls).is_empty());
    // Another interleaving of the same per-vCPU streams, other times and sequence numbers.
    let mut other: Vec<CallEntry> = r.calls_of(1).chain(r.calls_of(0)).cloned().collect();
    for (i, c) in other.iter_mut().enumerate() {
        c.seq = i as u64;
        c.time_ns += 5;
        c.latency_ns = 1;
    }
    assert!(compare_streams(&r.calls, &other).is_empty());
    // vCPU 0's second call answers differently; vCPU 1 stops early.
    let mut changed = r.calls.clone();
    changed[2].result = 5;
    changed.remove(3);
    let d = compare_streams(&r.calls, &changed);
    assert_eq!(d.len(), 2);
    assert_eq!((d[0].vcpu, d[0].index), (0, 1));
    assert_eq!(d[0].recorded.as_ref().unwrap().result, r.calls[2].result);
    assert_eq!(d[0].rerun.as_ref().unwrap().result, 5);
    assert_eq!((d[1].vcpu, d[1].index, d[1].rerun.as_ref()), (1, 1, None));
}

#[test]
fn hand_written_call_lines_are_what_serde_reads_back() {
    for handler in [None, Some("const:3"), Some("exec:printf \"%s\\n\" x\ty")] {
        let mut c = call(3, 0xdead_beef_0000_0014, 1 << 63, crate::hypercall::neg(22), handler);
        c.mode = CpuMode::Compat32;
        c.answered_by = AnsweredBy::Panicked;
        let mut line = String::new();
        call_line(&mut line, 42, &c, 7);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line}");
        let back: Line = serde_json::from_str(&line).unwrap();
        let Line::Call(e) = back else { panic!("not a call line: {line}") };
        assert_eq!(
            e,
            CallEntry {
                seq: 42,
                vcpu: 3,
                nr: 0xdead_beef_0000_0014,
                args: [1 << 63, 0, 0, u64::MAX],
                result: crate::hypercall::neg(22),
                cpl: 0,
                mode: "compat-32".into(),
                rip: 0x20_1000 + 0xdead_beef_0000_0014,
                by: "panicked".into(),
                handler: handler.map(String::from),
                time_ns: 7,
                latency_ns: 100,
            }
        );
    }
}

#[test]
fn vcpu_numbers_no_run_could_have_are_refused_by_line() {
    let (text, _) = recorded();
    // A header claiming more vCPUs than vmcall runs: readers size per-vCPU state from it.
    let huge = text.replacen("\"vcpus\":2", "\"vcpus\":4000000000", 1);
    assert_ne!(huge, text, "the header names its vCPU count");
    let e = RecordingReader::new(huge.as_bytes()).unwrap_err();
    assert!(matches!(e, RecordError::Vcpu { line: 1, vcpu: 4_000_000_000, .. }), "{e}");
    // A call on a vCPU the header does not have.
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[2] = lines[2].replacen("\"vcpu\":1", "\"vcpu\":2", 1);
    let bad = lines.join("\n");
    let mut r = RecordingReader::new(bad.as_bytes()).unwrap();
    assert!(r.next().unwrap().is_ok());
    let e = r.next().unwrap().unwrap_err().to_string();
    assert!(e.starts_with("line 3: vCPU 2 (the recording's VM has 2"), "{e}");
    assert!(r.next().is_none());
}

/// `calls` as a recording of `vcpus` vCPUs (with an end line).
fn recording_of(vcpus: u32, calls: &[CallRecord<'_>]) -> String {
    let buf = Capture::default();
    let mut header = Header::new("emu", "guest.elf");
    header.vcpus = vcpus;
    let rec = Recorder::new(Box::new(buf.clone()), &header).unwrap();
    for c in calls {
        rec.record(c);
    }
    rec.finish("exited 0").unwrap();
    String::from_utf8(buf.bytes()).unwrap()
}

/// A divergence as the guest sees it (the re-run's sequence numbers and times aside).
type Seen = (u32, usize, Option<u64>, Option<(u32, u64, [u64; 4], u64, u64)>);

fn seen(d: &[Divergence]) -> Vec<Seen> {
    d.iter()
        .map(|d| {
            let rerun = d.rerun.as_ref().map(|c| (c.vcpu, c.nr, c.args, c.result, c.rip));
            (d.vcpu, d.index, d.recorded.as_ref().map(|c| c.seq), rerun)
        })
        .collect()
}

/// Feed `rerun` to a comparer of `text` in order, as a re-run's vCPUs would.
fn compare_as_made(text: &str, rerun: &[CallRecord<'_>]) -> Result<Comparison, RecordError> {
    let input = std::io::Cursor::new(text.as_bytes().to_vec());
    let comparer = StreamComparer::new(RecordingReader::new(input).unwrap()).unwrap();
    for c in rerun {
        comparer.record(c);
    }
    comparer.finish()
}

proptest::proptest! {
    /// Compared as they are made, a re-run's calls diverge exactly where the two streams held
    /// in memory do: any interleaving of the vCPUs, changed results, calls missing or extra.
    #[test]
    fn the_stream_comparer_finds_what_comparing_whole_streams_finds(
        vcpus in 1u32..=3,
        recorded in proptest::collection::vec((0u32..3, 0u64..3, 0u64..3), 0..40),
        edits in proptest::collection::vec((0u32..3, 0usize..40, 0u8..3), 0..4),
        order in proptest::collection::vec(0u32..3, 0..80),
    ) {
        let recorded: Vec<CallRecord<'_>> = recorded
            .iter()
            .map(|&(v, nr, ret)| call(v % vcpus, 20 + nr, nr, ret, None))
            .collect();
        // The re-run: each vCPU's recorded calls, edited ...
        let mut per_vcpu: Vec<Vec<CallRecord<'_>>> = (0..vcpus)
            .map(|v| recorded.iter().filter(|c| c.vcpu == v).cloned().collect())
            .collect();
        for &(v, at, kind) in &edits {
            let calls = &mut per_vcpu[(v % vcpus) as usize];
            match kind {
                0 if at < calls.len() => calls[at].ret ^= 1,
                1 => calls.truncate(at),
                _ => calls.push(call(v % vcpus, 29, 0, 0, None)),
            }
        }
        // ... then interleaved in another order.
        let mut next = vec![0usize; vcpus as usize];
        let mut rerun = Vec::new();
        for v in order.iter().map(|v| (v % vcpus) as usize).chain((0..vcpus as usize).cycle().take(200)) {
            if let Some(c) = per_vcpu[v].get(next[v]) {
                rerun.push(*c);
                next[v] += 1;
            }
        }
        let text = recording_of(vcpus, &recorded);
        let whole = Recording::read(text.as_bytes()).unwrap();
        let rerun_entries: Vec<CallEntry> =
            rerun.iter().enumerate().map(|(i, c)| CallEntry::of(i as u64, c, 0)).collect();
        let streamed = compare_as_made(&text, &rerun).unwrap();
        proptest::prop_assert_eq!(
            seen(&streamed.divergences),
            seen(&compare_streams(&whole.calls, &rerun_entries))
        );
        proptest::prop_assert_eq!(streamed.recorded_calls, recorded.len() as u64);
        proptest::prop_assert_eq!(streamed.rerun_calls, rerun.len() as u64);
        proptest::prop_assert_eq!(streamed.end.map(|e| e.outcome), Some("exited 0".to_string()));
    }
}

/// Reads what it is given, counting the bytes handed out.
struct Counting<'a>(&'a [u8], std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl std::io::Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.len().min(buf.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        self.1.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

#[test]
fn the_stream_comparer_reads_the_recording_only_as_far_as_the_rerun_has_got() {
    let calls: Vec<CallRecord<'_>> = (0..20_000).map(|i| call(0, 20, i, i * 2, None)).collect();
    let text = recording_of(1, &calls);
    let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let text: &'static str = Box::leak(text.into_boxed_str());
    let input = std::io::BufReader::with_capacity(512, Counting(text.as_bytes(), read.clone()));
    let comparer = StreamComparer::new(RecordingReader::new(input).unwrap()).unwrap();
    // The re-run's fourth call answers differently.
    for (i, c) in calls.iter().take(10).enumerate() {
        let mut c = *c;
        if i == 3 {
            c.ret = 1;
        }
        comparer.record(&c);
    }
    // The reading thread is READ_AHEAD calls ahead at most, however long it has had.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let line = text.len() / 20_000;
    let so_far = read.load(std::sync::atomic::Ordering::Relaxed);
    assert!(so_far <= READ_AHEAD * line + 1024, "{so_far} bytes of {} read", text.len());
    let done = comparer.finish().unwrap();
    assert_eq!(read.load(std::sync::atomic::Ordering::Relaxed), text.len(), "then to the end");
    assert_eq!((done.recorded_calls, done.rerun_calls), (20_000, 10));
    assert_eq!(
        seen(&done.divergences),
        [(0, 3, Some(3), Some((0, 20, [3, 0, 0, u64::MAX], 1, 0x20_1014)))]
    );
}

#[test]
fn the_stream_comparer_reports_a_recording_it_cannot_read() {
    let calls: Vec<CallRecord<'_>> = (0..4).map(|i| call(i % 2, 20, i as u64, 0, None)).collect();
    let text = recording_of(2, &calls);
    let mut lines: Vec<&str> = text.lines().collect();
    lines[3] = "{\"type\":\"call\",\"seq\":\"x\"}";
    let bad = lines.join("\n");
    let e = compare_as_made(&bad, &calls).unwrap_err().to_string();
    assert!(e.starts_with("line 4:"), "{e}");
    // A re-run shorter than the recording still reads to the bad line.
    assert!(compare_as_made(&bad, &calls[..1]).is_err());
}
