//! The two hypercall instructions, which one is the CPU's own, and what becomes of the other
//! vendor's: KVM's `KVM_X86_QUIRK_FIX_HYPERCALL_INSN`, as a per-VM choice.

use vmcall_abi::insn::{VMCALL, VMMCALL};

/// Which instruction made the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HypercallInsn {
    /// Intel's VMCALL (0f 01 c1).
    Vmcall,
    /// AMD's VMMCALL (0f 01 d9).
    Vmmcall,
}

impl HypercallInsn {
    /// The instruction `bytes` start with, if either.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes.get(..3)? {
            b if b == VMCALL => Some(HypercallInsn::Vmcall),
            b if b == VMMCALL => Some(HypercallInsn::Vmmcall),
            _ => None,
        }
    }

    /// The instruction's encoding.
    pub fn bytes(self) -> [u8; 3] {
        match self {
            HypercallInsn::Vmcall => VMCALL,
            HypercallInsn::Vmmcall => VMMCALL,
        }
    }

    /// The host CPU's own: VMMCALL on AMD and Hygon, VMCALL elsewhere.
    pub fn native() -> Self {
        if crate::vm::host_is_amd() {
            HypercallInsn::Vmmcall
        } else {
            HypercallInsn::Vmcall
        }
    }
}

/// What happens to the other vendor's hypercall instruction (VMCALL on AMD, VMMCALL on Intel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ForeignInsn {
    /// KVM's default (the quirk on): the instruction is rewritten in guest memory to the
    /// native one, then answered.
    #[default]
    Patch,
    /// The quirk off: it raises #UD in the guest, like any instruction the CPU lacks.
    Ud,
    /// Answered where it is, nothing rewritten (vmcall 0.1's behaviour; no KVM does this).
    Answer,
}

impl std::str::FromStr for ForeignInsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "patch" => Ok(ForeignInsn::Patch),
            "ud" => Ok(ForeignInsn::Ud),
            "answer" => Ok(ForeignInsn::Answer),
            _ => Err(format!("unknown handling '{s}' (patch, ud, answer)")),
        }
    }
}

/// What a backend does with a hypercall instruction that trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsnAction {
    /// Answer it.
    Answer,
    /// Write `native` over the instruction's 3 bytes, then answer it.
    PatchThenAnswer {
        /// The instruction written over it.
        native: HypercallInsn,
    },
    /// Deliver #UD to the guest instead.
    RaiseUd,
}

impl ForeignInsn {
    /// The action for `insn` on a host whose own instruction is `native`.
    pub fn action(self, insn: HypercallInsn, native: HypercallInsn) -> InsnAction {
        if insn == native {
            return InsnAction::Answer;
        }
        match self {
            ForeignInsn::Patch => InsnAction::PatchThenAnswer { native },
            ForeignInsn::Ud => InsnAction::RaiseUd,
            ForeignInsn::Answer => InsnAction::Answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_native_instruction_is_always_answered() {
        use HypercallInsn::*;
        for mode in [ForeignInsn::Patch, ForeignInsn::Ud, ForeignInsn::Answer] {
            assert_eq!(mode.action(Vmmcall, Vmmcall), InsnAction::Answer);
        }
        assert_eq!(
            ForeignInsn::Patch.action(Vmcall, Vmmcall),
            InsnAction::PatchThenAnswer { native: Vmmcall }
        );
        assert_eq!(ForeignInsn::Ud.action(Vmcall, Vmmcall), InsnAction::RaiseUd);
        assert_eq!(ForeignInsn::Answer.action(Vmmcall, Vmcall), InsnAction::Answer);
        assert_eq!(HypercallInsn::decode(&[0x0f, 0x01, 0xd9, 0x90]), Some(Vmmcall));
        assert_eq!(HypercallInsn::decode(&[0x0f, 0x01]), None);
        assert_eq!("ud".parse(), Ok(ForeignInsn::Ud));
    }
}
