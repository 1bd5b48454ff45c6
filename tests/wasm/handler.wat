;; The test handler for hypercall 20 (guests/src/bin/wasm.rs), as WebAssembly text: vmcall
;; loads .wat directly, so the suite needs no wasm toolchain. tests/wasm/handler.c is the same
;; handler in C. Operation in a0:
;;   0: count calls of this operation (state in the instance) and answer the count
;;   1: sum a2 (at most 4096) bytes at guest-physical a1     2: the same at guest-virtual a1
;;   3: write "wasm says hi" (at most a2 bytes) at guest-virtual a1, answer the bytes written
;;   4: trap    5: loop forever    6: grow memory past the cap    other: -1000 (-KVM_ENOSYS)
;; A host API error (-14) is answered as it is.
(module
  (import "vmcall" "read_phys" (func $read_phys (param i64 i32 i32) (result i32)))
  (import "vmcall" "read_virt" (func $read_virt (param i64 i32 i32) (result i32)))
  (import "vmcall" "write_virt" (func $write_virt (param i64 i32 i32) (result i32)))
  (import "vmcall" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "wasm says hi")
  (data (i32.const 32) "handler.wat: first call")
  (global $count (mut i64) (i64.const 0))

  ;; The sum of len bytes at 1024.
  (func $sum (param $len i32) (result i64)
    (local $i i32) (local $s i64)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $s (i64.add (local.get $s) (i64.load8_u offset=1024 (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $s))

  (func $min (param $a i64) (param $max i64) (result i32)
    (i32.wrap_i64 (select (local.get $a) (local.get $max) (i64.lt_u (local.get $a) (local.get $max)))))

  (func (export "vmcall_handle")
        (param $nr i64) (param $op i64) (param $a1 i64) (param $a2 i64) (param $a3 i64) (param $vcpu i32)
        (result i64)
    (local $r i32) (local $n i32)
    (block $unknown
      (block $grow (block $spin (block $trap (block $write (block $virt (block $phys (block $count
        (br_table $count $phys $virt $write $trap $spin $grow $unknown
          (i32.wrap_i64 (select (local.get $op) (i64.const 7) (i64.lt_u (local.get $op) (i64.const 7))))))
        ;; 0
        (if (i64.eqz (global.get $count)) (then (call $log (i32.const 32) (i32.const 23))))
        (global.set $count (i64.add (global.get $count) (i64.const 1)))
        (return (global.get $count)))
        ;; 1
        (local.set $n (call $min (local.get $a2) (i64.const 4096)))
        (local.set $r (call $read_phys (local.get $a1) (i32.const 1024) (local.get $n)))
        (if (local.get $r) (then (return (i64.extend_i32_s (local.get $r)))))
        (return (call $sum (local.get $n))))
        ;; 2
        (local.set $n (call $min (local.get $a2) (i64.const 4096)))
        (local.set $r (call $read_virt (local.get $a1) (i32.const 1024) (local.get $n)))
        (if (local.get $r) (then (return (i64.extend_i32_s (local.get $r)))))
        (return (call $sum (local.get $n))))
        ;; 3
        (local.set $n (call $min (local.get $a2) (i64.const 12)))
        (local.set $r (call $write_virt (local.get $a1) (i32.const 16) (local.get $n)))
        (if (local.get $r) (then (return (i64.extend_i32_s (local.get $r)))))
        (return (i64.extend_i32_u (local.get $n))))
        ;; 4
        unreachable)
        ;; 5
        (loop $forever (br $forever))
        unreachable)
      ;; 6: 1000 pages (62.5 MiB) is over the 16 MiB cap
      (return (i64.extend_i32_s (memory.grow (i32.const 1000)))))
    (i64.const -1000)))
