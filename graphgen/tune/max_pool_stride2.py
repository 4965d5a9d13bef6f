"""3x3 / stride-2 max pools (NCHW, fp32) as a hand-written kernel whose rows are vectorized.

A vector of outputs of a stride-2 window reads every other input of the row. TVM's vectorizer
assembles such a load lane by lane, and scalarizes the whole loop where the padding condition
depends on the lane, so graphgen's pool schedule ran these pools as unrolled scalar code (3.9x
faster than TVM's vectorized form for SqueezeNet's pool). Here each vector of ``LANES``
outputs loads its ``2 * LANES + 1`` input columns as two whole vectors and one element, and
takes the window's three columns apart with shuffles (even lanes, odd lanes, even lanes shifted
by one: ``tirx.Shuffle``, which LLVM turns into a few permutes). Outputs whose window reaches
into the padding (the first column with padding 1, the last ones with ``ceil_mode``) are
computed by scalar code with the bounds checked per tap; rows are checked once per row. The
last vector of a row is shifted left to end at the last interior output (it recomputes a few
outputs, identically), so every interior output is vectorized whatever the width.

Measured (AVX2, one thread, the pool alone; graphgen's schedule -> this kernel; onnxruntime):
ShuffleNetV2's 24 x 112 x 112, padding 1: 0.293 -> 0.104 ms (0.212); ResNet's 64 x 112 x 112,
padding 1: 0.766 -> 0.24 (0.48); SqueezeNet's 64 x 111 x 111, ceil mode: 0.29 -> 0.19-0.24
(0.47), 128 x 55 x 55: 0.161 -> 0.155, 256 x 27 x 27: 0.122 -> 0.09-0.14.

The kernel is complete as written (``tirx.is_scheduled``): no default schedule or tuning
applies to it, and it is not fused with its neighbours (TVM's pool is not either: the conv
before it takes its ReLU, and nothing elementwise follows a pool in these networks).
"""

from __future__ import annotations

import os

#: fp32 outputs per vector (two NEON registers, an AVX2 one, half an AVX-512 one)
LANES = 8

#: input rows taken rows-first (see max_pool_func): from ROW_MIN columns (measured, AVX-512, one
#: thread, the pool alone: 64 x 111 x 111 0.175 -> 0.132 ms, 64 x 112 x 112 0.197 -> 0.167,
#: 24 x 112 x 112 0.070 -> 0.061; 128 x 55 x 55 the same, 256 x 27 x 27 0.061 -> 0.070) to
#: ROW_MAX, whose buffer (fp32) stays under 1 KB, on the stack
ROW_MIN = 64
ROW_MAX = 240

#: the kernel's name in the library; apply_default_schedules counts it under this class
KIND = "pool (stride 2, shuffles)"

#: TVM's OpPatternKind kOpaque: FuseOps leaves the call alone
_OPAQUE = 8

#: both forms of the kernel: complete as written, opaque to FuseOps, counted under KIND
_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": _OPAQUE, "graphgen.kind": KIND}


def enabled() -> bool:
    """``GRAPHGEN_POOL_SHUFFLES=0`` keeps graphgen's pool schedule for these pools (to compare)."""
    return os.environ.get("GRAPHGEN_POOL_SHUFFLES", "1") != "0"


def _facts(call):
    """(input NCHW shape, output height and width, padding top and left) of a max pool this
    kernel takes, else None."""
    from tvm import relax

    attrs = call.attrs
    data = call.args[0]
    if str(attrs.layout) != "NCHW" or str(attrs.out_layout) != "NCHW":
        return None
    if [int(v) for v in attrs.pool_size] != [3, 3] or [int(v) for v in attrs.strides] != [2, 2] or \
            [int(v) for v in attrs.dilation] != [1, 1]:
        return None
    pads = [int(p) for p in attrs.padding]
    if len(pads) == 2:
        pads = pads * 2
    if len(pads) != 4 or not all(0 <= p <= 1 for p in pads):
        return None
    ty, out_ty = data.ty, call.ty
    for t in (ty, out_ty):
        if not isinstance(t, relax.type.TensorType) or str(t.dtype) != "float32" or t.shape is None:
            return None
    try:
        shape = tuple(int(x) for x in ty.shape)
        out_shape = tuple(int(x) for x in out_ty.shape)
    except TypeError:  # symbolic dimensions
        return None
    if len(shape) != 4 or len(out_shape) != 4:
        return None
    return shape, out_shape[2:], pads[0], pads[1]


def interior(w: int, out_w: int, pad_left: int) -> tuple[int, int]:
    """The first and last output columns of a 3-wide stride-2 window whose three input columns
    lie inside the row of ``w``."""
    return (pad_left + 1) // 2, min((w - 3 + pad_left) // 2, out_w - 1)


def row_geometry(w: int, out_w: int, pad_left: int, lanes: int):
    """How a row of ``out_w`` outputs splits: (first and last interior output, vectors of
    ``lanes`` interior outputs, then outputs ``[0, left_end)`` and ``[right_start, out_w)``,
    ``n_scalar`` of them, computed one at a time). With fewer interior outputs than a vector,
    every output is scalar."""
    lo, hi = interior(w, out_w, pad_left)
    blocks = -(-(hi - lo + 1) // lanes) if hi - lo + 1 >= lanes else 0
    left_end = lo if blocks else out_w
    right_start = hi + 1 if blocks else out_w
    return lo, hi, blocks, left_end, right_start, left_end + out_w - right_start


def window_shuffles(lanes: int) -> tuple[list, list, list]:
    """Shuffle indices taking a window's columns 0, 1 and 2 apart from ``2 * lanes + 1``
    consecutive inputs (two vectors and an element): even lanes, odd lanes, even lanes shifted by one."""
    return list(range(0, 2 * lanes, 2)), list(range(1, 2 * lanes, 2)), list(range(2, 2 * lanes + 1, 2))


def max_pool_func(shape, out_hw, pad_top: int, pad_left: int, parallel: bool = True):
    """The kernel (a ``tirx.PrimFunc``) for an NCHW ``shape`` pooled to ``out_hw``."""
    from tvm.script import tirx as T

    n_b, c_in, h, w = shape
    out_h, out_w = out_hw
    nc_total = n_b * c_in
    lanes = LANES
    pt, pl = pad_top, pad_left
    lo, hi, blocks, left_end, right_start, n_scalar = row_geometry(w, out_w, pl, lanes)
    even, odd, next_even = window_shuffles(lanes)
    lowest = T.float32(-3.4028234663852886e38)  # the padding: below every finite input
    par = T.parallel if parallel else T.serial

    # acc / scalar: global scope and under 1 KB, so on the stack (a "local" buffer would be a
    # workspace allocation per parallel iteration in TVM 0.27)
    @T.prim_func(private=True, s_tir=True)
    def max_pool2d_stride2(x: T.Buffer((n_b, c_in, h, w), "float32"),
                           y: T.Buffer((n_b, c_in, out_h, out_w), "float32")):
        T.func_attr(_ATTRS)
        acc = T.sblock_alloc_buffer((lanes,), "float32")
        scalar = T.sblock_alloc_buffer((1,), "float32")
        for nc in par(nc_total):
            for oy in range(out_h):
                for b in range(blocks):
                    x0 = T.min(lo + b * lanes, hi - (lanes - 1))
                    c0 = 2 * x0 - pl
                    acc[T.Ramp(0, 1, lanes)] = T.Broadcast(lowest, lanes)
                    for dy in T.unroll(3):
                        r = 2 * oy - pt + dy
                        if r >= 0 and r < h:
                            a = x[nc // c_in, nc % c_in, r, T.Ramp(c0, 1, lanes)]
                            b2 = x[nc // c_in, nc % c_in, r, T.Ramp(c0 + lanes, 1, lanes)]
                            e = T.Broadcast(x[nc // c_in, nc % c_in, r, c0 + 2 * lanes], lanes)
                            acc[T.Ramp(0, 1, lanes)] = T.max(acc[T.Ramp(0, 1, lanes)], T.max(
                                T.Shuffle([a, b2], even),
                                T.max(T.Shuffle([a, b2], odd), T.Shuffle([a, b2, e], next_even))))
                    y[nc // c_in, nc % c_in, oy, T.Ramp(x0, 1, lanes)] = acc[T.Ramp(0, 1, lanes)]
                for i in range(n_scalar):  # the outputs left and right of the interior ones
                    ox = T.if_then_else(i < left_end, i, right_start + i - left_end)
                    scalar[0] = lowest
                    for dy, dx in T.grid(3, 3):
                        if 2 * oy - pt + dy >= 0 and 2 * oy - pt + dy < h and 2 * ox - pl + dx >= 0 and \
                                2 * ox - pl + dx < w:
                            scalar[0] = T.max(scalar[0], x[nc // c_in, nc % c_in, 2 * oy - pt + dy, 2 * ox - pl + dx])
                    y[nc // c_in, nc % c_in, oy, ox] = scalar[0]

    # the window's rows first: their max per column into a row buffer (a vector load per tap, no
    # shuffles), then the columns' shuffles once per output row instead of once per window row.
    # Rows outside [ROW_MIN, ROW_MAX] read the window's three rows directly.
    if not max(ROW_MIN, lanes) <= w <= ROW_MAX:
        return max_pool2d_stride2
    row_vectors = -(-w // lanes)

    @T.prim_func(private=True, s_tir=True)
    def max_pool2d_stride2_rows(x: T.Buffer((n_b, c_in, h, w), "float32"),
                                y: T.Buffer((n_b, c_in, out_h, out_w), "float32")):
        T.func_attr(_ATTRS)
        acc = T.sblock_alloc_buffer((lanes,), "float32")
        scalar = T.sblock_alloc_buffer((1,), "float32")
        row = T.sblock_alloc_buffer((w,), "float32")
        for nc in par(nc_total):
            for oy in range(out_h):
                for v in range(row_vectors):
                    c = T.min(v * lanes, w - lanes)  # the last vector ends at the row's end
                    acc[T.Ramp(0, 1, lanes)] = T.Broadcast(lowest, lanes)
                    for dy in T.unroll(3):
                        r = 2 * oy - pt + dy
                        if r >= 0 and r < h:
                            acc[T.Ramp(0, 1, lanes)] = T.max(acc[T.Ramp(0, 1, lanes)],
                                                             x[nc // c_in, nc % c_in, r, T.Ramp(c, 1, lanes)])
                    row[T.Ramp(c, 1, lanes)] = acc[T.Ramp(0, 1, lanes)]
                for b in range(blocks):
                    x0 = T.min(lo + b * lanes, hi - (lanes - 1))
                    c0 = 2 * x0 - pl
                    a = row[T.Ramp(c0, 1, lanes)]
                    b2 = row[T.Ramp(c0 + lanes, 1, lanes)]
                    e = T.Broadcast(row[c0 + 2 * lanes], lanes)
                    y[nc // c_in, nc % c_in, oy, T.Ramp(x0, 1, lanes)] = T.max(T.Shuffle([a, b2], even), T.max(
                        T.Shuffle([a, b2], odd), T.Shuffle([a, b2, e], next_even)))
                for i in range(n_scalar):  # the outputs left and right of the interior ones
                    ox = T.if_then_else(i < left_end, i, right_start + i - left_end)
                    scalar[0] = lowest
                    for dx in range(3):
                        if 2 * ox - pl + dx >= 0 and 2 * ox - pl + dx < w:
                            scalar[0] = T.max(scalar[0], row[2 * ox - pl + dx])
                    y[nc // c_in, nc % c_in, oy, ox] = scalar[0]

    return max_pool2d_stride2_rows


def legalize(bb, call, fallback):
    """This kernel where :func:`_facts` takes the pool (and :func:`enabled`), else ``fallback(bb, call)``."""
    from tvm import relax

    from graphgen.tune.defaults import PARALLEL_MIN_ITERATIONS

    facts = _facts(call) if enabled() else None
    if facts is None:
        return fallback(bb, call)
    shape, out_hw, pad_top, pad_left = facts
    outputs = shape[0] * shape[1] * out_hw[0] * out_hw[1]
    try:
        func = max_pool_func(shape, out_hw, pad_top, pad_left, parallel=outputs >= PARALLEL_MIN_ITERATIONS)
    except Exception:  # noqa: BLE001 - TVMScript could not parse the kernel (e.g. its source changed on
        return fallback(bb, call)  # disk while running): TVM's pool, rather than fail the whole pipeline
    gv = bb.add_func(func, "max_pool2d_stride2")
    return relax.call_tir(gv, [call.args[0]], call.ty)
