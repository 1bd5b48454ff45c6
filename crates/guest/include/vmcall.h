/*
 * vmcall.h -- part of vmcall, the user-space micro-VMM that traps guest hypercalls.
 *
 * The C guest SDK: boot info, ports, selectors, console output, exit, dropping to CPL 3 and the
 * entry glue, for bare-metal guests built with
 *     gcc -ffreestanding -nostdlib -static -no-pie -fno-pic -fno-stack-protector -mno-red-zone \
 *         -O2 -I crates/guest/include -T crates/guest/link.ld -Wl,--build-id=none guest.c
 * It mirrors crates/abi (crates/abi/src/lib.rs and layout.rs are the single source of truth) and
 * the Rust SDK (crates/guest/src/lib.rs); the tests check every constant and struct here against
 * the Rust ABI, so change both together. No libc: everything is inline or defined here.
 *
 * A guest names its main function once, in one translation unit:
 *
 *     #include <vmcall.h>
 *     static int my_main(const struct vmcall_boot_info *bi) { vmcall_puts("hi\n"); return 0; }
 *     VMCALL_ENTRY(my_main)
 *
 * The VMM starts every vCPU at _start in 64-bit mode at CPL 0 with RDI = its boot info and RSP
 * 16-byte aligned. Returning 0 halts this vCPU (the run ends with 0 once every vCPU has halted);
 * any other value ends the whole run with that status.
 */
#ifndef VMCALL_H
#define VMCALL_H

#include <linux/kvm_para.h>

#ifdef __cplusplus
#define VMCALL_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define VMCALL_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

/* crates/abi ABI_VERSION: the version of the guest/host contract. */
#define VMCALL_ABI_VERSION		1

/* The seed's custom hypercall (crates/abi hc::KVM_HC_MY_VMCALL); not a Linux name. */
#ifndef KVM_HC_MY_VMCALL
#define KVM_HC_MY_VMCALL		20
#endif

/*
 * First of vmcall's own hypercall numbers, "VC" << 16 (crates/abi hc::VMCALL_HC_BASE): clear of
 * Linux's and of the small numbers custom hypercalls use, and inside 32 bits.
 */
#define VMCALL_HC_BASE			0x56430000
/* Run a batch of hypercalls (crates/abi hc::VMCALL_HC_BATCH); see vmcall_hypercall_batch. */
#define VMCALL_HC_BATCH			0x56430001	/* VMCALL_HC_BASE + 1 */
/* Most entries one batch may hold (crates/abi VMCALL_BATCH_MAX); more is -KVM_E2BIG. */
#define VMCALL_BATCH_MAX		4096
/* List the registered custom hypercalls (crates/abi hc::VMCALL_HC_LIST); see vmcall_list_hypercalls. */
#define VMCALL_HC_LIST			0x56430002	/* VMCALL_HC_BASE + 2 */
/* Bytes of a name in struct vmcall_hypercall_info (crates/abi VMCALL_NAME_LEN). */
#define VMCALL_NAME_LEN			24

/* crates/abi KVM_CLOCK_PAIRING_WALLCLOCK is KVM_CLOCK_PAIRING_WALLCLOCK (asm/kvm_para.h). */

/* crates/abi cpuid::KVM_SIGNATURE: "KVMKVMKVM\0\0\0" as EBX, ECX, EDX of leaf 0x40000000. */
#define VMCALL_KVM_SIGNATURE_EBX	0x4b4d564b
#define VMCALL_KVM_SIGNATURE_ECX	0x564b4d56
#define VMCALL_KVM_SIGNATURE_EDX	0x0000004d

/* ---- I/O ports (crates/abi ports) ---------------------------------------------------------- */

/* COM1 data register: bytes written here go to the host's stdout. */
#define VMCALL_PORT_COM1		0x3f8
/* Last port of the COM1 block (reads of 0x3f8..=0x3ff return "transmitter empty"). */
#define VMCALL_PORT_COM1_END		0x3ff
/* `out VMCALL_PORT_EXIT, eax` ends the run with status EAX; only this 32-bit write exits (an
 * 8- or 16-bit write there ends the run with an error: docs/guest-abi.md). */
#define VMCALL_PORT_EXIT		0xf8
/* Doorbell of a hypercall site the host rewrote itself (`out imm8, al; nop`); not for guests. */
#define VMCALL_PORT_DOORBELL		0xf5
/* Rung by the VMM-owned #UD and #GP handlers (hypercalls the CPU refused, or real faults). */
#define VMCALL_PORT_HC_TRAP		0xf6
/* Rung by the VMM-owned handler of every other exception, vector in AL. */
#define VMCALL_PORT_FAULT		0xf7

/* ---- GDT selectors of the VMM-built GDT (crates/abi selectors) ------------------------------ */

#define VMCALL_KERNEL_CS		0x08	/* 64-bit code, DPL 0 */
#define VMCALL_KERNEL_DS		0x10	/* data, DPL 0 */
#define VMCALL_USER_CS32		0x1b	/* 0x18 | RPL 3: 32-bit code, DPL 3 */
#define VMCALL_USER_DS			0x23	/* 0x20 | RPL 3: data, DPL 3 */
#define VMCALL_USER_CS			0x2b	/* 0x28 | RPL 3: 64-bit code, DPL 3 */
#define VMCALL_KERNEL_CS32		0x30	/* 32-bit code, DPL 0 */
#define VMCALL_TSS_BASE			0x38	/* vCPU i's TSS: VMCALL_TSS_BASE + 16 * i */

/* RFLAGS the CPL 3 code starts with: reserved bit 1 only (IF = 0, IOPL = 0). */
#define VMCALL_USER_RFLAGS		0x2

/* ---- Guest-physical layout the VMM builds (crates/abi layout) ------------------------------- */

#define VMCALL_LAYOUT_NULL_PAGE_END	0x1000
#define VMCALL_LAYOUT_GDT		0x1000
#define VMCALL_LAYOUT_IDT		0x2000
#define VMCALL_LAYOUT_IDT_STUBS		0x3000
#define VMCALL_LAYOUT_BOOT_INFO		0x4000		/* vCPU i's at + i * 72 */
#define VMCALL_LAYOUT_CMDLINE		0x6000
#define VMCALL_LAYOUT_CMDLINE_MAX	0x1000
#define VMCALL_LAYOUT_TSS		0x7000		/* vCPU i's at + i * TSS_STRIDE */
#define VMCALL_LAYOUT_TSS_STRIDE	0x80
#define VMCALL_LAYOUT_IO_BITMAP		0x9000
#define VMCALL_LAYOUT_PML4		0xc000
#define VMCALL_LAYOUT_PDPT		0xd000
#define VMCALL_LAYOUT_PT_LOW		0xe000
#define VMCALL_LAYOUT_PD		0xf000
#define VMCALL_LAYOUT_IST_STACKS	0x50000
#define VMCALL_LAYOUT_IST_STACK_SIZE	0x1000
#define VMCALL_LAYOUT_GUEST_LOAD_MIN	0x100000
#define VMCALL_LAYOUT_MAX_VCPUS		64
#define VMCALL_LAYOUT_MAX_RAM		0x1000000000	/* 64 GiB */
#define VMCALL_LAYOUT_MIN_RAM		0x200000	/* 2 MiB */
#define VMCALL_LAYOUT_RAM_ALIGN		0x200000	/* 2 MiB */
#define VMCALL_LAYOUT_STACK_SIZE	0x10000		/* vCPU i's stack top: ram - i * this */

/* ---- Boot info (crates/abi BootInfo) -------------------------------------------------------- */

/* "VMCALLBI" little-endian (crates/abi BOOT_INFO_MAGIC). */
#define VMCALL_BOOT_INFO_MAGIC		0x49424c4c41434d56ULL

/* Per-vCPU boot information; RDI holds its guest-physical (= virtual) address at entry. */
struct vmcall_boot_info {
	unsigned long long magic;	/* VMCALL_BOOT_INFO_MAGIC */
	unsigned int abi_version;	/* VMCALL_ABI_VERSION */
	unsigned int vcpu_id;		/* this vCPU's index, also its APIC id */
	unsigned int vcpu_count;
	unsigned int amd;		/* nonzero if the host's native instruction is VMMCALL */
	unsigned long long ram_size;	/* bytes of RAM, mapped from guest-physical 0 */
	unsigned long long cmdline_gpa;	/* command line (UTF-8, not NUL-terminated) */
	unsigned long long cmdline_len;
	unsigned long long stack_top;	/* initial RSP of this vCPU */
	unsigned long long free_start;	/* first byte after the loaded image (page aligned) */
	unsigned long long free_end;	/* end of the free RAM (the lowest vCPU stack) */
};
VMCALL_STATIC_ASSERT(sizeof(struct vmcall_boot_info) == 72, "BootInfo is 72 bytes");
VMCALL_STATIC_ASSERT(__builtin_offsetof(struct vmcall_boot_info, abi_version) == 8, "BootInfo");
VMCALL_STATIC_ASSERT(__builtin_offsetof(struct vmcall_boot_info, amd) == 20, "BootInfo");
VMCALL_STATIC_ASSERT(__builtin_offsetof(struct vmcall_boot_info, ram_size) == 24, "BootInfo");
VMCALL_STATIC_ASSERT(__builtin_offsetof(struct vmcall_boot_info, free_end) == 64, "BootInfo");

/* vCPU i's boot info, at the fixed address the VMM writes it to. */
static inline const struct vmcall_boot_info *vmcall_boot_info_of(unsigned int vcpu)
{
	return (const struct vmcall_boot_info *)(unsigned long)
		(VMCALL_LAYOUT_BOOT_INFO + vcpu * sizeof(struct vmcall_boot_info));
}

/* The command line (not NUL-terminated); its length goes to *len. */
static inline const char *vmcall_cmdline(const struct vmcall_boot_info *bi, unsigned long *len)
{
	*len = (unsigned long)bi->cmdline_len;
	return (const char *)(unsigned long)bi->cmdline_gpa;
}

/* ---- Batches of hypercalls (crates/abi BatchEntry, hc::VMCALL_HC_BATCH) --------------------- */

/* One call of a VMCALL_HC_BATCH batch (Xen's multicall, for KVM hypercalls). */
struct vmcall_batch_entry {
	unsigned long long nr;		/* hypercall number (what RAX would hold) */
	unsigned long long args[4];	/* a0..a3 (what RBX, RCX, RDX, RSI would hold) */
	unsigned long long ret;		/* written by the host: what RAX would have returned */
};
VMCALL_STATIC_ASSERT(sizeof(struct vmcall_batch_entry) == 48, "BatchEntry is 48 bytes");
VMCALL_STATIC_ASSERT(__builtin_offsetof(struct vmcall_batch_entry, nr) == 0, "BatchEntry");
VMCALL_STATIC_ASSERT(__builtin_offsetof(struct vmcall_batch_entry, args) == 8, "BatchEntry");
VMCALL_STATIC_ASSERT(__builtin_offsetof(struct vmcall_batch_entry, ret) == 40, "BatchEntry");

/*
 * Runs every call in entries[0..count) with one hypercall: each entry is answered as that call
 * alone (from this caller) would be, its result written to its ret. Returns the number of entries
 * processed (the end of guest RAM cuts a batch short), -KVM_E2BIG for count > VMCALL_BATCH_MAX,
 * -KVM_EFAULT if the array starts outside guest RAM; a nested VMCALL_HC_BATCH entry gets
 * -KVM_EINVAL. entries is a guest-physical address, which equals the virtual one in vmcall's
 * identity-mapped guests. The hypercall's asm clobbers "memory" and is given the array's address,
 * so the compiler treats the array as read and written by it: no barrier is needed around it.
 */
static inline long vmcall_hypercall_batch(struct vmcall_batch_entry *entries, unsigned long count)
{
	return kvm_hypercall2(VMCALL_HC_BATCH, (unsigned long)entries, count);
}

/* ---- Discovery (crates/abi HypercallInfo, hc::VMCALL_HC_LIST) ------------------------------ */

/* One registered custom hypercall. */
struct vmcall_hypercall_info {
	unsigned long long nr;		/* the hypercall number */
	char name[VMCALL_NAME_LEN];	/* its handler's name, UTF-8, NUL-terminated and -padded */
};
VMCALL_STATIC_ASSERT(sizeof(struct vmcall_hypercall_info) == 32, "HypercallInfo is 32 bytes");
VMCALL_STATIC_ASSERT(__builtin_offsetof(struct vmcall_hypercall_info, name) == 8, "HypercallInfo");

/*
 * Fills out[0..count) with the custom hypercalls the host has registered right now, sorted by
 * number, and returns how many there are. If they do not all fit, nothing is written and the
 * result is -KVM_E2BIG: ask vmcall_hypercall_count() and call again (the list may grow in
 * between). -KVM_EFAULT if the array is not inside guest RAM. out is a guest-physical address
 * (= virtual in vmcall's identity-mapped guests).
 */
static inline long vmcall_list_hypercalls(struct vmcall_hypercall_info *out, unsigned long count)
{
	return kvm_hypercall2(VMCALL_HC_LIST, (unsigned long)out, count * sizeof(*out));
}

/* How many custom hypercalls are registered right now. */
static inline long vmcall_hypercall_count(void)
{
	return kvm_hypercall2(VMCALL_HC_LIST, 0, 0);
}

/* ---- Port I/O (CPL 3 may use COM1 and the exit port: the TSS I/O bitmap allows them) -------- */

static inline void vmcall_outb(unsigned short port, unsigned char value)
{
	__asm__ volatile("{outb %b0, %w1|out %w1, %b0}" : : "a"(value), "Nd"(port));
}

static inline void vmcall_outl(unsigned short port, unsigned int value)
{
	__asm__ volatile("{outl %k0, %w1|out %w1, %k0}" : : "a"(value), "Nd"(port));
}

static inline unsigned char vmcall_inb(unsigned short port)
{
	unsigned char value;

	__asm__ volatile("{inb %w1, %b0|in %b0, %w1}" : "=a"(value) : "Nd"(port));
	return value;
}

/* The current privilege level (the RPL of CS): 0 or 3. */
static inline unsigned int vmcall_cpl(void)
{
	unsigned int cs;

	__asm__ volatile("{movl %%cs, %k0|mov %k0, cs}" : "=r"(cs));
	return cs & 3;
}

/* ---- Console (COM1; bytes go to the host's stdout, nothing is translated) ------------------- */

static inline void vmcall_putc(char c)
{
	vmcall_outb(VMCALL_PORT_COM1, (unsigned char)c);
}

static inline void vmcall_write(const char *s, unsigned long len)
{
	for (unsigned long i = 0; i < len; i++)
		vmcall_putc(s[i]);
}

/* Writes the NUL-terminated string s; unlike libc's puts it adds no newline. */
static inline void vmcall_puts(const char *s)
{
	while (*s)
		vmcall_putc(*s++);
}

/* Decimal, unsigned. */
static inline void vmcall_put_u64(unsigned long long v)
{
	char buf[20];
	int n = 0;

	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		vmcall_putc(buf[--n]);
}

/* Decimal, signed: "-1000". */
static inline void vmcall_put_i64(long long v)
{
	unsigned long long u = (unsigned long long)v;

	if (v < 0) {
		vmcall_putc('-');
		u = 0ULL - u;
	}
	vmcall_put_u64(u);
}

/* "0x" then lower-case hex digits, no leading zeros: "0x3f8", "0x0". */
static inline void vmcall_put_hex(unsigned long long v)
{
	int shift = 60;

	vmcall_putc('0');
	vmcall_putc('x');
	while (shift > 0 && !((v >> shift) & 0xf))
		shift -= 4;
	for (; shift >= 0; shift -= 4)
		vmcall_putc("0123456789abcdef"[(v >> shift) & 0xf]);
}

/* ---- Stopping ------------------------------------------------------------------------------- */

/*
 * Ends the whole run with `status` as the exit status of `vmcall run`. Works at CPL 0 and 3 (the
 * exit port is open to CPL 3). The host stops at the OUT; should it ever resume, CPL 0 halts and
 * CPL 3 (where CLI and HLT fault) spins.
 */
static inline __attribute__((noreturn)) void vmcall_exit(unsigned int status)
{
	vmcall_outl(VMCALL_PORT_EXIT, status);
	if (vmcall_cpl() == 0)
		for (;;)
			__asm__ volatile("cli\n\thlt" : : : "memory");
	for (;;)
		__asm__ volatile("pause" : : : "memory");
}

/*
 * Stops this vCPU: HLT with interrupts off. When every vCPU has halted the run ends with 0.
 * CPL 0 only: at CPL 3, CLI faults (#GP), which the VMM reports as a guest fault.
 */
static inline __attribute__((noreturn)) void vmcall_halt(void)
{
	for (;;)
		__asm__ volatile("cli\n\thlt" : : : "memory");
}

/* What the entry glue does with main's result: 0 halts this vCPU, anything else exits. */
static inline __attribute__((noreturn)) void vmcall_finish(int status)
{
	if (status == 0)
		vmcall_halt();
	vmcall_exit((unsigned int)status);
}

/* ---- Dropping to CPL 3 ---------------------------------------------------------------------- */

/* A CPL 3 function: its return value ends the run via vmcall_exit (CPL 3 cannot HLT). */
typedef int (*vmcall_user_fn)(void *arg);

/* Where IRETQ lands: RDI = fn, RSI = arg (IRETQ keeps both), RSP as after a call. */
static inline __attribute__((noreturn)) void __vmcall_user_entry(vmcall_user_fn fn, void *arg)
{
	vmcall_exit((unsigned int)fn(arg));
}

/*
 * Runs fn(arg) at CPL 3 on the stack ending at user_stack_top, by IRETQ to VMCALL_USER_CS:rip
 * and VMCALL_USER_DS:rsp with RFLAGS = VMCALL_USER_RFLAGS (IF = 0, IOPL = 0). DS and ES are
 * loaded with VMCALL_USER_DS. Never returns: there is no way back to CPL 0 but an exception.
 * Every page is user-accessible in the VMM's page tables, so any guest memory serves as the
 * stack (e.g. a static array or RAM from bi->free_start).
 */
static inline __attribute__((noreturn)) void vmcall_enter_user(vmcall_user_fn fn, void *arg,
							       void *user_stack_top)
{
	/* 16-byte aligned, minus the (zero) return address a call would have pushed. */
	unsigned long sp = ((unsigned long)user_stack_top & ~15UL) - 8;

	*(volatile unsigned long *)sp = 0;
	__asm__ volatile("{movl %k[ds], %%ds|mov ds, %k[ds]}\n\t"
			 "{movl %k[ds], %%es|mov es, %k[ds]}\n\t"
			 "{pushq %q[ds]|push %q[ds]}\n\t"	/* SS */
			 "{pushq %[sp]|push %[sp]}\n\t"		/* RSP */
			 "{pushq %[fl]|push %[fl]}\n\t"		/* RFLAGS */
			 "{pushq %[cs]|push %[cs]}\n\t"		/* CS */
			 "{pushq %[ip]|push %[ip]}\n\t"		/* RIP */
			 "iretq"
			 :
			 : [ds] "r"((unsigned long)VMCALL_USER_DS), [sp] "r"(sp),
			   [fl] "i"(VMCALL_USER_RFLAGS), [cs] "i"(VMCALL_USER_CS),
			   [ip] "r"(&__vmcall_user_entry), "D"(fn), "S"(arg)
			 : "memory");
	__builtin_unreachable();
}

/* ---- Entry glue ----------------------------------------------------------------------------- */

/*
 * Defines _start (in .text._start, which link.ld puts first): clear RBP, align RSP to 16 (so the
 * call leaves it as a function expects), call vmcall_c_main(RDI = boot info) and halt should it
 * return. Use it directly only with your own `void vmcall_c_main(const struct vmcall_boot_info *)`;
 * VMCALL_ENTRY does both.
 */
#define VMCALL_START()								\
	__attribute__((naked, noreturn, used, section(".text._start")))	\
	void _start(void)							\
	{									\
		__asm__ volatile("{xorl %%ebp, %%ebp|xor ebp, ebp}\n\t"		\
				 "{andq $-16, %%rsp|and rsp, -16}\n\t"		\
				 "call vmcall_c_main\n"				\
				 "1:\tcli\n\t"					\
				 "hlt\n\t"					\
				 "jmp 1b" : : : "memory");			\
	}

/*
 * Makes fn, an `int fn(const struct vmcall_boot_info *)`, the guest's main function: _start
 * calls vmcall_c_main, which caches the hypercall instruction for this CPU's vendor, runs fn and
 * halts this vCPU if it returns 0, or ends the run with its value otherwise. Every vCPU runs fn;
 * use bi->vcpu_id to tell them apart. Use once per guest.
 */
#define VMCALL_ENTRY(fn)							\
	__attribute__((noreturn, used))						\
	void vmcall_c_main(const struct vmcall_boot_info *__vmcall_bi);		\
	__attribute__((noreturn, used))						\
	void vmcall_c_main(const struct vmcall_boot_info *__vmcall_bi)		\
	{									\
		(void)vmcall_uses_vmmcall();					\
		vmcall_finish((fn)(__vmcall_bi));				\
	}									\
	VMCALL_START()

/* ---- What GCC may call even in freestanding code (struct copies, zeroing) ------------------- */

/*
 * Weak, so a guest (or another translation unit) may define its own. REP MOVSB / STOSB keep GCC
 * from turning the bodies back into calls to themselves. Define VMCALL_NO_MEMFUNCS to omit.
 */
#ifndef VMCALL_NO_MEMFUNCS
__attribute__((weak)) void *memcpy(void *dest, const void *src, unsigned long n)
{
	void *d = dest;

	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dest;
}

__attribute__((weak)) void *memmove(void *dest, const void *src, unsigned long n)
{
	unsigned char *d = (unsigned char *)dest;
	const unsigned char *s = (const unsigned char *)src;

	if (n == 0 || d <= s || d >= s + n)
		return memcpy(dest, src, n);
	d += n - 1;
	s += n - 1;
	__asm__ volatile("std\n\trep movsb\n\tcld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return dest;
}

__attribute__((weak)) void *memset(void *dest, int c, unsigned long n)
{
	void *d = dest;

	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dest;
}

__attribute__((weak)) int memcmp(const void *a, const void *b, unsigned long n)
{
	const volatile unsigned char *x = (const volatile unsigned char *)a;
	const volatile unsigned char *y = (const volatile unsigned char *)b;

	for (unsigned long i = 0; i < n; i++)
		if (x[i] != y[i])
			return (int)x[i] - (int)y[i];
	return 0;
}
#endif /* VMCALL_NO_MEMFUNCS */

#endif /* VMCALL_H */
