"""Run a graphgen library in TVM's Relax VM and save the outputs; executed by the *guest* Python.

Runs under qemu (emulated aarch64 Python with a runtime-only TVM), and works the same on a
board. Needs only numpy and the TVM runtime; it does not import graphgen.

    python _guest_run.py model.so inputs.npz outputs.npz [REPEAT]

``inputs.npz`` holds one array per graph input plus ``__order__`` (the input names in
argument order). Prints one line ``GRAPHGEN_RESULT {json}`` with timings and versions.
"""

import json
import os
import platform
import sys
import time

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402


def _flatten(value):
    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    out = []
    for v in value:
        out.extend(_flatten(v))
    return out


def main(argv):
    lib_path, in_path, out_path = argv[1:4]
    repeat = int(argv[4]) if len(argv) > 4 else 2
    t0 = time.perf_counter()
    lib = tvm.runtime.load_module(lib_path)
    vm = VirtualMachine(lib, tvm.cpu())
    load_s = time.perf_counter() - t0
    data = np.load(in_path, allow_pickle=False)
    names = [str(n) for n in data["__order__"]]
    args = [tvm.runtime.tensor(np.ascontiguousarray(data[n])) for n in names]
    times = []
    out = None
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = vm["main"](*args)
        times.append(time.perf_counter() - t)
    outs = [o.numpy() for o in _flatten(out)]
    np.savez(out_path, *outs)
    result = {"machine": platform.machine(), "python": platform.python_version(), "tvm": tvm.__version__,
              "numpy": np.__version__, "load_s": round(load_s, 3), "first_run_ms": round(times[0] * 1e3, 2),
              "run_ms": round(min(times[1:] or times) * 1e3, 2), "outputs": len(outs)}
    print("GRAPHGEN_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
