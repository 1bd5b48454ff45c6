/* The smallest C guest: no .rodata, no .data, so link.ld gives it an empty PT_LOAD, which the
 * loader must accept. It exits with its one hypercall's answer. */
#include <linux/kvm_para.h>
#include <vmcall.h>

static int nodata_main(const struct vmcall_boot_info *bi)
{
	(void)bi;
	return (int)kvm_hypercall1(20, 3);
}
VMCALL_ENTRY(nodata_main)
