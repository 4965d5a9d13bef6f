"""Small buffers of CPU kernels kept on the stack instead of TVM's workspace allocator.

TVM's ``LowerTVMBuiltin`` leaves a CPU buffer on the stack only when its scope is "global" and
it is *under* ``kMaxStackAlloca`` (1024 bytes); every other buffer becomes a
``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` pair around its scope, and LLVM
cannot keep a value that lives in such memory in a register (the pointer comes from a call).
Two kinds of graphgen's kernels paid for it on every iteration of their parallel loops:

- Register tiles of 1 KB and more. The GEMM-like kernels accumulate each tile in a small
  "global" buffer allocated inside the parallel loop (``defaults._register_tiled_gemm``), so
  with AVX-512 every tile of 16 or more 16-lane accumulators (2 vectors x 8 channels, 1 x 16,
  2 x 12, ...: most of the default tiles there) cost two allocator calls per tile. Measured
  (Zen 4, AVX-512, one thread, the kernel alone): SqueezeNet's 16 -> 64 1x1 conv at 55x55
  0.112 ms -> 0.080; 32 -> 192 at 28x28 0.114 -> 0.085 (short reductions suffer most: there a
  tile's two calls cost about as much as its FMAs).
- The hand-written TVMScript kernels (stride-2 max pools and depthwise convs): each value
  they name in a loop body (``x0 = ...``, ``a = x[...]``) is a 1-element "local" buffer, and
  TVM allocates "local" buffers from the pool whatever their size: 7 allocations per channel
  in the pool kernel, its row vectors kept in memory. Measured (same host): SqueezeNet's
  pools 64 x 111 x 111 0.099 ms -> 0.069, 128 x 55 x 55 0.121 -> 0.063, 256 x 27 x 27
  0.114 -> 0.041 (onnxruntime, NCHWc, in the model: 0.101, 0.035, 0.021).

In the model (one thread, interleaved with onnxruntime): SqueezeNet 5.78 -> 5.39 ms
(onnxruntime 6.91), MobileNetV2 8.15 -> 7.55 (7.57), ShuffleNetV2 3.96 -> 3.60 (4.66),
ResNet-18 unchanged (23.2; its Winograd GEMMs reduce over 64-512 channels).

This pass, run just before ``LowerTVMBuiltin``, marks such allocations with TVM's own
``disable_lower_builtin`` annotation, so they stay allocas (which TVM's LLVM codegen places in
the entry block of the function, or of the parallel loop's closure: one per thread, not one per
iteration; LLVM then keeps 1-element ones in registers). Only buffers of constant size up to
:data:`STACK_MAX_BYTES` are marked: "global" ones from 1 KB (register tiles) and "local" ones
of any size below it, never an activation. ``GRAPHGEN_STACK_TILES=0`` builds with TVM's own
pipeline (to compare).
"""

from __future__ import annotations

import os

import tvm

#: the largest buffer kept on the stack (a 24-accumulator AVX-512 tile is 1.5 KB; TVM's own
#: threshold stays for everything up to 1 KB)
STACK_MAX_BYTES = 4096
#: TVM's kMaxStackAlloca: smaller "global" buffers are left on the stack by TVM already
TVM_STACK_BYTES = 1024
#: TVM's kDisableLowerTVMBuiltin
ANNOTATION = "disable_lower_builtin"

#: the name under which :func:`register` makes the pipeline known to ``tvm.compile``
PIPELINE = "graphgen_cpu"


def _const_bytes(buffer) -> int | None:
    n = 1
    for extent in buffer.shape:
        if not isinstance(extent, tvm.tirx.IntImm):
            return None
        n *= int(extent)
    dtype = tvm.DataType(str(buffer.dtype))
    return n * dtype.bits * dtype.lanes // 8


def _marks(buffer) -> bool:
    scope = str(buffer.scope())
    nbytes = _const_bytes(buffer)
    if nbytes is None or nbytes > STACK_MAX_BYTES:
        return False
    if scope == "global":
        return nbytes >= TVM_STACK_BYTES  # smaller ones TVM leaves on the stack itself
    # the values a TVMScript kernel names in a loop body (``x0 = ...``) become 1-element "local"
    # buffers, which TVM sends to the workspace pool whatever their size
    return scope == "local"


def _rewrite(stmt):
    """``stmt`` with every allocation :func:`_marks` takes annotated (the same object where
    nothing under it changed)."""
    from tvm import tirx

    if isinstance(stmt, tirx.AllocBuffer):
        if not _marks(stmt.buffer) or bool(stmt.annotations.get(ANNOTATION, False)):
            return stmt
        # a boolean IntImm: LowerTVMBuiltin reads the annotation as one (a Python bool fails there)
        flag = tirx.IntImm("bool", 1)
        return tirx.AllocBuffer(stmt.buffer, annotations={**dict(stmt.annotations), ANNOTATION: flag})
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_rewrite(s) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.For):
        body = _rewrite(stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations)
    if isinstance(stmt, tirx.IfThenElse):
        then_case = _rewrite(stmt.then_case)
        else_case = _rewrite(stmt.else_case) if stmt.else_case is not None else None
        if then_case.same_as(stmt.then_case) and (else_case is None or else_case.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then_case, else_case)
    if isinstance(stmt, tirx.AttrStmt):
        body = _rewrite(stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
    if isinstance(stmt, tirx.While):
        body = _rewrite(stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.While(stmt.condition, body)
    return stmt


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="graphgen.StackTiles")
def StackTiles(func, _mod, _ctx):  # noqa: N802 - a pass, named as TVM's are
    """Annotate small constant-size buffers to stay on the stack (see the module)."""
    body = _rewrite(func.body)
    return func if body.same_as(func.body) else func.with_body(body)


def enabled() -> bool:
    """Whether CPU builds keep their small buffers on the stack (``GRAPHGEN_STACK_TILES=0``: no)."""
    return os.environ.get("GRAPHGEN_STACK_TILES", "1") != "0"


def register() -> str:
    """Register (once) the TIR pipeline graphgen's CPU builds compile with: TVM's default one,
    with :func:`StackTiles` (and :func:`graphgen.tune.prefetch_weights.PrefetchWeights`, where
    enabled) before the host finalization; returns its name for
    ``tvm.compile(..., tir_pipeline=)`` ("default", TVM's, where neither is enabled)."""
    from tvm.tirx import compilation_pipeline as cp

    from graphgen.tune import prefetch_weights

    passes = ([prefetch_weights.PrefetchWeights] if prefetch_weights.enabled() else []) + \
        ([StackTiles] if enabled() else [])
    if not passes:
        return "default"
    name = PIPELINE + ("" if prefetch_weights.enabled() else "_no_prefetch") + ("" if enabled() else "_no_stack")
    if name not in cp.PIPELINE_MAP:
        def factory(**kwargs):
            pipeline, finalize_host, finalize_device = cp.get_tir_pipeline("s_tir", **kwargs)

            def host_passes():
                return tvm.ir.transform.Sequential([*passes, finalize_host()])

            return pipeline, host_passes, finalize_device

        cp.register_tir_pipeline(name, factory)
    return name
