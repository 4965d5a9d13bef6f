"""Software prefetch of the weights a CPU kernel streams, a few KB ahead of its reduction loop.

Inside a model, a kernel's weights have left the caches by the time the next inference reaches
it (the other layers' weights and activations went through them in between), so every
inference reads them from L3 or memory. graphgen's GEMM-like kernels read their repacked
weights front to back, a few bytes per step of the reduction (8 broadcast floats per 24 FMAs
in a pointwise tile), which the hardware prefetchers follow badly: measured (Xeon, AVX-512,
one thread), MobileNetV2's 160 -> 960 1x1 conv at 7x7 took 76 us alone but 189 in the model
(onnxruntime 110), and 199 us in a chain of such convs after a 64 MB flush (onnxruntime 139).

This pass, run on each kernel just before the host finalization (with
:mod:`graphgen.tune.stack_tiles`), adds to every innermost serial loop that reads a weight
buffer of at least :data:`MIN_WEIGHT_BYTES` an ``llvm.prefetch`` of the bytes
:data:`AHEAD_BYTES` past the loop's first weight read, one per 64-byte line the loop body
reads per iteration. That chain: 199 -> 116 us a conv. Whole models, one thread, one process
interleaved, x onnxruntime (untuned): MobileNetV2 1.151 -> 1.034, ShuffleNetV2 0.806 -> 0.772,
SqueezeNet 1.029 -> 0.986, ResNet-18 0.930 -> 0.865 (its Winograd and direct conv weights too).
Distances measured (MobileNetV2, ResNet-18): 1 KB 1.067, 0.884; 2 KB 1.055, 0.862; 4 KB 1.048,
0.852; 8 KB 1.037, 0.844 and again 1.034, 0.829; 16 KB 1.047, 0.835; 32 KB 1.075, 0.874.

Weights are the buffers graphgen's kernels get as constants (``param_*``: Relax constants
passed to a kernel, repacked or not); activations are left to the hardware. x86 only: the
distance is measured there (ARM boards: not measured, so not changed). The address is not
clamped to the buffer: a prefetch never faults, and nothing is read from it.
``GRAPHGEN_PREFETCH=0`` builds without it (to compare).
"""

from __future__ import annotations

import os

import tvm

from graphgen.tune.stack_tiles import _const_bytes

#: how far ahead of the loop's first weight read the prefetch reaches (bytes)
AHEAD_BYTES = 8192
#: weight buffers smaller than this are left alone (they stay in the caches between runs)
MIN_WEIGHT_BYTES = 64 * 1024
#: a cache line
LINE_BYTES = 64
#: the buffer names of a kernel's constant arguments (Relax constants passed to ``call_te``)
WEIGHT_PREFIX = "param"

# expression fields the search for loads descends into (TVM 0.27 has no Python TIR visitor)
_FIELDS = ("value", "a", "b", "args", "indices", "condition", "true_value", "false_value", "base", "seq")


def enabled() -> bool:
    """Whether x86 builds prefetch their weights (``GRAPHGEN_PREFETCH=0``: no)."""
    return os.environ.get("GRAPHGEN_PREFETCH", "1") != "0"


def _dtype(expr) -> str:
    # TVM 0.27: an expression's dtype is its PrimType's
    return str(expr.ty.dtype)


def _is_load(node) -> bool:
    # tirx.BufferLoad builds a TensorLoad in TVM 0.27
    return type(node).__name__ in ("BufferLoad", "TensorLoad")


def _element_bytes(buffer) -> int:
    return tvm.DataType(str(buffer.dtype)).bits // 8


def _weight_loads(node, out: list) -> list:
    """The loads of large weight buffers in ``node``, in visiting order."""
    if node is None:
        return out
    if _is_load(node):
        nbytes = _const_bytes(node.source)
        if str(node.source.name).startswith(WEIGHT_PREFIX) and nbytes is not None and nbytes >= MIN_WEIGHT_BYTES:
            out.append(node)
    for field in _FIELDS:
        try:
            value = getattr(node, field)
        except AttributeError:
            continue
        if isinstance(value, tvm.ir.Array) or isinstance(value, (list, tuple)):
            for item in value:
                _weight_loads(item, out)
        elif isinstance(value, (tvm.tirx.Stmt, tvm.ir.Expr)):
            _weight_loads(value, out)
    return out


def _flat_index(load):
    """The element a load starts at (a vector load's first lane), or None for a gather."""
    if len(load.indices) != 1:
        return None
    index = load.indices[0]
    if isinstance(index, tvm.tirx.Ramp):
        index = index.base
    return None if "Ramp" in index.script() else index


def _prefetches(body):
    """``body`` (an innermost loop's) with the prefetches before its first weight read, or None."""
    stmts = list(body.seq) if isinstance(body, tvm.tirx.SeqStmt) else [body]
    for i, stmt in enumerate(stmts):
        if isinstance(stmt, tvm.tirx.Bind):
            continue  # the values the loads' indices use are bound first
        loads = [ld for ld in _weight_loads(stmt, []) if _flat_index(ld) is not None]
        if not loads:
            continue
        first = loads[0]
        # the bytes one iteration reads: every distinct weight read of the body, each its lanes
        reads = {}
        for ld in _weight_loads(body, []):
            if _flat_index(ld) is not None:
                lanes = ld.indices[0].lanes if isinstance(ld.indices[0], tvm.tirx.Ramp) else 1
                reads[(str(ld.source.name), ld.indices[0].script())] = int(lanes) * _element_bytes(ld.source)
        lines = max(1, -(-sum(reads.values()) // LINE_BYTES))
        base = _flat_index(first)
        elem = _element_bytes(first.source)
        index_type = _dtype(base)
        pf = []
        for line in range(lines):
            # not clamped to the buffer: a prefetch never faults, and the min() per iteration
            # cost ResNet-18 most of its gain (x onnxruntime 0.834 unclamped, 0.899 clamped)
            ahead = base + tvm.tirx.const((AHEAD_BYTES + line * LINE_BYTES) // elem, index_type)
            address = tvm.tirx.call_intrin("handle", "tirx.address_of", tvm.tirx.BufferLoad(first.source, [ahead]))
            # llvm.prefetch(address, rw = read, locality = 3 (keep in all levels), cache = data)
            pf.append(tvm.tirx.Evaluate(tvm.tirx.call_llvm_intrin(
                "void", "llvm.prefetch.p0", address, tvm.tirx.const(0, "int32"), tvm.tirx.const(3, "int32"),
                tvm.tirx.const(1, "int32"))))
        return tvm.tirx.SeqStmt(stmts[:i] + pf + stmts[i:])
    return None


def _has_loop(stmt) -> bool:
    if isinstance(stmt, tvm.tirx.For):
        return True
    if isinstance(stmt, tvm.tirx.SeqStmt):
        return any(_has_loop(s) for s in stmt.seq)
    if isinstance(stmt, tvm.tirx.IfThenElse):
        return _has_loop(stmt.then_case) or (stmt.else_case is not None and _has_loop(stmt.else_case))
    body = getattr(stmt, "body", None)
    return body is not None and _has_loop(body)


def _rewrite(stmt, counted: list):
    """``stmt`` with its innermost serial weight-reading loops prefetching (the same object where
    nothing under it changed)."""
    from tvm import tirx

    if isinstance(stmt, tirx.For):
        if stmt.kind == tirx.ForKind.SERIAL and not _has_loop(stmt.body):
            body = _prefetches(stmt.body)
            if body is not None:
                counted.append(1)
        else:
            body = _rewrite(stmt.body, counted)
        if body is None or body.same_as(stmt.body):
            return stmt
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                        stmt.annotations, getattr(stmt, "step", None))
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_rewrite(s, counted) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.IfThenElse):
        then_case = _rewrite(stmt.then_case, counted)
        else_case = _rewrite(stmt.else_case, counted) if stmt.else_case is not None else None
        if then_case.same_as(stmt.then_case) and (else_case is None or else_case.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then_case, else_case)
    if isinstance(stmt, tirx.AttrStmt):
        body = _rewrite(stmt.body, counted)
        return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
    if isinstance(stmt, tirx.While):
        body = _rewrite(stmt.body, counted)
        return stmt if body.same_as(stmt.body) else tirx.While(stmt.condition, body)
    return stmt


def applies_to(target) -> bool:
    """Whether kernels built for ``target`` (a ``tvm.target.Target``) get the prefetches: x86
    CPUs (an llvm target with no triple is this host)."""
    if target is None or target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "")) if target.attrs else ""
    return triple == "" or triple.startswith(("x86_64", "i686", "i386"))


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="graphgen.PrefetchWeights")
def PrefetchWeights(func, _mod, _ctx):  # noqa: N802 - a pass, named as TVM's are
    """Prefetch the large weights each innermost loop streams (see the module); x86 only."""
    if not applies_to(func.attrs.get("target") if func.attrs else None):
        return func
    counted: list = []
    body = _rewrite(func.body, counted)
    if not counted:
        return func
    return func.with_body(body).with_attr("graphgen_weight_prefetches", len(counted))
