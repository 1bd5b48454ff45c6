/* vmcall_wasm.h: write a vmcall hypercall handler in C and compile it to WebAssembly.
 *
 *   clang --target=wasm32 -O2 -nostdlib -mbulk-memory -I sdk/wasm/include \
 *         -Wl,--no-entry -Wl,--export=vmcall_handle -o handler.wasm handler.c
 *   vmcall run GUEST --hypercall 20=wasm:handler.wasm
 *
 * The handler is one exported function, vmcall_handle (define it with VMCALL_HANDLER), whose
 * return value goes to the calling vCPU's RAX. Its globals and memory persist from call to
 * call; calls from several vCPUs run one at a time. The host functions below are imported
 * from module "vmcall". A trap (__builtin_trap(), an out-of-bounds access, ...), running past
 * the time budget (10M fuel by default, about 10 ms) or growing memory past the cap (16 MiB)
 * answers the guest -KVM_EFAULT (-14); the next call runs normally. docs/wasm.md has it all.
 *
 * No libc: -nostdlib; -mbulk-memory lets clang turn memcpy/memset into wasm instructions
 * instead of calls to functions that do not exist here. Only this header is needed.
 */
#ifndef VMCALL_WASM_H
#define VMCALL_WASM_H

#if !defined(__wasm32__)
#error "vmcall_wasm.h is for handlers compiled with clang --target=wasm32"
#endif

typedef signed char vmcall_i8;
typedef unsigned char vmcall_u8;
typedef int vmcall_i32;
typedef unsigned int vmcall_u32;
typedef long long vmcall_i64;
typedef unsigned long long vmcall_u64;
typedef unsigned long vmcall_size; /* size_t on wasm32 */

/* Error codes, as the guest sees them negated in RAX (the same values as Linux's
 * include/uapi/linux/kvm_para.h). */
#ifndef KVM_ENOSYS
#define KVM_ENOSYS 1000
#define KVM_EFAULT 14
#define KVM_EINVAL 22
#define KVM_E2BIG 7
#define KVM_EPERM 1
#define KVM_EOPNOTSUPP 95
#endif

#define VMCALL_WASM_IMPORT(name) __attribute__((import_module("vmcall"), import_name(#name)))

/* Copy len bytes of guest RAM at guest-physical address gpa into buf. 0, or -KVM_EFAULT
 * when gpa..gpa+len is not guest RAM. A buf outside this module's memory traps. */
VMCALL_WASM_IMPORT(read_phys) vmcall_i32 vmcall_read_phys(vmcall_u64 gpa, void *buf, vmcall_u32 len);
/* Copy len bytes from buf to guest RAM at gpa. 0, or -KVM_EFAULT (nothing written). */
VMCALL_WASM_IMPORT(write_phys) vmcall_i32 vmcall_write_phys(vmcall_u64 gpa, const void *buf, vmcall_u32 len);
/* The same at a guest-virtual address, translated through the calling vCPU's own page tables
 * (as they are at the call). -KVM_EFAULT for an unmapped page, a write to a read-only page or
 * a page-table walk outside RAM; a write checks every page before it writes any byte. */
VMCALL_WASM_IMPORT(read_virt) vmcall_i32 vmcall_read_virt(vmcall_u64 va, void *buf, vmcall_u32 len);
VMCALL_WASM_IMPORT(write_virt) vmcall_i32 vmcall_write_virt(vmcall_u64 va, const void *buf, vmcall_u32 len);
/* Print len bytes of UTF-8 text as one line on the host's stderr, prefixed with the handler's
 * name and the vCPU. Lines are cut at about 1 KiB; past 50 lines a second they are dropped
 * (and counted). */
VMCALL_WASM_IMPORT(log) void vmcall_log(const char *text, vmcall_u32 len);
/* The host's wall-clock time in nanoseconds since the Unix epoch. */
VMCALL_WASM_IMPORT(now_ns) vmcall_i64 vmcall_now_ns(void);

/* The handler: VMCALL_HANDLER { return a0 + 1; } defines and exports
 * vmcall_handle(nr, a0, a1, a2, a3, vcpu). Outside 64-bit mode the guest's registers were
 * truncated to 32 bits before the call, and the result will be. */
#define VMCALL_HANDLER                                                                   \
    __attribute__((export_name("vmcall_handle"))) vmcall_i64 vmcall_handle(            \
        vmcall_i64 nr, vmcall_i64 a0, vmcall_i64 a1, vmcall_i64 a2, vmcall_i64 a3,      \
        vmcall_i32 vcpu)

/* Conveniences built on the imports. */
static inline vmcall_size vmcall_strlen(const char *s) {
    vmcall_size n = 0;
    while (s[n])
        n++;
    return n;
}

/* Log a NUL-terminated string. */
static inline void vmcall_log_str(const char *s) {
    vmcall_log(s, (vmcall_u32)vmcall_strlen(s));
}

/* Read a little-endian u64 at guest-physical gpa into *out: 0 or -KVM_EFAULT. */
static inline vmcall_i32 vmcall_read_phys_u64(vmcall_u64 gpa, vmcall_u64 *out) {
    return vmcall_read_phys(gpa, out, sizeof *out);
}

/* Write v at guest-physical gpa: 0 or -KVM_EFAULT. */
static inline vmcall_i32 vmcall_write_phys_u64(vmcall_u64 gpa, vmcall_u64 v) {
    return vmcall_write_phys(gpa, &v, sizeof v);
}

/* The same through the caller's page tables. */
static inline vmcall_i32 vmcall_read_virt_u64(vmcall_u64 va, vmcall_u64 *out) {
    return vmcall_read_virt(va, out, sizeof *out);
}

static inline vmcall_i32 vmcall_write_virt_u64(vmcall_u64 va, vmcall_u64 v) {
    return vmcall_write_virt(va, &v, sizeof v);
}

#endif /* VMCALL_WASM_H */
