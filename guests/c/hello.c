/*
 * hello.c -- a vmcall example guest that makes its hypercalls only through the Linux-compatible
 * kvm_hypercall0..4 of <linux/kvm_para.h>, which use the vendor's instruction (VMCALL on Intel,
 * VMMCALL on AMD and Hygon), as Linux's do.
 *
 * vCPU 0 prints one line per hypercall:
 *     nr=1 ret=0                   KVM_HC_VAPIC_POLL_IRQ, kvm_hypercall0
 *     nr=20 arg=41 ret=<value>     KVM_HC_MY_VMCALL, kvm_hypercall1
 *     nr=999 ret=-1000             unknown number, kvm_hypercall0: -KVM_ENOSYS
 *     nr=21 arg=1,2,3,4 ret=<value>  a second custom hypercall, kvm_hypercall4
 * and returns 0, which halts its vCPU; every vCPU halts, so the run ends with 0.
 *
 * Build: see crates/guest/include/README.md.
 */
#include <linux/kvm_para.h>
#include <vmcall.h>

#define KVM_HC_MY_VMCALL 20

static void report(unsigned int nr, const unsigned long *args, int nargs, long ret)
{
	vmcall_puts("nr=");
	vmcall_put_u64(nr);
	for (int i = 0; i < nargs; i++) {
		vmcall_puts(i == 0 ? " arg=" : ",");
		vmcall_put_u64(args[i]);
	}
	vmcall_puts(" ret=");
	vmcall_put_i64(ret);
	vmcall_putc('\n');
}

static int hello_main(const struct vmcall_boot_info *bi)
{
	static const unsigned long four[4] = { 1, 2, 3, 4 };
	unsigned long one = 41;

	if (bi->vcpu_id != 0)
		return 0;

	report(KVM_HC_VAPIC_POLL_IRQ, 0, 0, kvm_hypercall0(KVM_HC_VAPIC_POLL_IRQ));
	report(KVM_HC_MY_VMCALL, &one, 1, kvm_hypercall1(KVM_HC_MY_VMCALL, one));
	report(999, 0, 0, kvm_hypercall0(999));
	report(KVM_HC_MY_VMCALL + 1, four, 4,
	       kvm_hypercall4(KVM_HC_MY_VMCALL + 1, four[0], four[1], four[2], four[3]));
	return 0;
}

VMCALL_ENTRY(hello_main)
