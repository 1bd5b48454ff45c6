/*
 * kernel_highhalf.c -- a vmcall test guest linked like a 64-bit kernel: in the higher half.
 *
 * Everything but the entry stub is linked at 0xffffffff80000000 + its physical address
 * (highhalf.ld) and loaded at the physical address. The stub, linked low where it is loaded,
 * runs on the VMM's identity mapping: it builds page tables that identity-map the low GiB
 * (the VMM's GDT, IDT, TSS and stacks, the boot info) and map the higher half
 * 0xffffffff80000000.. onto physical 0.., loads CR3 and jumps high. The kernel then makes
 * hypercalls from higher-half code (the header's vendor pick, and VMCALL and VMMCALL forced),
 * passes a higher-half pointer to hypercall 0x30 (the test's handler sums the bytes at a
 * guest-virtual address), prints `highhalf ...` lines and exits with 0.
 *
 * Build directives read by crates/test-guests/build.rs:
 * vmcall-ld: highhalf.ld
 * vmcall-cflags: -mcmodel=kernel
 */
#include <vmcall.h>

#define KERNEL_VMA	0xffffffff80000000UL
#define HC_SUM		0x30
#define KSTACK_SIZE	16384

unsigned char kstack[KSTACK_SIZE] __attribute__((aligned(16), used));

/*
 * The entry stub and its page tables, linked low. PD entries map 2 MiB pages (P | RW | PS =
 * 0x83); each table above points to the next with P | RW (3). Clobbers only what the entry
 * state leaves free; RDI (the boot info) travels in R12.
 */
__asm__(".section .boot.bss, \"aw\", @nobits\n"
	".p2align 12\n"
	"boot_pml4:	.skip 4096\n"
	"boot_pdpt_low:	.skip 4096\n"
	"boot_pd_low:	.skip 4096\n"
	"boot_pdpt_high:	.skip 4096\n"
	"boot_pd_high:	.skip 4096\n"
	".section .boot.text, \"ax\"\n"
	".global _start\n"
	"_start:\n"
	"	mov %rdi, %r12\n"
	"	mov 24(%rdi), %rcx\n"		/* BootInfo.ram_size */
	"	shr $21, %rcx\n"		/* in 2 MiB pages, at most one GiB's */
	"	cmp $512, %rcx\n"
	"	jbe 2f\n"
	"	mov $512, %rcx\n"
	"2:	lea boot_pd_low(%rip), %rdi\n"
	"	lea boot_pd_high(%rip), %rsi\n"
	"	xor %edx, %edx\n"
	"3:	mov %rdx, %rax\n"
	"	shl $21, %rax\n"
	"	or $0x83, %rax\n"
	"	mov %rax, (%rdi,%rdx,8)\n"	/* VA i * 2 MiB -> PA i * 2 MiB */
	"	mov %rax, (%rsi,%rdx,8)\n"	/* VA KERNEL_VMA + i * 2 MiB -> the same */
	"	inc %rdx\n"
	"	cmp %rcx, %rdx\n"
	"	jb 3b\n"
	"	lea 3(%rdi), %rax\n"
	"	mov %rax, boot_pdpt_low(%rip)\n"		/* slot 0: the low GiB */
	"	lea 3(%rsi), %rax\n"
	"	mov %rax, boot_pdpt_high+510*8(%rip)\n"	/* slot 510: 0xffffffff80000000 */
	"	lea boot_pdpt_low+3(%rip), %rax\n"
	"	mov %rax, boot_pml4(%rip)\n"
	"	lea boot_pdpt_high+3(%rip), %rax\n"
	"	mov %rax, boot_pml4+511*8(%rip)\n"
	"	lea boot_pml4(%rip), %rax\n"
	"	mov %rax, %cr3\n"
	"	movabs $high_start, %rax\n"
	"	jmp *%rax\n"
	".text\n"
	"high_start:\n"
	"	lea kstack+16384(%rip), %rsp\n"
	"	mov %r12, %rdi\n"
	"	call kmain\n"
	"4:	cli\n"
	"	hlt\n"
	"	jmp 4b\n");

_Static_assert(KSTACK_SIZE == 16384, "the entry stub's stack size");

static const char high_string[] = "a string linked in the higher half";

static void report(const char *what, long ret)
{
	vmcall_puts("highhalf ");
	vmcall_puts(what);
	vmcall_puts(": ret=");
	vmcall_put_i64(ret);
	vmcall_putc('\n');
}

static void flag(const char *name, int value)
{
	vmcall_puts(name);
	vmcall_putc(value ? '1' : '0');
}

__attribute__((noreturn, used)) void kmain(const struct vmcall_boot_info *bi);

__attribute__((noreturn, used)) void kmain(const struct vmcall_boot_info *bi)
{
	unsigned long rip, ret, cr3;
	char on_stack[] = "a string on the higher-half stack";

	__asm__ volatile("lea 0(%%rip), %0" : "=r"(rip));
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	vmcall_puts("highhalf:");
	flag(" rip_high=", rip >= KERNEL_VMA);
	flag(" stack_high=", (unsigned long)on_stack >= KERNEL_VMA);
	flag(" own_cr3=", cr3 != VMCALL_LAYOUT_PML4);
	flag(" boot_info=", bi->magic == VMCALL_BOOT_INFO_MAGIC);
	vmcall_putc('\n');

	report("sdk nr=20 a0=0x41", kvm_hypercall1(KVM_HC_MY_VMCALL, 0x41));
	__asm__ volatile(".byte 0x0f, 0x01, 0xc1" : "=a"(ret) : "a"(20UL), "b"(0x42UL) : "memory");
	report("vmcall nr=20 a0=0x42", (long)ret);
	__asm__ volatile(".byte 0x0f, 0x01, 0xd9" : "=a"(ret) : "a"(20UL), "b"(0x43UL) : "memory");
	report("vmmcall nr=20 a0=0x43", (long)ret);
	report("sdk nr=999", kvm_hypercall1(999, 0));
	report("sum rodata", kvm_hypercall2(HC_SUM, (unsigned long)high_string,
					    sizeof(high_string) - 1));
	report("sum stack", kvm_hypercall2(HC_SUM, (unsigned long)on_stack, sizeof(on_stack) - 1));
	vmcall_puts("highhalf: done\n");
	vmcall_exit(0);
}
