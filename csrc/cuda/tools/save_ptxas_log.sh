#!/bin/sh
# Compiler launcher for the CUDA kernels: runs the compile command unchanged, prints its output as
# usual (ptxas -v: registers and shared memory per kernel) and also keeps it in <object>.ptxas.log,
# where the occupancy check reads the register counts (this toolkit need not ship cuobjdump).
obj=""
prev=""
for arg in "$@"; do
  if [ "$prev" = "-o" ]; then obj="$arg"; fi
  prev="$arg"
done
if [ -z "$obj" ]; then exec "$@"; fi
log="$obj.ptxas.log"
"$@" > "$log" 2>&1
status=$?
cat "$log" >&2
exit $status
