;; Version 2 of hypercall 20, as a WebAssembly handler (docs/wasm.md): answers a0 * 3 and counts
;; its calls in the instance, which lives as long as the handler is installed.
;;   vmcall ctl SOCKET set 20=wasm:examples/handlers/v2.wat
(module
  (global $calls (mut i64) (i64.const 0))
  (func (export "vmcall_handle")
    (param $nr i64) (param $a0 i64) (param $a1 i64) (param $a2 i64) (param $a3 i64)
    (param $vcpu i32) (result i64)
    (global.set $calls (i64.add (global.get $calls) (i64.const 1)))
    (i64.mul (local.get $a0) (i64.const 3))))
