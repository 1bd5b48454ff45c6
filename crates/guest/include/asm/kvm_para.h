/*
 * asm/kvm_para.h -- part of vmcall, the user-space micro-VMM that traps guest hypercalls.
 *
 * x86 half of the Linux-compatible KVM paravirt header for bare-metal vmcall guests written in
 * C. It mirrors crates/abi (crates/abi/src/lib.rs is the single source of truth); the tests
 * check every constant and struct here against the Rust ABI, so change both together.
 *
 * Linux's arch/x86/include/asm/kvm_para.h picks the hypercall instruction with an ALTERNATIVE
 * (VMCALL on Intel, VMMCALL on AMD and Hygon). This header does the same at run time: the first
 * hypercall reads the vendor from CPUID leaf 0 and caches the choice in a weak global, shared by
 * every translation unit of the guest.
 *
 * Freestanding: no libc, no <linux/types.h>. Assembler syntax is GCC's default (AT&T) or Intel
 * (-masm=intel): every operand-taking instruction is written for both dialects.
 */
#ifndef _ASM_X86_KVM_PARA_H
#define _ASM_X86_KVM_PARA_H

/* CPUID leaf returning "KVMKVMKVM\0\0\0" in EBX, ECX, EDX (and the highest KVM leaf in EAX). */
#define KVM_CPUID_SIGNATURE	0x40000000
#define KVM_SIGNATURE		"KVMKVMKVM\0\0\0"

/* CPUID leaf returning the paravirt feature bits in EAX and the hints in EDX. */
#define KVM_CPUID_FEATURES	0x40000001
#define KVM_FEATURE_CLOCKSOURCE		0
#define KVM_FEATURE_NOP_IO_DELAY	1
#define KVM_FEATURE_MMU_OP		2
#define KVM_FEATURE_CLOCKSOURCE2	3
#define KVM_FEATURE_ASYNC_PF		4
#define KVM_FEATURE_STEAL_TIME		5
#define KVM_FEATURE_PV_EOI		6
#define KVM_FEATURE_PV_UNHALT		7
#define KVM_FEATURE_PV_TLB_FLUSH	9
#define KVM_FEATURE_ASYNC_PF_VMEXIT	10
#define KVM_FEATURE_PV_SEND_IPI		11
#define KVM_FEATURE_POLL_CONTROL	12
#define KVM_FEATURE_PV_SCHED_YIELD	13
#define KVM_FEATURE_ASYNC_PF_INT	14
#define KVM_FEATURE_MSI_EXT_DEST_ID	15
#define KVM_FEATURE_HC_MAP_GPA_RANGE	16
#define KVM_FEATURE_MIGRATION_CONTROL	17

#define KVM_HINTS_REALTIME		0
#define KVM_FEATURE_CLOCKSOURCE_STABLE_BIT	24

#define MSR_KVM_WALL_CLOCK		0x11
#define MSR_KVM_SYSTEM_TIME		0x12
#define KVM_MSR_ENABLED			1
#define MSR_KVM_WALL_CLOCK_NEW		0x4b564d00
#define MSR_KVM_SYSTEM_TIME_NEW		0x4b564d01
#define MSR_KVM_ASYNC_PF_EN		0x4b564d02
#define MSR_KVM_STEAL_TIME		0x4b564d03
#define MSR_KVM_PV_EOI_EN		0x4b564d04
#define MSR_KVM_POLL_CONTROL		0x4b564d05
#define MSR_KVM_ASYNC_PF_INT		0x4b564d06
#define MSR_KVM_ASYNC_PF_ACK		0x4b564d07
#define MSR_KVM_MIGRATION_CONTROL	0x4b564d08

/* KVM_HC_CLOCK_PAIRING: a1 is the clock type, a0 the guest-physical address of this struct. */
#define KVM_CLOCK_PAIRING_WALLCLOCK	0
struct kvm_clock_pairing {
	long long sec;			/* __s64 in Linux */
	long long nsec;			/* __s64 */
	unsigned long long tsc;		/* __u64 */
	unsigned int flags;		/* __u32 */
	unsigned int pad[9];		/* __u32[9] */
};
#ifdef __cplusplus
static_assert(sizeof(struct kvm_clock_pairing) == 64, "struct kvm_clock_pairing is 64 bytes");
#else
_Static_assert(sizeof(struct kvm_clock_pairing) == 64, "struct kvm_clock_pairing is 64 bytes");
#endif

/* KVM_HC_MAP_GPA_RANGE attributes (a2). */
#define KVM_MAP_GPA_RANGE_PAGE_SZ_4K	0
#define KVM_MAP_GPA_RANGE_PAGE_SZ_2M	(1 << 0)
#define KVM_MAP_GPA_RANGE_PAGE_SZ_1G	(1 << 1)
#define KVM_MAP_GPA_RANGE_ENC_STAT(n)	((n) << 4)
#define KVM_MAP_GPA_RANGE_ENCRYPTED	KVM_MAP_GPA_RANGE_ENC_STAT(1)
#define KVM_MAP_GPA_RANGE_DECRYPTED	KVM_MAP_GPA_RANGE_ENC_STAT(0)

/*
 * vmcall-specific: what the vendor check compares CPUID leaf 0 EBX with
 * (crates/abi cpuid::VENDOR_AMD_EBX / VENDOR_HYGON_EBX), and the two instruction encodings
 * (crates/abi insn::VMCALL / VMMCALL); the host advances RIP by VMCALL_HYPERCALL_LEN.
 */
#define VMCALL_VENDOR_AMD_EBX		0x68747541	/* "Auth" of "AuthenticAMD" */
#define VMCALL_VENDOR_HYGON_EBX		0x6f677948	/* "Hygo" of "HygonGenuine" */
#define VMCALL_INSN_VMCALL		".byte 0x0f, 0x01, 0xc1"	/* Intel */
#define VMCALL_INSN_VMMCALL		".byte 0x0f, 0x01, 0xd9"	/* AMD, Hygon */
#define VMCALL_HYPERCALL_LEN		3

/*
 * Old Linux (before the VMCALL/VMMCALL alternative) spelled the instruction KVM_HYPERCALL and
 * relied on KVM to patch it; vmcall traps both instructions, so this keeps such code building.
 * kvm_hypercall0..4 below do not use it: they pick the vendor's instruction.
 */
#ifndef KVM_HYPERCALL
#define KVM_HYPERCALL			VMCALL_INSN_VMCALL
#endif

/*
 * The cached choice: 0 = not yet detected, 1 = VMCALL, 2 = VMMCALL. Weak, so every translation
 * unit that includes this header shares one copy. A guest may store 1 or 2 before its first
 * hypercall to force an instruction (the tests do this to exercise both).
 */
int __vmcall_hypercall_insn __attribute__((weak));

#define VMCALL_HYPERCALL_INSN_UNKNOWN	0
#define VMCALL_HYPERCALL_INSN_VMCALL	1
#define VMCALL_HYPERCALL_INSN_VMMCALL	2

static inline void __vmcall_cpuid(unsigned int leaf, unsigned int *a, unsigned int *b,
				  unsigned int *c, unsigned int *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "0"(leaf), "2"(0u));
}

/* Which instruction Linux would use on this CPU: VMMCALL on AMD and Hygon, VMCALL elsewhere. */
static inline int vmcall_detect_hypercall_insn(void)
{
	unsigned int a, b, c, d;

	__vmcall_cpuid(0, &a, &b, &c, &d);
	if (b == VMCALL_VENDOR_AMD_EBX || b == VMCALL_VENDOR_HYGON_EBX)
		return VMCALL_HYPERCALL_INSN_VMMCALL;
	return VMCALL_HYPERCALL_INSN_VMCALL;
}

static __attribute__((noinline, cold, unused)) int __vmcall_hypercall_insn_init(void)
{
	int insn = vmcall_detect_hypercall_insn();

	*(volatile int *)&__vmcall_hypercall_insn = insn;
	return insn;
}

/* Nonzero if kvm_hypercall0..4 use VMMCALL; detects and caches the vendor on first use. */
static inline __attribute__((always_inline)) int vmcall_uses_vmmcall(void)
{
	int insn = *(volatile int *)&__vmcall_hypercall_insn;

	if (__builtin_expect(insn == VMCALL_HYPERCALL_INSN_UNKNOWN, 0))
		insn = __vmcall_hypercall_insn_init();
	return insn == VMCALL_HYPERCALL_INSN_VMMCALL;
}

/*
 * One hypercall with the vendor's instruction: number in RAX, a0..a3 in RBX, RCX, RDX, RSI,
 * result in RAX (Linux's convention). The number is zero-extended to 64 bits, because the host
 * reads all of RAX in 64-bit mode. RBX is a plain register here (the guest is non-PIC).
 */
#define __VMCALL_HYPERCALL(ret, ...)						\
	do {									\
		if (vmcall_uses_vmmcall())					\
			__asm__ volatile(VMCALL_INSN_VMMCALL			\
					 : "=a"(ret) : __VA_ARGS__ : "memory");	\
		else								\
			__asm__ volatile(VMCALL_INSN_VMCALL			\
					 : "=a"(ret) : __VA_ARGS__ : "memory");	\
	} while (0)

static inline long kvm_hypercall0(unsigned int nr)
{
	long ret;

	__VMCALL_HYPERCALL(ret, "a"((unsigned long)nr));
	return ret;
}

static inline long kvm_hypercall1(unsigned int nr, unsigned long p1)
{
	long ret;

	__VMCALL_HYPERCALL(ret, "a"((unsigned long)nr), "b"(p1));
	return ret;
}

static inline long kvm_hypercall2(unsigned int nr, unsigned long p1, unsigned long p2)
{
	long ret;

	__VMCALL_HYPERCALL(ret, "a"((unsigned long)nr), "b"(p1), "c"(p2));
	return ret;
}

static inline long kvm_hypercall3(unsigned int nr, unsigned long p1, unsigned long p2,
				  unsigned long p3)
{
	long ret;

	__VMCALL_HYPERCALL(ret, "a"((unsigned long)nr), "b"(p1), "c"(p2), "d"(p3));
	return ret;
}

static inline long kvm_hypercall4(unsigned int nr, unsigned long p1, unsigned long p2,
				  unsigned long p3, unsigned long p4)
{
	long ret;

	__VMCALL_HYPERCALL(ret, "a"((unsigned long)nr), "b"(p1), "c"(p2), "d"(p3), "S"(p4));
	return ret;
}

/* Linux's SEV variant: always VMMCALL, whatever the vendor. */
static inline long kvm_sev_hypercall3(unsigned int nr, unsigned long p1, unsigned long p2,
				      unsigned long p3)
{
	long ret;

	__asm__ volatile(VMCALL_INSN_VMMCALL
			 : "=a"(ret)
			 : "a"((unsigned long)nr), "b"(p1), "c"(p2), "d"(p3)
			 : "memory");
	return ret;
}

/* The KVM CPUID base (0x40000000) if the hypervisor leaves say "KVMKVMKVM", else 0. */
static inline unsigned int kvm_cpuid_base(void)
{
	unsigned int a, b, c, d;

	__vmcall_cpuid(KVM_CPUID_SIGNATURE, &a, &b, &c, &d);
	/* "KVMK" "VMKV" "M\0\0\0" (crates/abi cpuid::KVM_SIGNATURE) */
	if (b == 0x4b4d564b && c == 0x564b4d56 && d == 0x0000004d)
		return KVM_CPUID_SIGNATURE;
	return 0;
}

static inline int kvm_para_available(void)
{
	return kvm_cpuid_base() != 0;
}

static inline unsigned int kvm_arch_para_features(void)
{
	unsigned int a, b, c, d;

	__vmcall_cpuid(KVM_CPUID_FEATURES, &a, &b, &c, &d);
	return a;
}

static inline unsigned int kvm_arch_para_hints(void)
{
	unsigned int a, b, c, d;

	__vmcall_cpuid(KVM_CPUID_FEATURES, &a, &b, &c, &d);
	return d;
}

#endif /* _ASM_X86_KVM_PARA_H */
