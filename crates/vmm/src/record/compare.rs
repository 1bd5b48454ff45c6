//! Comparing a re-run's hypercall stream with a recording (`vmcall replay --guest`): the
//! order of calls across vCPUs depends on scheduling, each vCPU's own order does not, so the
//! streams are compared vCPU by vCPU, and the first divergence of each vCPU is what is kept.
//!
//! [`compare_streams`] compares two streams held in memory. [`StreamComparer`] compares the
//! re-run's calls as they are made (it is the re-run's [`CallSink`]) with a recording read only
//! as far as the re-run has got (and [`READ_AHEAD`] calls further): it holds the recorded calls
//! of each vCPU that were read while looking for another vCPU's and not yet compared — as many
//! as the vCPUs' progress differs between the two runs, none with one vCPU — and not the
//! recording. The recording is read on a thread of its own: the comparison runs on the vCPU
//! threads, whose seccomp filter allows no `read`.

use std::collections::{BTreeMap, VecDeque};
use std::io::BufRead;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{CallEntry, Divergence, End, Header, RecordError, RecordingReader};
use crate::trace::{CallRecord, CallSink};
use crate::vm::VmMonitor;

/// Compare a re-run's calls with the recorded ones, vCPU by vCPU: the first divergence of each
/// vCPU that has one, earliest in the recording first.
pub fn compare_streams(recorded: &[CallEntry], rerun: &[CallEntry]) -> Vec<Divergence> {
    let mut by_vcpu: BTreeMap<u32, (Vec<&CallEntry>, Vec<&CallEntry>)> = BTreeMap::new();
    for c in recorded {
        by_vcpu.entry(c.vcpu).or_default().0.push(c);
    }
    for c in rerun {
        by_vcpu.entry(c.vcpu).or_default().1.push(c);
    }
    let mut out: Vec<Divergence> = by_vcpu
        .into_iter()
        .filter_map(|(vcpu, (a, b))| {
            let index = (0..a.len().max(b.len())).find(|&i| match (a.get(i), b.get(i)) {
                (Some(x), Some(y)) => !x.same_call(y),
                _ => true,
            })?;
            Some(Divergence {
                vcpu,
                index,
                recorded: a.get(index).map(|c| (*c).clone()),
                rerun: b.get(index).map(|c| (*c).clone()),
            })
        })
        .collect();
    sort_divergences(&mut out);
    out
}

/// Earliest in the recording first; divergences where the recording had no more calls last.
fn sort_divergences(d: &mut [Divergence]) {
    d.sort_by_key(|d| (d.recorded.as_ref().map_or(u64::MAX, |c| c.seq), d.vcpu));
}

/// What [`StreamComparer::finish`] found.
#[derive(Debug)]
pub struct Comparison {
    /// The recording's header.
    pub header: Header,
    /// The first divergence of each vCPU that has one, as [`compare_streams`] orders them.
    pub divergences: Vec<Divergence>,
    /// Calls in the recording.
    pub recorded_calls: u64,
    /// Calls the re-run made.
    pub rerun_calls: u64,
    /// The recording's end line (`None`: it was cut short).
    pub end: Option<End>,
}

/// Compares a re-run's calls with a recording as the re-run makes them (see the module's
/// documentation). Give it to the re-run's VM as its call sink, then call
/// [`StreamComparer::finish`] once the run has ended.
pub struct StreamComparer {
    state: Mutex<State>,
    header: Header,
    start: Instant,
}

/// How many recorded calls the reading thread reads ahead of the comparison at most: the
/// chunks waiting in the channel, the one being taken apart and the one being filled.
pub const READ_AHEAD: usize = CHUNK * (CHUNKS_AHEAD + 1);
/// The reading thread hands calls over this many at a time (one channel message each).
const CHUNK: usize = 128;
const CHUNKS_AHEAD: usize = 8;

impl std::fmt::Debug for StreamComparer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamComparer").finish_non_exhaustive()
    }
}

/// What the reading thread sends: the calls, a chunk at a time, then how the recording ended.
enum Read {
    Calls(Vec<CallEntry>),
    /// The end line (`None`: none, the recording was cut short); nothing follows.
    End(Option<End>),
    /// The first line that could not be read; nothing follows.
    Error(RecordError),
}

struct State {
    recorded: Receiver<Read>,
    /// Calls received and not yet taken, in order.
    inbox: std::vec::IntoIter<CallEntry>,
    /// How the recording ended, once the reading thread has said so.
    ended: Option<Result<Option<End>, RecordError>>,
    /// Per vCPU: recorded calls read and not yet compared (none for a vCPU that diverged).
    pending: Vec<VecDeque<CallEntry>>,
    /// Per vCPU: how many of its calls the re-run has made.
    made: Vec<usize>,
    /// Per vCPU: its first divergence.
    diverged: Vec<Option<Divergence>>,
    recorded_calls: u64,
    rerun_calls: u64,
    /// The run being compared, once [`StreamComparer::watch`] has been called (and until
    /// [`StreamComparer::finish`]).
    run: Option<VmMonitor>,
    /// A wait for the recording gave up because the run is stopping.
    gave_up: bool,
}

/// How often a vCPU waiting for the recording checks whether the run is stopping.
const WAIT_STEP: Duration = Duration::from_millis(20);

impl State {
    /// The next recorded call, whichever vCPU made it: `None` once the recording has no more
    /// (or cannot be read further).
    fn read(&mut self) -> Option<CallEntry> {
        loop {
            if let Some(c) = self.inbox.next() {
                self.recorded_calls += 1;
                return Some(c);
            }
            if self.ended.is_some() {
                return None;
            }
            let received = match &self.run {
                // A vCPU waits no longer than its run: a stop or timeout must not wait for
                // a recording that comes slowly (from a pipe, say).
                Some(run) => match self.recorded.recv_timeout(WAIT_STEP) {
                    Ok(r) => Ok(r),
                    Err(RecvTimeoutError::Timeout) if run.stopping() => {
                        self.gave_up = true;
                        return None;
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => Err(()),
                },
                None => self.recorded.recv().map_err(|_| ()),
            };
            match received {
                Ok(Read::Calls(calls)) => self.inbox = calls.into_iter(),
                Ok(Read::End(end)) => self.ended = Some(Ok(end)),
                Ok(Read::Error(e)) => {
                    // Nothing after this can be compared: end the run now rather than let
                    // the guest run on to its end.
                    if let Some(run) = &self.run {
                        run.stop();
                    }
                    self.ended = Some(Err(e));
                }
                Err(()) => self.ended = Some(Ok(None)), // the reading thread is gone
            }
        }
    }

    /// The next recorded call of `vcpu`, reading the recording on as far as needed: `None`
    /// when the recording has no more (or cannot be read further).
    fn next_recorded(&mut self, vcpu: usize) -> Option<CallEntry> {
        if let Some(c) = self.pending[vcpu].pop_front() {
            return Some(c);
        }
        while let Some(c) = self.read() {
            let v = c.vcpu as usize;
            if v == vcpu {
                return Some(c);
            }
            // The reader refuses a vCPU outside the header's count.
            if self.diverged[v].is_none() {
                self.pending[v].push_back(c);
            }
        }
        None
    }

    fn compare(&mut self, call: CallEntry) {
        let v = call.vcpu as usize;
        if v >= self.made.len() {
            // A vCPU the recording cannot have: the first call it makes diverges.
            self.made.resize(v + 1, 0);
            self.pending.resize_with(v + 1, VecDeque::new);
            self.diverged.resize(v + 1, None);
        }
        let index = self.made[v];
        self.made[v] += 1;
        if self.diverged[v].is_some() {
            return;
        }
        self.gave_up = false;
        let recorded = self.next_recorded(v);
        if self.gave_up {
            // Not compared (the run is ending): as if the re-run had not made it.
            self.made[v] -= 1;
            return;
        }
        if recorded.as_ref().is_some_and(|r| r.same_call(&call)) {
            return;
        }
        self.diverged[v] = Some(Divergence { vcpu: call.vcpu, index, recorded, rerun: Some(call) });
        self.pending[v].clear();
    }
}

impl StreamComparer {
    /// Compare with the recording `reader` reads (its header already read), which a thread of
    /// its own reads from now on.
    pub fn new<R: BufRead + Send + 'static>(
        mut reader: RecordingReader<R>,
    ) -> std::io::Result<Self> {
        let header = reader.header().clone();
        let vcpus = header.vcpus as usize;
        let (tx, rx) = sync_channel(CHUNKS_AHEAD - 1); // and one being sent
        std::thread::Builder::new().name("replay-reader".into()).spawn(move || {
            let mut chunk = Vec::with_capacity(CHUNK);
            for item in reader.by_ref() {
                match item {
                    Ok(c) => chunk.push(c),
                    Err(e) => {
                        // The calls before the bad line first, as the reader yields them.
                        let _ = tx.send(Read::Calls(chunk));
                        let _ = tx.send(Read::Error(e));
                        return;
                    }
                }
                if chunk.len() == CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                    if tx.send(Read::Calls(full)).is_err() {
                        return; // the comparison is over
                    }
                }
            }
            let _ = tx.send(Read::Calls(chunk));
            let _ = tx.send(Read::End(reader.end().cloned()));
        })?;
        Ok(StreamComparer {
            state: Mutex::new(State {
                recorded: rx,
                inbox: Vec::new().into_iter(),
                ended: None,
                pending: (0..vcpus).map(|_| VecDeque::new()).collect(),
                made: vec![0; vcpus],
                diverged: vec![None; vcpus],
                recorded_calls: 0,
                rerun_calls: 0,
                run: None,
                gave_up: false,
            }),
            header,
            start: Instant::now(),
        })
    }

    /// Tie the comparison to the run it compares (call it before the run starts): a vCPU
    /// waiting for the recording stops waiting once the run is stopping (a timeout, a stop),
    /// and a recording that turns out not to be readable stops the run.
    pub fn watch(&self, run: VmMonitor) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).run = Some(run);
    }

    /// Read the rest of the recording and say how the streams compare: the calls the
    /// recording has beyond what the re-run made are divergences too. `Err` for the first
    /// line of the recording that could not be read. Call it once the run has ended (a call
    /// made after it is compared, but not reported).
    pub fn finish(&self) -> Result<Comparison, RecordError> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        // The run is over: read the rest however long it takes.
        st.run = None;
        st.gave_up = false;
        for v in 0..st.made.len() {
            if st.diverged[v].is_none() {
                if let Some(recorded) = st.next_recorded(v) {
                    let index = st.made[v];
                    let d =
                        Divergence { vcpu: v as u32, index, recorded: Some(recorded), rerun: None };
                    st.diverged[v] = Some(d);
                    st.pending[v].clear();
                }
            }
        }
        // Read to the end: the count, the end line, any line that is not one.
        while st.read().is_some() {}
        let end = match st.ended.take() {
            Some(Err(e)) => return Err(e),
            Some(Ok(end)) => end,
            None => None,
        };
        let mut divergences: Vec<Divergence> = st.diverged.iter().flatten().cloned().collect();
        sort_divergences(&mut divergences);
        Ok(Comparison {
            header: self.header.clone(),
            divergences,
            recorded_calls: st.recorded_calls,
            rerun_calls: st.rerun_calls,
            end,
        })
    }
}

impl CallSink for StreamComparer {
    fn record(&self, c: &CallRecord<'_>) {
        let time_ns = self.start.elapsed().as_nanos() as u64;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seq = st.rerun_calls;
        st.rerun_calls += 1;
        st.compare(CallEntry::of(seq, c, time_ns));
    }
}
