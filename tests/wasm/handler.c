/* The test handler for hypercall 20 (guests/src/bin/wasm.rs) in C: the same operations as
 * handler.wat. tests/wasm.rs builds it with
 *   clang --target=wasm32 -O2 -nostdlib -mbulk-memory -I sdk/wasm/include \
 *         -Wl,--no-entry -Wl,--export=vmcall_handle -o handler.wasm handler.c
 * Operation in a0: 0 count, 1 sum bytes at guest-physical a1 (a2 of them, at most 4096),
 * 2 the same at guest-virtual a1, 3 write "wasm says hi" at guest-virtual a1 (at most a2
 * bytes), 4 trap, 5 loop forever, 6 grow memory past the cap, other -KVM_ENOSYS. */
#include <vmcall_wasm.h>

static vmcall_i64 count;
static vmcall_u8 buf[4096];

static vmcall_i64 sum(vmcall_u32 n) {
    vmcall_i64 s = 0;
    for (vmcall_u32 i = 0; i < n; i++)
        s += buf[i];
    return s;
}

static vmcall_u32 min(vmcall_i64 a, vmcall_u32 max) {
    return (vmcall_u64)a < max ? (vmcall_u32)a : max;
}

VMCALL_HANDLER {
    (void)nr, (void)a3, (void)vcpu;
    vmcall_u32 n;
    vmcall_i32 r;
    switch (a0) {
    case 0:
        if (count == 0)
            vmcall_log_str("handler.c: first call");
        return ++count;
    case 1:
        n = min(a2, sizeof buf);
        r = vmcall_read_phys(a1, buf, n);
        return r ? r : sum(n);
    case 2:
        n = min(a2, sizeof buf);
        r = vmcall_read_virt(a1, buf, n);
        return r ? r : sum(n);
    case 3: {
        static const char hi[] = "wasm says hi";
        n = min(a2, sizeof hi - 1);
        r = vmcall_write_virt(a1, hi, n);
        return r ? r : n;
    }
    case 4:
        __builtin_trap();
    case 5:
        for (;;)
            __asm__ volatile("");
    case 6:
        /* 1000 pages of 64 KiB is over the 16 MiB cap. */
        return __builtin_wasm_memory_grow(0, 1000);
    default:
        return -KVM_ENOSYS;
    }
}
