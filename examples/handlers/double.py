#!/usr/bin/env python3
# An exec: handler: answers each hypercall with twice its first argument.
#   vmcall run GUEST --hypercall 20=exec:"python3 examples/handlers/double.py"
import json, sys

for line in sys.stdin:                       # one call per line
    call = json.loads(line)                  # {"nr":20,"args":[a0,a1,a2,a3],"vcpu":0,"mode":"64-bit"}
    answer = call["args"][0] * 2 % 2**64     # a u64, or a negative number for an error
    print(json.dumps({"ret": answer}), flush=True)   # one answer per line, flushed
