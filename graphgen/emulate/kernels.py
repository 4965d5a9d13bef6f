"""Kernel-level check of a library without a TVM runtime for its architecture (armv7 under qemu-arm).

PyPI has no armv7 TVM runtime, so the Relax VM (the part of ``model.so`` that sequences the
kernels) cannot run under emulation. What *can* run are the compiled kernels themselves:

1. **Trace on the host.** The same ``model.onnx`` is compiled for this x86 host (same Relax
   pipeline, so the same kernels by name) and run in TVM's VM with an instrument hook that
   records every kernel call: which kernel, each tensor argument's address, shape and dtype, and
   its bytes before and after the call.
2. **Kernel by kernel** (``kernels``): every call is replayed by the armv7 kernel driver on
   the host's inputs of that call, and each output is compared with the host's output of the
   same call (relative L2 within the tolerance).
3. **Chained** (``chained``): all calls are replayed again in the VM's order on the driver's
   own memory (laid out like the host's storage, so buffer reuse is reproduced), feeding each
   kernel the armv7 results of the kernels before it; only the model input and the weights come
   from the host. The final outputs are compared with onnxruntime.

What this does not run is the armv7 Relax VM bytecode and TVM runtime; the manifest says so.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphgen.emulate.elfsyms import dynamic_symbols, kernel_names, unsupported_hooks
from graphgen.emulate.env import Component, EmulationError, _last_line

_DL_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}  # DLPack type codes (kDLInt, kDLUInt, kDLFloat, kDLBool)
DEFAULT_TIMEOUT = 900


class KernelCheckUnavailable(Exception):
    """The library cannot be checked kernel by kernel (reason in the message)."""


@dataclass
class TensorArg:
    addr: int
    nbytes: int
    shape: tuple
    dtype: str


@dataclass
class KernelCall:
    name: str
    args: list  # TensorArg | int | float
    pre: list = field(default_factory=list)  # uint8 arrays (None for scalars)
    post: list = field(default_factory=list)

    def outputs(self) -> list[int]:
        """Indices of the tensor arguments the kernel wrote (changed bytes, and the last tensor by convention)."""
        if "_outputs" not in self.__dict__:
            self.__dict__["_outputs"] = self._find_outputs()
        return self.__dict__["_outputs"]

    def _find_outputs(self) -> list[int]:
        tens = [i for i, a in enumerate(self.args) if isinstance(a, TensorArg)]
        out = [i for i in tens if not np.array_equal(self.pre[i], self.post[i])]
        if tens and tens[-1] not in out:
            out.append(tens[-1])
        return sorted(out)


@dataclass
class Trace:
    calls: list
    other_calls: list  # names of non-kernel VM calls (builtins)
    outputs: list  # TensorArg of the VM's return values
    host_outputs: list
    input_ranges: list = field(default_factory=list)  # [start, end) of the model inputs in host memory

    def constants(self) -> list[np.ndarray]:
        """Bytes of the tensors no kernel writes and that are not model inputs: the weights in the VM's constant pool."""
        written = [(a.addr, a.addr + a.nbytes) for c in self.calls for k in c.outputs()
                   for a in [c.args[k]]]
        skip = written + list(self.input_ranges)
        seen, out = set(), []
        for c in self.calls:
            for a, pre in zip(c.args, c.pre):
                if not isinstance(a, TensorArg) or (a.addr, a.nbytes) in seen:
                    continue
                seen.add((a.addr, a.nbytes))
                if not any(lo < a.addr + a.nbytes and a.addr < hi for lo, hi in skip):
                    out.append(pre)
        return out


def _tensor_arg(t) -> tuple[TensorArg, np.ndarray]:
    arr = np.from_dlpack(t)
    if not arr.flags.c_contiguous:
        raise KernelCheckUnavailable("a kernel argument is not contiguous")
    return TensorArg(arr.ctypes.data, arr.nbytes, tuple(arr.shape), arr.dtype.str), arr


def trace_host(model, inputs: dict, host_kernels: set[str] | None = None, log=None, like=None,
               schedules: dict | None = None) -> Trace:
    """Compile ``model`` for this host and record every kernel call of one VM run.

    ``like`` is the checked library's target and ``schedules`` its build's ``schedules``
    facts (manifest ``build.schedules``): the host library is scheduled as that build was
    (same pipeline, same tuning database, default schedules sized for that target's ISA), so
    repacked weights and every kernel's arguments have the same shapes in both libraries.
    """
    import tvm
    from tvm import relax

    from graphgen.compile import compile_model, resolve_target
    from graphgen.compile.tvm_build import _flatten
    from graphgen.verify import graph_inputs

    with tempfile.TemporaryDirectory(prefix="graphgen-trace-") as tmp:
        lib_path = Path(tmp) / "host.so"
        compile_model(model, resolve_target("x86"), lib_path, **_schedule_as(like, schedules))
        kernels = set(kernel_names(dynamic_symbols(lib_path)))
        lib = tvm.runtime.load_module(str(lib_path))
        vm = relax.VirtualMachine(lib, tvm.cpu())
        calls: list[KernelCall] = []
        others: list[str] = []
        problems: list[str] = []

        def instrument(func, name, before_run, ret_value, *args):
            name = str(name)
            if name not in kernels:
                if before_run:
                    others.append(name)
                return 0
            try:
                if before_run:
                    call = KernelCall(name, [])
                    for a in args:
                        if isinstance(a, tvm.runtime.Tensor):
                            targ, arr = _tensor_arg(a)
                            call.args.append(targ)
                            call.pre.append(arr.reshape(-1).view(np.uint8).copy())
                        elif isinstance(a, (bool, int, np.integer)):
                            call.args.append(int(a))
                            call.pre.append(None)
                        elif isinstance(a, (float, np.floating)):
                            call.args.append(float(a))
                            call.pre.append(None)
                        else:
                            raise KernelCheckUnavailable(f"kernel {name} takes a {type(a).__name__} argument")
                    calls.append(call)
                else:
                    call = calls[-1]
                    for a in args:
                        if isinstance(a, tvm.runtime.Tensor):
                            call.post.append(np.from_dlpack(a).reshape(-1).view(np.uint8).copy())
                        else:
                            call.post.append(None)
            except KernelCheckUnavailable as e:
                problems.append(str(e))
            return 0

        vm.set_instrument(instrument)
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[v.name])) for v in graph_inputs(model)]
        input_ranges = [(t.addr, t.addr + t.nbytes) for t in (_tensor_arg(a)[0] for a in args)]
        out = _flatten(vm["main"](*args))
        if problems:
            raise KernelCheckUnavailable(problems[0])
        outputs = [_tensor_arg(o)[0] for o in out]
        host_outputs = [o.numpy() for o in out]
    return Trace(calls, others, outputs, host_outputs, input_ranges)


def _schedule_as(like, schedules: dict | None) -> dict:
    """compile_model arguments that reproduce the kernels of a build of ``like`` (see trace_host)."""
    if like is None:
        return {}
    schedules = schedules or {}
    if schedules.get("pipeline") == "tvm-default":
        return {"default_schedules": False}
    db = schedules.get("database")
    # manifests from before graphgen's Winograd and pointwise kernels have no entry for them
    return {"schedule_like": like, "default_schedules": schedules.get("default_schedules", True),
            "database": db if db and Path(db).is_dir() else None, "winograd": schedules.get("winograd", "off"),
            "pointwise": schedules.get("pointwise", "winograd" in schedules),
            "concat_in_place": schedules.get("concat_in_place", False)}


class _Memory:
    """Host address ranges -> driver regions (merged overlapping ranges, 64-byte aligned starts)."""

    def __init__(self, ranges: list[tuple[int, int]]):
        merged: list[list[int]] = []
        for start, end in sorted(ranges):
            start -= start % 64  # keep every tensor's alignment modulo 64 in the driver's copy
            if merged and start < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.regions = merged
        self._starts = [r[0] for r in merged]

    def locate(self, addr: int, nbytes: int) -> tuple[int, int]:
        import bisect

        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr + nbytes > self.regions[i][1]:
            raise KernelCheckUnavailable("a model output does not lie in memory the kernels wrote")
        return i, addr - self.regions[i][0]

    def size(self, r: int) -> int:
        return self.regions[r][1] - self.regions[r][0]


class _Stream:
    """Writes the kernel driver's command stream (see :mod:`graphgen.emulate._kernel_driver`)."""

    def __init__(self, nregions: int):
        self.buf = bytearray(b"GGK1" + struct.pack("<I", nregions))
        self.dumps: list[int] = []

    def alloc(self, r: int, size: int) -> None:
        self.buf += b"A" + struct.pack("<IQ", r, size)

    def write(self, r: int, off: int, data: np.ndarray) -> None:
        self.buf += b"W" + struct.pack("<IQQ", r, off, data.nbytes) + data.tobytes()

    def dump(self, r: int, off: int, n: int) -> int:
        self.buf += b"D" + struct.pack("<IQQ", r, off, n)
        self.dumps.append(n)
        return len(self.dumps) - 1

    def call(self, name: str, args: list, where: list) -> None:
        enc = name.encode()
        self.buf += b"C" + struct.pack("<H", len(enc)) + enc + struct.pack("<H", len(args))
        for a, loc in zip(args, where):
            if isinstance(a, TensorArg):
                dt = np.dtype(a.dtype)
                if dt.kind not in _DL_CODES:
                    raise KernelCheckUnavailable(f"kernel {name} takes a {dt} tensor")
                code = _DL_CODES[dt.kind]
                self.buf += struct.pack("<BIQB", 0, loc[0], loc[1], len(a.shape))
                self.buf += struct.pack(f"<{len(a.shape)}q", *a.shape)
                self.buf += struct.pack("<BBH", code, dt.itemsize * 8, 1)
            elif isinstance(a, float):
                self.buf += struct.pack("<Bd", 2, a)
            else:
                self.buf += struct.pack("<Bq", 1, int(a))

    def end(self) -> bytes:
        self.buf += b"E"
        return bytes(self.buf)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True in a boolean vector."""
    if not mask.any():
        return []
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def build_stream(trace: Trace) -> tuple[bytes, dict]:
    """Command stream for both passes; returns (stream, where each expected result is in the output)."""
    ranges = [(a.addr, a.addr + a.nbytes) for c in trace.calls for a in c.args if isinstance(a, TensorArg)]
    mem = _Memory(ranges)
    nreg = len(mem.regions)
    s = _Stream(2 * nreg)
    layout = {"per_call": [], "chained": [], "external_bytes": 0}

    # pass 1: each kernel on the host's inputs of that call
    shadow = [np.zeros(mem.size(r), np.uint8) for r in range(nreg)]
    valid = [np.zeros(mem.size(r), bool) for r in range(nreg)]
    for r in range(nreg):
        s.alloc(r, mem.size(r))
    for i, c in enumerate(trace.calls):
        where = [mem.locate(a.addr, a.nbytes) if isinstance(a, TensorArg) else None for a in c.args]
        for k, a in enumerate(c.args):
            if not isinstance(a, TensorArg):
                continue
            r, off = where[k]
            seg = slice(off, off + a.nbytes)
            if not valid[r][seg].all() or not np.array_equal(shadow[r][seg], c.pre[k]):
                s.write(r, off, c.pre[k])
                shadow[r][seg] = c.pre[k]
                valid[r][seg] = True
        s.call(c.name, c.args, where)
        outs = []
        for k in c.outputs():
            r, off = where[k]
            outs.append((k, s.dump(r, off, c.args[k].nbytes)))
            valid[r][off:off + c.args[k].nbytes] = False  # now holds the armv7 result, not the host's
        layout["per_call"].append(outs)

    # pass 2: all kernels chained on the driver's own results
    ref = [np.zeros(mem.size(r), np.uint8) for r in range(nreg)]
    known = [np.zeros(mem.size(r), bool) for r in range(nreg)]
    produced = [np.zeros(mem.size(r), bool) for r in range(nreg)]
    for r in range(nreg):
        s.alloc(nreg + r, mem.size(r))
    for c in trace.calls:
        where = [mem.locate(a.addr, a.nbytes) if isinstance(a, TensorArg) else None for a in c.args]
        for k, a in enumerate(c.args):
            if not isinstance(a, TensorArg):
                continue
            r, off = where[k]
            seg = slice(off, off + a.nbytes)
            need = ~known[r][seg] | (ref[r][seg] != c.pre[k])
            # bytes a kernel produced but something else (a VM builtin) changed before this call
            layout["external_bytes"] += int((need & produced[r][seg]).sum())
            for lo, hi in _runs(need):
                s.write(nreg + r, off + lo, c.pre[k][lo:hi])
            ref[r][seg] = c.pre[k]
            known[r][seg] = True
            produced[r][seg] &= ~need
        s.call(c.name, c.args, [(nreg + w[0], w[1]) if w else None for w in where])
        for k in c.outputs():
            r, off = where[k]
            seg = slice(off, off + c.args[k].nbytes)
            ref[r][seg] = c.post[k]
            known[r][seg] = True
            produced[r][seg] = True
    for o in trace.outputs:
        r, off = mem.locate(o.addr, o.nbytes)
        if not produced[r][off:off + o.nbytes].all():
            raise KernelCheckUnavailable("a model output is not written by a kernel (a VM builtin makes it)")
        layout["chained"].append(s.dump(nreg + r, off, o.nbytes))
    layout["bytes"] = len(s.buf)
    layout["regions"] = nreg
    return s.end(), layout


def run_driver(comp: Component, lib_path: Path, stream: bytes, timeout: float = DEFAULT_TIMEOUT) -> tuple[bytes, str]:
    with tempfile.TemporaryDirectory(prefix="graphgen-kern-") as tmp:
        cmd_path, out_path = Path(tmp) / "commands.bin", Path(tmp) / "out.bin"
        cmd_path.write_bytes(stream)
        cmd = [str(comp.qemu), "-L", str(comp.sysroot), str(comp.driver), str(Path(lib_path).resolve()),
               str(cmd_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise EmulationError(f"the armv7 kernel run did not finish within {timeout:.0f} s") from e
        if proc.returncode != 0:
            err = proc.stderr or proc.stdout
            at = err.find("graphgen-kernel-driver:")
            # the driver's message (a kernel's error text may span lines) as one line
            reason = " ".join(err[at:].split())[:400] if at >= 0 else _last_line(err)
            raise EmulationError(f"the armv7 kernel run failed (exit code {proc.returncode}): {reason}")
        return out_path.read_bytes(), proc.stdout.strip()


def split_dumps(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for n in sizes:
        out.append(data[pos:pos + n])
        pos += n
    if pos != len(data):
        raise EmulationError(f"the kernel driver wrote {len(data)} bytes, expected {pos}")
    return out


def weights_in_library(trace: Trace, lib_path: Path) -> tuple[int, int]:
    """(found, total): the constant tensors the kernels read, searched byte-for-byte in the library file.

    The kernel driver feeds the kernels the host's weights (from model.onnx); this checks that the
    library carries the same ones in its VM constant pool.
    """
    blob = Path(lib_path).read_bytes()
    consts = [c for c in trace.constants() if c.nbytes >= 16]  # tiny ones would match anywhere
    found = sum(1 for c in consts if blob.find(c.tobytes()) >= 0)
    return found, len(consts)


def check_library_symbols(lib_path: Path) -> tuple[list[str], list[str]]:
    """(kernel names, runtime hooks the driver lacks) of an ARM library."""
    syms = dynamic_symbols(lib_path)
    return kernel_names(syms), unsupported_hooks(syms)
