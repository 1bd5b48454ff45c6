/*
 * multiboot_min.c -- the smallest multiboot kernel: what a course lab or a hobby kernel
 * starts as, built for QEMU's -kernel. 32-bit protected mode from the first instruction, no
 * paging, no IDT of its own; it checks what the loader handed it, makes hypercalls from
 * 32-bit protected mode and exits.
 *
 * vmcall-cflags: -m32
 * vmcall-ld: ../multiboot.ld
 */
#include <stdint.h>

#define MB_MAGIC 0x1BADB002u
#define MB_FLAGS 0x3u /* page-align modules, memory information */

__attribute__((section(".multiboot"), used, aligned(4)))
static const uint32_t multiboot_header[3] = { MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS) };

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }

static void puts(const char *s)
{
	while (*s)
		outb(0x3f8, (uint8_t)*s++);
}

static void puthex(uint32_t v)
{
	puts("0x");
	for (int i = 28; i >= 0; i -= 4)
		outb(0x3f8, "0123456789abcdef"[(v >> i) & 15]);
}

static uint8_t stack[8192] __attribute__((aligned(16)));

void kmain(uint32_t magic, const uint32_t *info);

__attribute__((naked, section(".text._start"))) void _start(void)
{
	__asm__ volatile("mov %0, %%esp\n\tpush %%ebx\n\tpush %%eax\n\tcall kmain\n1:\thlt\n\tjmp 1b"
			 ::"i"(stack + sizeof stack));
}

static uint32_t hypercall1(int vmmcall, uint32_t nr, uint32_t a0)
{
	uint32_t ret;
	if (vmmcall)
		__asm__ volatile("vmmcall" : "=a"(ret) : "a"(nr), "b"(a0) : "memory");
	else
		__asm__ volatile("vmcall" : "=a"(ret) : "a"(nr), "b"(a0) : "memory");
	return ret;
}

void kmain(uint32_t magic, const uint32_t *info)
{
	uint32_t cr0;
	__asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
	puts("mb magic=");
	puthex(magic);
	puts(" flags&0x24d=");
	puthex(info[0] & 0x24d);
	puts(" mem_lower=");
	puthex(info[1]);
	puts(" cr0.pe=");
	puthex(cr0 & 1);
	puts(" cr0.pg=");
	puthex(cr0 >> 31);
	puts("\nmb cmdline=");
	puts((const char *)info[4]);
	puts("\nmb vmcall nr=20 a0=0x11: ");
	puthex(hypercall1(0, 20, 0x11));
	puts("\nmb vmmcall nr=20 a0=0x12: ");
	puthex(hypercall1(1, 20, 0x12));
	puts("\nmb vmcall nr=999: ");
	puthex(hypercall1(0, 999, 0));
	puts("\n");
	outl(0xf8, 0);
}
