//! `VMCALL_HC_LIST`: a guest asks which custom hypercalls are registered.

use vmcall_abi::errno::{KVM_E2BIG, KVM_EFAULT};
use vmcall_abi::{HypercallInfo, VMCALL_NAME_LEN};

use super::call::{neg, Call};
use super::table::SnapshotRef;

const INFO: u64 = core::mem::size_of::<HypercallInfo>() as u64;

/// `VMCALL_HC_LIST`: write one [`HypercallInfo`] per registered number, sorted by number, to the
/// array at guest-physical a0 of a1 bytes, and return how many there are. a1 = 0 only returns
/// the count. An array smaller than the whole list is -KVM_E2BIG and nothing is written (the
/// guest asks for the count, then calls again); one not wholly inside guest RAM is -KVM_EFAULT.
/// The list is one snapshot of the table: it is consistent even while the table changes.
pub(super) fn list(snapshot: SnapshotRef<'_>, call: &Call<'_>) -> u64 {
    let [base, size, ..] = call.args;
    let count = snapshot.len() as u64;
    if size == 0 {
        return count;
    }
    let need = count * INFO;
    if size < need {
        return neg(KVM_E2BIG);
    }
    if count == 0 {
        return 0;
    }
    let Ok(view) = call.mem.view(base, need) else {
        return neg(KVM_EFAULT);
    };
    let mut entries: Vec<_> = snapshot.iter().collect();
    entries.sort_unstable_by_key(|(nr, _)| *nr);
    for (i, (nr, entry)) in entries.into_iter().enumerate() {
        let mut raw = [0u8; INFO as usize];
        raw[..8].copy_from_slice(&nr.to_le_bytes());
        let name = cut(&entry.name, VMCALL_NAME_LEN - 1);
        raw[8..8 + name.len()].copy_from_slice(name.as_bytes());
        if view.write(i * INFO as usize, &raw).is_err() {
            return neg(KVM_EFAULT);
        }
    }
    count
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_cut_at_character_boundaries() {
        assert_eq!(super::cut("abc", 23), "abc");
        assert_eq!(super::cut("ééé", 5), "éé");
        assert_eq!(super::cut("", 23), "");
    }
}
