//! `VMCALL_HC_BATCH`: many hypercalls answered with one exit.

use vmcall_abi::errno::{KVM_E2BIG, KVM_EFAULT};
use vmcall_abi::{BatchEntry, VMCALL_BATCH_MAX};

use super::call::neg;
use super::call::Call;
use super::table::{Entry, TableSnapshot};

/// `VMCALL_HC_BATCH`: answer each entry of the array at a0 (a1 entries) as a single call
/// from the same caller would be answered, writing each result to its `ret`. Each entry is
/// copied out of guest memory once (64 at a time) before it is answered, and all are looked up
/// in one snapshot of the table: another vCPU rewriting the array mid-batch can change what a
/// later entry says, never how one entry is handled. Returns the number of entries processed: the end of guest RAM cuts a batch short
/// (-KVM_EFAULT if not even the first entry is inside it), more than `VMCALL_BATCH_MAX` entries
/// is -KVM_E2BIG, and a nested batch entry gets -KVM_EINVAL.
pub(super) fn batch(
    snapshot: &TableSnapshot,
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
    let Ok(view) = call.mem.view(base, count * ENTRY) else {
        return neg(KVM_EFAULT);
    };
    let trunc = |v: u64| if call.mode.is_64bit() { v } else { v & 0xffff_ffff };
    // Entries are copied out a chunk at a time, each before any of it is answered.
    const CHUNK: usize = 64;
    let mut raw = [0u8; CHUNK * ENTRY as usize];
    // The snapshot cannot change during the batch, so a run of entries to the same number
    // (the common batch) looks it up once.
    let mut last: Option<(u64, Option<&Entry>)> = None;
    for first in (0..count as usize).step_by(CHUNK) {
        let n = CHUNK.min(count as usize - first);
        let chunk = &mut raw[..n * ENTRY as usize];
        if view.read(first * ENTRY as usize, chunk).is_err() {
            return first as u64;
        }
        for (k, bytes) in chunk.chunks_exact(ENTRY as usize).enumerate() {
            let word =
                |w: usize| u64::from_le_bytes(bytes[8 * w..8 * w + 8].try_into().expect("8 bytes"));
            let entry = Call {
                nr: trunc(word(0)),
                args: [word(1), word(2), word(3), word(4)].map(trunc),
                vcpu_id: call.vcpu_id,
                mode: call.mode,
                mem: call.mem,
                paging: call.paging,
            };
            let handler = match last {
                Some((nr, handler)) if nr == entry.nr => handler,
                _ => {
                    let handler = snapshot.get(entry.nr);
                    last = Some((entry.nr, handler));
                    handler
                }
            };
            let ret = single(handler, &entry);
            // Inside the view: this entry was just read from it.
            let _ = view.write_u64((first + k) * ENTRY as usize + 40, trunc(ret));
        }
    }
    count
}
