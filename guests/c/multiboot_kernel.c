/*
 * multiboot_kernel.c -- a small kernel written the way test kernels for QEMU's -kernel are:
 * a multiboot (v1) ELF32 image that enters in 32-bit protected mode, builds its own GDT, IDT
 * and page tables, maps itself in the higher half, switches to long mode itself, talks to a
 * 16550 UART (polling the line status before each byte), asks fw_cfg how many CPUs it has,
 * and ends through QEMU's isa-debug-exit device at port 0xf4.
 *
 * It makes hypercalls from 32-bit protected mode and from 64-bit mode, from static sites and
 * from code it writes at run time, checks that none reached its own #UD handlers and that a
 * genuine #UD does. Custom hypercall 20 is expected to echo a0 (--hypercall 20=echo).
 *
 * Run it as you would with QEMU:
 *   vmcall run multiboot_kernel --hypercall 20=echo -- any arguments
 *
 * vmcall-cflags: -m32
 * vmcall-ld: ../multiboot.ld
 */
#include <stdint.h>

#define MB_MAGIC 0x1BADB002u
#define MB_FLAGS 0x3u

__attribute__((section(".multiboot"), used, aligned(4)))
static const uint32_t multiboot_header[3] = { MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS) };

#define COM1 0x3f8
#define HIGH_HALF 0xffffffff80000000ull

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* ---- 16550 UART: 115200 8N1, FIFOs on, transmit when the holding register is empty ---- */
static void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* no interrupts */
	outb(COM1 + 3, 0x80); /* DLAB */
	outb(COM1 + 0, 0x01); /* divisor 1: 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 2, 0xc7); /* FIFOs on and cleared */
	outb(COM1 + 4, 0x0b); /* DTR, RTS, OUT2 */
}

static void putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))
		;
	outb(COM1, (uint8_t)c);
}

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static void puthex(uint64_t v)
{
	int started = 0;
	puts("0x");
	for (int i = 60; i >= 0; i -= 4) {
		unsigned d = (unsigned)(v >> i) & 15;
		if (d || started || i == 0) {
			putc("0123456789abcdef"[d]);
			started = 1;
		}
	}
}

/* ---- fw_cfg ---- */
static void fw_cfg_read(uint16_t key, uint8_t *buf, int n)
{
	outw(0x510, key);
	for (int i = 0; i < n; i++)
		buf[i] = inb(0x511);
}

/* ---- descriptor tables ---- */
struct __attribute__((packed)) dtr32 { uint16_t limit; uint32_t base; };
struct __attribute__((packed)) dtr64 { uint16_t limit; uint64_t base; };

/* 0x08: 32-bit code, 0x10: data, 0x18: 64-bit code. */
static const uint64_t gdt[4] __attribute__((aligned(16))) = {
	0, 0x00cf9a000000ffffull, 0x00cf92000000ffffull, 0x00af9a000000ffffull,
};
static uint64_t idt32[32] __attribute__((aligned(16)));
static uint64_t idt64[64] __attribute__((aligned(16))); /* 32 gates of 16 bytes */

/* Written by the #UD handlers; the handlers skip the 2-byte ud2. */
volatile uint32_t ud_count32, ud_count64;

void ud_handler32(void);
void ud_handler64(void);
__asm__(".text\n"
	"ud_handler32:\n"
	"  incl ud_count32\n"
	"  addl $2, (%esp)\n"
	"  iret\n"
	".code64\n"
	"ud_handler64:\n"
	"  incl ud_count64(%rip)\n"
	"  addq $2, (%rsp)\n"
	"  iretq\n"
	".code32\n");

static void set_gate32(int v, void (*h)(void))
{
	uint32_t a = (uint32_t)h;
	idt32[v] = (a & 0xffff) | (0x08ull << 16) | (0x8eull << 40) | ((uint64_t)(a >> 16) << 48);
}

static void set_gate64(int v, uint64_t a)
{
	idt64[2 * v] = (a & 0xffff) | (0x18ull << 16) | (0x8eull << 40) | (((a >> 16) & 0xffff) << 48);
	idt64[2 * v + 1] = a >> 32;
}

/* ---- page tables: identity for the low 1 GiB, and the same 1 GiB at HIGH_HALF ---- */
static uint64_t pml4[512] __attribute__((aligned(4096)));
static uint64_t pdpt_low[512] __attribute__((aligned(4096)));
static uint64_t pdpt_high[512] __attribute__((aligned(4096)));
static uint64_t pd[512] __attribute__((aligned(4096)));

static void build_page_tables(void)
{
	for (int i = 0; i < 512; i++)
		pd[i] = ((uint64_t)i << 21) | 0x83; /* 2 MiB, present, writable */
	pdpt_low[0] = (uint32_t)pd | 3;
	pdpt_high[510] = (uint32_t)pd | 3; /* 0xffffffff80000000 */
	pml4[0] = (uint32_t)pdpt_low | 3;
	pml4[511] = (uint32_t)pdpt_high | 3;
}

/* ---- hypercalls from 32-bit protected mode ---- */
static uint32_t vmcall32(uint32_t nr, uint32_t a0)
{
	uint32_t r;
	__asm__ volatile("vmcall" : "=a"(r) : "a"(nr), "b"(a0) : "memory");
	return r;
}

static uint32_t vmmcall32(uint32_t nr, uint32_t a0)
{
	uint32_t r;
	__asm__ volatile("vmmcall" : "=a"(r) : "a"(nr), "b"(a0) : "memory");
	return r;
}

/* Code written at run time: mov eax, 20; mov ebx, A0; vmcall or vmmcall; ret. */
uint8_t runtime_code[64] __attribute__((aligned(16)));

static void write_runtime(uint8_t *at, uint32_t a0, int vmmcall)
{
	const uint8_t code[] = { 0xb8, 20, 0, 0, 0, 0xbb, (uint8_t)a0, (uint8_t)(a0 >> 8), 0, 0,
				 0x0f, 0x01, vmmcall ? 0xd9 : 0xc1, 0xc3 };
	for (unsigned i = 0; i < sizeof code; i++)
		at[i] = code[i];
}

/* ---- long mode: the 64-bit part prints its own results (put64, puthex64) and exits ---- */
static uint8_t stack64[8192] __attribute__((aligned(16)));
struct dtr64 idt64_ptr;
uint64_t high_entry, high_stack;

/* 64-bit code: entered from compatibility mode through a far jump to entry64 (low), which
 * moves to the higher-half alias, loads the 64-bit IDT and runs the checks. It addresses data
 * RIP-relative only: an ELF32 object has no relocation for 64-bit absolute addresses. */
__asm__(".text\n"
	".code64\n"
	"entry64:\n"
	"  mov $0x10, %ax\n"
	"  mov %ax, %ds\n"
	"  mov %ax, %es\n"
	"  mov %ax, %ss\n"
	"  mov high_stack(%rip), %rsp\n"
	"  mov high_entry(%rip), %rax\n"
	"  jmp *%rax\n"
	"high64:\n"
	"  lidt idt64_ptr(%rip)\n"
	"  lea msg_high(%rip), %rsi\n"
	"  call puts64\n"
	"  lea (%rip), %rdi\n"
	"  call puthex64\n"
	/* static VMCALL and VMMCALL with a 64-bit argument */
	"  lea msg_s1(%rip), %rsi\n"
	"  call puts64\n"
	"  mov $20, %eax\n"
	"  movabs $0x1234567890, %rbx\n"
	"  vmcall\n"
	"  mov %rax, %rdi\n"
	"  call puthex64\n"
	"  lea msg_s2(%rip), %rsi\n"
	"  call puts64\n"
	"  mov $20, %eax\n"
	"  movabs $0x2234567890, %rbx\n"
	"  vmmcall\n"
	"  mov %rax, %rdi\n"
	"  call puthex64\n"
	/* unknown number: -KVM_ENOSYS, all 64 bits */
	"  lea msg_s3(%rip), %rsi\n"
	"  call puts64\n"
	"  mov $999, %eax\n"
	"  vmcall\n"
	"  mov %rax, %rdi\n"
	"  call puthex64\n"
	/* code written at run time (by the 32-bit part), called through the higher half (where
	 * RIP-relative addresses point now) */
	"  lea msg_r1(%rip), %rsi\n"
	"  call puts64\n"
	"  lea runtime_code+32(%rip), %rax\n"
	"  call *%rax\n"
	"  mov %rax, %rdi\n"
	"  call puthex64\n"
	/* a genuine #UD reaches the kernel's own handler */
	"  ud2\n"
	"  lea msg_ud(%rip), %rsi\n"
	"  call puts64\n"
	"  mov ud_count64(%rip), %edi\n"
	"  call puthex64\n"
	"  lea msg_done(%rip), %rsi\n"
	"  call puts64\n"
	/* isa-debug-exit: status (0x10 << 1) | 1 = 33 */
	"  mov $0x10, %eax\n"
	"  out %eax, $0xf4\n"
	"1: hlt\n"
	"  jmp 1b\n"
	/* put64: AL to COM1 once the transmitter is empty */
	"put64:\n"
	"  push %rdx\n"
	"  push %rax\n"
	"2: mov $0x3fd, %dx\n"
	"  in %dx, %al\n"
	"  test $0x20, %al\n"
	"  jz 2b\n"
	"  pop %rax\n"
	"  mov $0x3f8, %dx\n"
	"  out %al, %dx\n"
	"  pop %rdx\n"
	"  ret\n"
	/* puts64: the NUL-terminated string at RSI */
	"puts64:\n"
	"  lodsb\n"
	"  test %al, %al\n"
	"  jz 3f\n"
	"  call put64\n"
	"  jmp puts64\n"
	"3: ret\n"
	/* puthex64: RDI as 0x... without leading zeros, then a newline */
	"puthex64:\n"
	"  mov $'0', %al\n"
	"  call put64\n"
	"  mov $'x', %al\n"
	"  call put64\n"
	"  mov $60, %cl\n"
	"  xor %r8d, %r8d\n"
	"4: mov %rdi, %rax\n"
	"  shr %cl, %rax\n"
	"  and $15, %eax\n"
	"  test %cl, %cl\n"
	"  jz 5f\n"
	"  test %r8d, %r8d\n"
	"  jnz 5f\n"
	"  test %eax, %eax\n"
	"  jz 6f\n"
	"5: mov $1, %r8d\n"
	"  lea hexdigits(%rip), %rdx\n"
	"  mov (%rdx,%rax), %al\n"
	"  call put64\n"
	"6: sub $4, %cl\n"
	"  jns 4b\n"
	"  mov $10, %al\n"
	"  call put64\n"
	"  ret\n"
	".code32\n"
	".section .rodata\n"
	"hexdigits: .ascii \"0123456789abcdef\"\n"
	"msg_high: .asciz \"long mode: running in the higher half at \"\n"
	"msg_s1: .asciz \"64-bit static vmcall nr=20 a0=0x1234567890: \"\n"
	"msg_s2: .asciz \"64-bit static vmmcall nr=20 a0=0x2234567890: \"\n"
	"msg_s3: .asciz \"64-bit static vmcall nr=999: \"\n"
	"msg_r1: .asciz \"64-bit run-time vmmcall nr=20 a0=0x65: \"\n"
	"msg_ud: .asciz \"64-bit ud2 reached the kernel's #UD handler, count \"\n"
	"msg_done: .asciz \"done, exiting through isa-debug-exit \"\n"
	".text\n");

void entry64(void);
void high64(void);

static void enter_long_mode(void)
{
	struct dtr64 *p = &idt64_ptr;
	for (int v = 0; v < 32; v++)
		idt64[2 * v] = idt64[2 * v + 1] = 0;
	set_gate64(6, HIGH_HALF + (uint32_t)ud_handler64);
	p->limit = sizeof idt64 - 1;
	p->base = HIGH_HALF + (uint32_t)idt64;
	high_entry = HIGH_HALF + (uint32_t)high64;
	high_stack = HIGH_HALF + (uint32_t)(stack64 + sizeof stack64);
	build_page_tables();
	__asm__ volatile("mov %0, %%cr3\n\t"
			 "mov %%cr4, %%eax\n\t"
			 "or $0x20, %%eax\n\t" /* PAE */
			 "mov %%eax, %%cr4\n\t"
			 "mov $0xc0000080, %%ecx\n\t"
			 "rdmsr\n\t"
			 "or $0x100, %%eax\n\t" /* EFER.LME */
			 "wrmsr\n\t"
			 "mov %%cr0, %%eax\n\t"
			 "or $0x80000000, %%eax\n\t" /* paging on: long mode, compatibility */
			 "mov %%eax, %%cr0\n\t"
			 "ljmp $0x18, $entry64" ::"r"((uint32_t)pml4)
			 : "eax", "ecx", "edx", "memory");
}

/* ---- the 32-bit kernel ---- */
static uint8_t stack32[8192] __attribute__((aligned(16)));

void kmain(uint32_t magic, const uint32_t *info);

__attribute__((naked, section(".text._start"))) void _start(void)
{
	__asm__ volatile("mov %0, %%esp\n\tpush %%ebx\n\tpush %%eax\n\tcall kmain\n1:\thlt\n\tjmp 1b"
			 ::"i"(stack32 + sizeof stack32));
}

void kmain(uint32_t magic, const uint32_t *info)
{
	serial_init();
	puts("multiboot kernel: magic ");
	puthex(magic);
	puts(", command line \"");
	puts((const char *)info[4]);
	puts("\"\n");

	uint8_t sig[4], cpus[2];
	fw_cfg_read(0x0000, sig, 4);
	fw_cfg_read(0x0005, cpus, 2);
	puts("fw_cfg: signature ");
	for (int i = 0; i < 4; i++)
		putc((char)sig[i]);
	puts(", ");
	puthex(cpus[0] | cpus[1] << 8);
	puts(" CPUs\n");

	volatile uint32_t *apic = (volatile uint32_t *)0xfee00000;
	puts("local APIC: id ");
	puthex(apic[0x20 / 4] >> 24);
	puts(", version ");
	puthex(apic[0x30 / 4] & 0xff);
	puts("\n");

	/* Own GDT and IDT, as every kernel sets up first. */
	struct dtr32 g = { sizeof gdt - 1, (uint32_t)gdt };
	__asm__ volatile("lgdt %0\n\t"
			 "ljmp $0x08, $1f\n"
			 "1:\tmov $0x10, %%ax\n\t"
			 "mov %%ax, %%ds\n\tmov %%ax, %%es\n\tmov %%ax, %%ss\n\tmov %%ax, %%fs\n\tmov %%ax, %%gs"
			 ::"m"(g) : "eax", "memory");
	set_gate32(6, ud_handler32);
	struct dtr32 i = { sizeof idt32 - 1, (uint32_t)idt32 };
	__asm__ volatile("lidt %0" ::"m"(i));
	puts("own GDT and IDT loaded\n");

	puts("32-bit static vmcall nr=20 a0=0x32: ");
	puthex(vmcall32(20, 0x32));
	puts("\n32-bit static vmmcall nr=20 a0=0x33: ");
	puthex(vmmcall32(20, 0x33));
	puts("\n32-bit static vmcall nr=999: ");
	puthex(vmcall32(999, 0));
	write_runtime(runtime_code, 0x34, 0);
	write_runtime(runtime_code + 32, 0x65, 1);
	puts("\n32-bit run-time vmcall nr=20 a0=0x34: ");
	puthex(((uint32_t(*)(void))runtime_code)());
	/* No hypercall reached the kernel's own #UD handler. (A genuine #UD is tested in long
	 * mode: kvm_pvm cannot emulate the 32-bit IRET a 32-bit handler returns with.) */
	puts("\n32-bit #UD handler ran ");
	puthex(ud_count32);
	puts(" times\n");
	enter_long_mode();
}
