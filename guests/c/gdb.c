/*
 * gdb.c -- the guest the gdb remote stub's tests debug (crates/cli/tests/gdb.rs, docs/gdb.md).
 * vmcall-cflags: -g
 *
 * Small on purpose (guest code under a software KVM runs ~200x slower than on the emulator).
 * gdb_mark() sets gdb_counter and returns; gdb_vmcall is the address of a VMCALL that makes
 * hypercall 20 (KVM_HC_MY_VMCALL) with a0 = gdb_counter; the answer is stored in gdb_answer
 * and the run ends with status 7. Other vCPUs halt.
 */
#include <vmcall.h>

volatile unsigned long gdb_counter;
volatile long gdb_answer;

__attribute__((noinline)) void gdb_mark(unsigned long value)
{
	gdb_counter = value;
}

static int gdb_main(const struct vmcall_boot_info *bi)
{
	long ret;

	if (bi->vcpu_id != 0)
		return 0;
	gdb_mark(42);
	/* A named site, so that a debugger can stop right at the instruction. */
	asm volatile(".globl gdb_vmcall\n"
		     "gdb_vmcall: vmcall"
		     : "=a"(ret)
		     : "a"((unsigned long)KVM_HC_MY_VMCALL), "b"(gdb_counter)
		     : "memory");
	gdb_answer = ret;
	vmcall_puts("gdb guest: answer ");
	vmcall_put_i64(ret);
	vmcall_putc('\n');
	return 7;
}

VMCALL_ENTRY(gdb_main)
