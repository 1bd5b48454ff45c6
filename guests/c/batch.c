/*
 * batch.c -- a vmcall example guest that runs several hypercalls with one VMCALL_HC_BATCH,
 * through the header's vmcall_hypercall_batch.
 *
 * vCPU 0 makes one batch of five entries and prints
 *     batch ret=5                  the number of entries processed
 *     entry 0 nr=20 ret=<value>    KVM_HC_MY_VMCALL, a0 = 1: whatever the host's handler answers
 *     entry 1 nr=20 ret=<value>    KVM_HC_MY_VMCALL, a0 = 2
 *     entry 2 nr=1 ret=0           KVM_HC_VAPIC_POLL_IRQ
 *     entry 3 nr=999 ret=-1000     unknown number: -KVM_ENOSYS
 *     entry 4 nr=1447231489 ret=-22  a nested VMCALL_HC_BATCH: -KVM_EINVAL
 * then two batches the host refuses as a whole:
 *     toobig ret=-7                VMCALL_BATCH_MAX + 1 entries: -KVM_E2BIG
 *     wild ret=-14                 an array outside guest RAM: -KVM_EFAULT
 * and returns 0, which halts its vCPU; every vCPU halts, so the run ends with 0.
 *
 * Build: see crates/guest/include/README.md.
 */
#include <linux/kvm_para.h>
#include <vmcall.h>

#define BATCH_LEN 5

/* Far beyond any guest RAM vmcall allows (VMCALL_LAYOUT_MAX_RAM is 64 GiB). */
#define WILD_GPA 0xffffffff000UL

static void report(const char *what, long ret)
{
	vmcall_puts(what);
	vmcall_puts(" ret=");
	vmcall_put_i64(ret);
	vmcall_putc('\n');
}

static int batch_main(const struct vmcall_boot_info *bi)
{
	struct vmcall_batch_entry entries[BATCH_LEN] = {
		{ .nr = KVM_HC_MY_VMCALL, .args = { 1 } },
		{ .nr = KVM_HC_MY_VMCALL, .args = { 2 } },
		{ .nr = KVM_HC_VAPIC_POLL_IRQ },
		{ .nr = 999 },
		{ .nr = VMCALL_HC_BATCH },
	};
	long ret;

	if (bi->vcpu_id != 0)
		return 0;

	ret = vmcall_hypercall_batch(entries, BATCH_LEN);
	report("batch", ret);
	for (int i = 0; i < BATCH_LEN; i++) {
		vmcall_puts("entry ");
		vmcall_put_u64((unsigned long long)i);
		vmcall_puts(" nr=");
		vmcall_put_u64(entries[i].nr);
		report("", (long)entries[i].ret);
	}

	/* Refused before any entry is read, so the five-entry array serves as the pointer. */
	report("toobig", vmcall_hypercall_batch(entries, VMCALL_BATCH_MAX + 1));
	report("wild", vmcall_hypercall_batch((struct vmcall_batch_entry *)WILD_GPA, 2));
	return 0;
}

VMCALL_ENTRY(batch_main)
