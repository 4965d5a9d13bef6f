"""Minimal Python loader for a graphgen build on a board (runtime-only TVM; no graphgen, no onnx).

    python run_model.py BUILD_FOLDER [input.npy]

BUILD_FOLDER is what `graphgen build` wrote (model.so + manifest.json). Without input.npy the
input is seeded standard normal of the manifest's input shape. Prints the output shape, the
top-5 classes and the time of one inference. Install on the board: see docs/deploy.md.
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # a runtime-only TVM (no libtvm_compiler.so)

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402


def thread_count_note(manifest: dict) -> str | None:
    """A line saying so when TVM's runtime runs another thread count than the library's kernels
    were scheduled (and tuned) for: it still computes the same outputs, only slower."""
    import tvm_ffi

    schedules = manifest.get("build", {}).get("schedules") or {}
    built = manifest.get("target", {}).get("threads") or schedules.get("threads")
    running = tvm_ffi.get_global_func("runtime.NumThreads")()
    if not built or running == built:
        return None
    plural = lambda n: f"{n} thread{'' if n == 1 else 's'}"  # noqa: E731
    return (f"note: {manifest['model']['name']} was built for {plural(built)}, TVM runs {plural(running)} here; "
            f"set TVM_NUM_THREADS={built} (or build with --threads {running}) for the speed it was tuned for")


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    folder = Path(argv[1])
    manifest = json.loads((folder / "manifest.json").read_text())
    spec = manifest["io"]["inputs"][0]
    if len(argv) == 3:
        x = np.load(argv[2]).astype(spec["dtype"])
    else:
        x = np.random.default_rng(0).standard_normal(spec["shape"]).astype(spec["dtype"])

    lib = tvm.runtime.load_module(str(folder / "model.so"))
    vm = VirtualMachine(lib, tvm.cpu())
    note = thread_count_note(manifest)
    if note:
        print(note, file=sys.stderr)
    inp = tvm.runtime.tensor(x)
    vm["main"](inp)  # first call allocates the VM's memory pool
    t = time.perf_counter()
    out = vm["main"](inp)
    ms = (time.perf_counter() - t) * 1e3
    y = (out if isinstance(out, tvm.runtime.Tensor) else out[0]).numpy()

    print(f"{manifest['model']['name']} on {manifest['target']['name']}: output {list(y.shape)}, {ms:.1f} ms")
    flat = y.reshape(-1)
    top = np.argsort(-flat)[:5]
    print("top-5:", ", ".join(f"{i} ({flat[i]:.4f})" for i in top))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
