//! `VMCALL_HC_BATCH`: many hypercalls answered with one exit.

use std::sync::atomic::Ordering;

use vmcall_abi::errno::{KVM_E2BIG, KVM_EFAULT};
use vmcall_abi::{BatchEntry, VMCALL_BATCH_MAX};

use super::call::neg;
use super::call::Call;
use super::emulate::{answer_custom_run, counts_alone};
use super::table::{Entry, SnapshotRef};

/// `VMCALL_HC_BATCH`: answer each entry of the array at a0 (a1 entries) as a single call
/// from the same caller would be answered, writing each result to its `ret`. Each entry is
/// copied out of guest memory once (32 at a time) before it is answered, and all are looked up
/// in one snapshot of the table: another vCPU rewriting the array mid-batch can change what a
/// later entry says, never how one entry is handled. Returns the number of entries processed: the end of guest RAM cuts a batch short
/// (-KVM_EFAULT if not even the first entry is inside it), more than `VMCALL_BATCH_MAX` entries
/// is -KVM_E2BIG, and a nested batch entry gets -KVM_EINVAL.
///
/// Consecutive entries to the same number (a run, within one chunk) are looked up once; a run
/// a custom handler answers goes to it in one [`HypercallHandler::call_run`], and the run's
/// `ret`s are written when it has been answered. Its number's call counter is added to once
/// per run of consecutive entries to the number, across chunks, when the run ends.
/// `single` answers every other entry, one at a time, each `ret` written as it is answered.
///
/// [`HypercallHandler::call_run`]: super::call::HypercallHandler::call_run
pub(super) fn batch(
    snapshot: SnapshotRef<'_>,
    call: &Call<'_>,
    single: &dyn Fn(Option<&Entry>, &Call<'_>) -> u64,
) -> u64 {
    const ENTRY: u64 = core::mem::size_of::<BatchEntry>() as u64;
    let [base, count, ..] = call.args;
    if count > VMCALL_BATCH_MAX {
        return neg(KVM_E2BIG);
    }
    if count == 0 {
        return 0;
    }
    let in_ram = call.mem.size().checked_sub(base).map_or(0, |room| room / ENTRY);
    let count = count.min(in_ram);
    if count == 0 {
        return neg(KVM_EFAULT);
    }
    const WORDS: usize = (ENTRY / 8) as usize;
    let Ok(view) = call.mem.view(base, count * ENTRY) else {
        return neg(KVM_EFAULT);
    };
    let Ok(words) = view.words(0, count as usize * WORDS) else {
        return neg(KVM_EFAULT);
    };
    let mask = if call.mode.is_64bit() { u64::MAX } else { 0xffff_ffff };
    // Entries are copied out a chunk at a time, each before any of it is answered: the chunk's
    // bytes in one copy (one bounds check), then taken apart in registers.
    const CHUNK: usize = 32;
    let mut bytes = [0u8; CHUNK * ENTRY as usize];
    let mut nrs = [0u64; CHUNK];
    let mut args = [[0u64; 4]; CHUNK];
    let mut rets = [0u64; CHUNK];
    let mut entry = Call {
        nr: 0,
        args: [0; 4],
        vcpu_id: call.vcpu_id,
        mode: call.mode,
        mem: call.mem,
        paging: call.paging,
    };
    // The snapshot cannot change during the batch, so a run of entries to the same number
    // (the common batch) looks it up once, across chunks too.
    let mut last: Option<(u64, Option<&Entry>)> = None;
    // Entries of the current run a custom handler has answered, not yet added to its counter.
    let mut pending = 0u64;
    let flush = |last: Option<(u64, Option<&Entry>)>, pending: &mut u64| {
        if let (Some((_, Some(e))), 1..) = (last, *pending) {
            e.calls.fetch_add(*pending, Ordering::Relaxed);
        }
        *pending = 0;
    };
    for first in (0..count as usize).step_by(CHUNK) {
        let n = CHUNK.min(count as usize - first);
        let chunk = &mut bytes[..n * ENTRY as usize];
        if view.read(first * ENTRY as usize, chunk).is_err() {
            unreachable!("inside the view checked above");
        }
        let word = |e: &[u8], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&e[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w) & mask
        };
        for (k, e) in chunk.chunks_exact(ENTRY as usize).enumerate() {
            nrs[k] = word(e, 0);
            args[k] = [word(e, 1), word(e, 2), word(e, 3), word(e, 4)];
        }
        let mut at = 0;
        while at < n {
            let nr = nrs[at];
            let end = nrs[at..n].iter().position(|&x| x != nr).map_or(n, |len| at + len);
            let handler = match last {
                Some((last_nr, handler)) if last_nr == nr => handler,
                _ => {
                    flush(last, &mut pending);
                    let handler = snapshot.get(nr);
                    last = Some((nr, handler));
                    handler
                }
            };
            entry.nr = nr;
            match handler {
                Some(e) if !counts_alone(e, &entry) => {
                    answer_custom_run(e, &mut entry, &args[at..end], &mut rets[at..end]);
                    pending += (end - at) as u64;
                    for (k, ret) in rets.iter().enumerate().take(end).skip(at) {
                        // Inside the batch: this entry was just read from it.
                        words.store((first + k) * WORDS + 5, ret & mask);
                    }
                }
                _ => {
                    for (k, args) in args.iter().enumerate().take(end).skip(at) {
                        entry.args = *args;
                        let ret = single(handler, &entry);
                        words.store((first + k) * WORDS + 5, ret & mask);
                    }
                }
            }
            at = end;
        }
    }
    flush(last, &mut pending);
    count
}
