/*
 * linux/kvm_para.h -- part of vmcall, the user-space micro-VMM that traps guest hypercalls.
 *
 * Linux-compatible KVM paravirt header for bare-metal vmcall guests written in C, so that code
 * written against the kernel's <linux/kvm_para.h> builds unchanged with
 *     gcc -ffreestanding -nostdlib -static -I crates/guest/include ...
 * It mirrors crates/abi (crates/abi/src/lib.rs is the single source of truth: hypercall numbers
 * in `hc`, error codes in `errno`); the tests check every constant here against the Rust ABI,
 * so change both together. The values are Linux's (include/uapi/linux/kvm_para.h).
 *
 * kvm_hypercall0..4 come from <asm/kvm_para.h>, included at the end as in Linux.
 */
#ifndef __LINUX_KVM_PARA_H
#define __LINUX_KVM_PARA_H

/* Return values for hypercalls (positive; a hypercall returns them negated, e.g. -KVM_ENOSYS). */
#define KVM_ENOSYS		1000
#define KVM_EFAULT		14	/* EFAULT */
#define KVM_EINVAL		22	/* EINVAL */
#define KVM_E2BIG		7	/* E2BIG */
#define KVM_EPERM		1	/* EPERM */
#define KVM_EOPNOTSUPP		95

/* Hypercall numbers. */
#define KVM_HC_VAPIC_POLL_IRQ		1
#define KVM_HC_MMU_OP			2
#define KVM_HC_FEATURES			3
#define KVM_HC_PPC_MAP_MAGIC_PAGE	4
#define KVM_HC_KICK_CPU			5
#define KVM_HC_MIPS_GET_CLOCK_FREQ	6
#define KVM_HC_MIPS_EXIT_VM		7
#define KVM_HC_MIPS_CONSOLE_OUTPUT	8
#define KVM_HC_CLOCK_PAIRING		9
#define KVM_HC_SEND_IPI			10
#define KVM_HC_SCHED_YIELD		11
#define KVM_HC_MAP_GPA_RANGE		12

/*
 * Not Linux: one past the highest number Linux assigns (crates/abi hc::KVM_HC_STANDARD_END).
 * Custom hypercalls such as the seed's KVM_HC_MY_VMCALL (20) live at or above it. Linux does not
 * define KVM_HC_MY_VMCALL; guests define it themselves (<vmcall.h> also does, identically).
 */
#define VMCALL_HC_STANDARD_END		13

#include <asm/kvm_para.h>

static inline int kvm_para_has_feature(unsigned int feature)
{
	return !!(kvm_arch_para_features() & (1u << feature));
}

static inline int kvm_para_has_hint(unsigned int feature)
{
	return !!(kvm_arch_para_hints() & (1u << feature));
}

#endif /* __LINUX_KVM_PARA_H */
