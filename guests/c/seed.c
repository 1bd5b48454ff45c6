/*
 * seed.c -- a vmcall example guest written the way the seed's Linux guest code is: its own
 * Linux-style inline asm (`vmcall` with the number in RAX, a0 in RBX, the result in RAX) at
 * several distinct call sites, with KVM_HC_MY_VMCALL defined locally.
 *
 * vCPU 0 prints one line per hypercall:
 *     nr=1 ret=0                   KVM_HC_VAPIC_POLL_IRQ
 *     nr=20 arg=41 ret=<value>     KVM_HC_MY_VMCALL, whatever the host's handler answers
 *     nr=999 ret=-1000             unknown number: -KVM_ENOSYS
 * then drops to CPL 3, makes the KVM_HC_MY_VMCALL call again and prints
 *     cpl3 nr=20 ret=-1            -KVM_EPERM: hypercalls from CPL 3 are refused
 * and ends the run with status 0 through the exit port, still at CPL 3. Other vCPUs halt.
 *
 * The instruction is `vmcall` even on AMD, exactly as the seed has it; the VMM traps both.
 * Build: see crates/guest/include/README.md.
 */
#include <linux/kvm_para.h>
#include <vmcall.h>

#define KVM_HC_MY_VMCALL 20

static unsigned char user_stack[16384] __attribute__((aligned(16)));

static void report(const char *prefix, unsigned long nr, int has_arg, unsigned long arg, long ret)
{
	vmcall_puts(prefix);
	vmcall_puts("nr=");
	vmcall_put_u64(nr);
	if (has_arg) {
		vmcall_puts(" arg=");
		vmcall_put_u64(arg);
	}
	vmcall_puts(" ret=");
	vmcall_put_i64(ret);
	vmcall_putc('\n');
}

/* Runs at CPL 3. */
static int user_main(void *unused)
{
	unsigned long nr = KVM_HC_MY_VMCALL, a0 = 41;
	long ret;

	(void)unused;
	asm volatile("vmcall" : "=a"(ret) : "a"(nr), "b"(a0) : "memory");
	report("cpl3 ", nr, 0, 0, ret);
	vmcall_exit(0);
}

static int seed_main(const struct vmcall_boot_info *bi)
{
	unsigned long nr, a0;
	long ret;

	if (bi->magic != VMCALL_BOOT_INFO_MAGIC || bi->abi_version != VMCALL_ABI_VERSION) {
		vmcall_puts("seed: bad boot info\n");
		return 2;
	}
	if (bi->vcpu_id != 0)
		return 0;

	nr = KVM_HC_VAPIC_POLL_IRQ;
	a0 = 0;
	asm volatile("vmcall" : "=a"(ret) : "a"(nr), "b"(a0) : "memory");
	report("", nr, 0, 0, ret);

	nr = KVM_HC_MY_VMCALL;
	a0 = 41;
	asm volatile("vmcall" : "=a"(ret) : "a"(nr), "b"(a0) : "memory");
	report("", nr, 1, a0, ret);

	nr = 999;
	a0 = 0;
	asm volatile("vmcall" : "=a"(ret) : "a"(nr), "b"(a0) : "memory");
	report("", nr, 0, 0, ret);

	vmcall_enter_user(user_main, 0, user_stack + sizeof(user_stack));
}

VMCALL_ENTRY(seed_main)
