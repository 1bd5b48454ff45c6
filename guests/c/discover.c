/*
 * discover.c -- a vmcall example guest that lists the host's custom hypercalls with
 * VMCALL_HC_LIST, through the header's vmcall_hypercall_count and vmcall_list_hypercalls.
 *
 * Prints, as guests/src/bin/discover.rs does:
 *     count=N                      how many are registered
 *     small ret=R                  an array one entry short: -KVM_E2BIG (-7), nothing written
 *     hc nr=NR name=NAME           one line per registered number, sorted by number
 *     wild ret=R                   an array outside guest RAM: -KVM_EFAULT (-14)
 *
 * Build: see crates/guest/include/README.md.
 */
#include <linux/kvm_para.h>
#include <vmcall.h>

#define MAX 16

/* Far beyond any guest RAM vmcall allows (VMCALL_LAYOUT_MAX_RAM is 64 GiB). */
#define WILD_GPA 0xfffffffff000UL

static void report(const char *what, long ret)
{
	vmcall_puts(what);
	vmcall_puts(" ret=");
	vmcall_put_i64(ret);
	vmcall_putc('\n');
}

static int discover_main(const struct vmcall_boot_info *bi)
{
	static struct vmcall_hypercall_info list[MAX];
	long count, got, shorter;

	if (bi->vcpu_id != 0)
		return 0;
	count = vmcall_hypercall_count();
	vmcall_puts("count=");
	vmcall_put_i64(count);
	vmcall_putc('\n');
	shorter = count > 1 ? count - 1 : 0;
	report("small", vmcall_list_hypercalls(list, shorter > MAX ? MAX : (unsigned long)shorter));
	got = vmcall_list_hypercalls(list, MAX);
	for (long i = 0; i < got && i < MAX; i++) {
		vmcall_puts("hc nr=");
		vmcall_put_u64(list[i].nr);
		vmcall_puts(" name=");
		vmcall_puts(list[i].name);
		vmcall_putc('\n');
	}
	report("wild", kvm_hypercall2(VMCALL_HC_LIST, WILD_GPA, sizeof(list)));
	return 0;
}

VMCALL_ENTRY(discover_main)
