"""3x3 / stride-2 depthwise convs (NCHW, fp32) as a hand-written kernel whose rows are vectorized.

A vector of outputs of a stride-2 window reads every other input of the row, which TVM
assembles lane by lane. graphgen's other depthwise kernels therefore avoid row vectors at
stride 2: the channel-blocked one copies the input into ``[c / vk, h, w, vk]`` blocks and
vectorizes over channels, and the phase-split copy of :mod:`graphgen.tune.phase_conv` would
itself be a gather (1.6 ms for MobileNetV2's 96 x 112 x 112 input). Measured in the model
(AVX-512, one thread): MobileNetV2's 96 x 112 x 112 -> 56 x 56 layer took 2.1 ms that way
against onnxruntime's 0.73.

Here each vector of ``lanes`` outputs loads its ``2 * lanes + 1`` input columns as two pairs
of whole vectors, the second pair one column to the right, and takes the window's three columns
apart with two-source shuffles: the even lanes of the first pair, the even and the odd lanes of
the second. Per window row four loads, three shuffles and three multiply-adds with the row's
broadcast weights. (:mod:`graphgen.tune.max_pool_stride2` loads one pair and the element after
it, and its third shuffle takes three sources; measured here on Zen 5, one thread, 8 lanes,
MobileNetV2's 96 x 112 x 112 -> 56 x 56 and 144 x 56 x 56 -> 28 x 28 layers: 0.255 -> 0.212 ms
and 0.112 -> 0.092. The pool measured no clear gain from the second pair: its rows-first
form shuffles a row buffer it has just stored.) Rows
outside the input are skipped (zero padding), checked once per row. Outputs whose window
reaches into the left or right padding are computed by scalar code with the bounds checked per
tap. The last vector of a row is shifted left to end at the last interior output (it recomputes
a few outputs, identically), so every interior output is vectorized whatever the width.

Unlike the pool, the kernel is not complete as written: it is one block per output row
(``depthwise_conv2d_stride2``, iterators ``(n * c, oy)``, its reads and writes declared), so
FuseOps fuses the bias and activation after it (op pattern "out-elementwise fusable", as any
conv) and :func:`graphgen.tune.defaults.schedule_depthwise_stride2` runs that tail on each
output row right after it is computed, vectorized, and parallelizes the rows.
"""

from __future__ import annotations

import os

from graphgen.tune.conv_call import OUT_ELEMWISE_FUSABLE
from graphgen.tune.max_pool_stride2 import interior, row_geometry

#: the kernel's block; :func:`graphgen.tune.defaults.default_schedule` finds it by this name
BLOCK = "depthwise_conv2d_stride2"

#: the class apply_default_schedules counts the kernel under
KIND = "depthwise conv2d (stride 2, shuffles)"

#: fp32 outputs per vector (two NEON registers, an AVX2 one, half an AVX-512 one); rows with
#: fewer interior outputs than this use NARROW_LANES. AVX-512 targets take whole registers
#: (WIDE_LANES) where a row has that many interior outputs. Measured (Zen 5, one thread, conv
#: + ReLU6): 144 x 56 x 56 -> 28 x 28 0.092 ms with 8 lanes, 0.061 with 16 (onnxruntime 0.087);
#: 96 x 112 x 112 -> 56 x 56 0.211 both (the input, 4.8 MB, comes from memory)
LANES = 8
NARROW_LANES = 4

WIDE_LANES = 16


def vector_lanes(interior: int, widest: int = LANES) -> int:
    """Outputs per vector for a row of ``interior`` outputs whose window lies inside the input,
    on a target whose vectors hold ``widest`` fp32 lanes at most (8 or 16)."""
    for lanes in (WIDE_LANES, LANES):
        if lanes <= widest and interior >= lanes:
            return lanes
    return NARROW_LANES


def enabled() -> bool:
    """``GRAPHGEN_DEPTHWISE_SHUFFLES=0`` keeps graphgen's channel-blocked kernel for these convs (to compare)."""
    return os.environ.get("GRAPHGEN_DEPTHWISE_SHUFFLES", "1") != "0"


def _out_size(size: int, before: int, after: int) -> int:
    return (size + before + after - 3) // 2 + 1


def _facts(call):
    """(NCHW input shape, output height and width, padding top and left) of a conv this kernel
    takes, else None: 3x3, stride 2, depthwise, padding 0 or 1 on each side."""
    from graphgen.tune.conv_call import static_conv

    conv = static_conv(call, (3, 3), strided=True, depthwise=True)
    if conv is None or conv.strides != (2, 2) or not all(0 <= p <= 1 for p in conv.pads):
        return None
    n_b, c_in, h, w = conv.data_shape
    pt, pl, pb, pr = conv.pads
    out_h, out_w = _out_size(h, pt, pb), _out_size(w, pl, pr)
    if out_h < 1 or out_w < 1:
        return None
    return conv.data_shape, (out_h, out_w), pt, pl


def depthwise_stride2_func(shape, out_hw, pad_top: int, pad_left: int, widest: int = LANES):
    """The kernel (a ``tirx.PrimFunc`` of ``x`` NCHW, ``w`` [C, 1, 3, 3] -> ``y`` NCHW), its
    vectors at most ``widest`` lanes (:func:`vector_lanes`)."""
    from tvm.script import tirx as T

    n_b, c_in, h, w = shape
    out_h, out_w = out_hw
    nc_total = n_b * c_in
    pt, pl = pad_top, pad_left
    lo, hi = interior(w, out_w, pl)
    lanes = vector_lanes(hi - lo + 1, widest)
    lo, hi, blocks, left_end, right_start, n_scalar = row_geometry(w, out_w, pl, lanes)
    even, odd = list(range(0, 2 * lanes, 2)), list(range(1, 2 * lanes, 2))  # of two vectors
    zero = T.float32(0)
    i64 = T.int64  # Relax's shapes are int64: FuseTIR maps buffers of the same shape type only

    # acc / scalar: allocated in the row's block, under 1 KB, so on the stack
    @T.prim_func(private=True, s_tir=True)
    def depthwise_conv2d_stride2(x: T.Buffer((i64(n_b), i64(c_in), i64(h), i64(w)), "float32"),
                                 wt: T.Buffer((i64(c_in), i64(1), i64(3), i64(3)), "float32"),
                                 y: T.Buffer((i64(n_b), i64(c_in), i64(out_h), i64(out_w)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": OUT_ELEMWISE_FUSABLE, "graphgen.kind": KIND})
        for nc, oy in T.grid(i64(nc_total), i64(out_h)):
            with T.sblock("depthwise_conv2d_stride2"):
                vnc, voy = T.axis.remap("SS", [nc, oy])
                T.reads(x[vnc // c_in, vnc % c_in, 0:h, 0:w], wt[vnc % c_in, 0, 0:3, 0:3])
                T.writes(y[vnc // c_in, vnc % c_in, voy, 0:out_w])
                acc = T.sblock_alloc_buffer((lanes,), "float32")
                scalar = T.sblock_alloc_buffer((1,), "float32")
                for b in range(blocks):
                    x0 = T.min(lo + b * lanes, hi - (lanes - 1))
                    c0 = 2 * x0 - pl
                    acc[T.Ramp(0, 1, lanes)] = T.Broadcast(zero, lanes)
                    for dy in T.unroll(3):
                        r = 2 * voy - pt + dy
                        if r >= 0 and r < h:
                            a = x[vnc // c_in, vnc % c_in, r, T.Ramp(c0, 1, lanes)]
                            b2 = x[vnc // c_in, vnc % c_in, r, T.Ramp(c0 + lanes, 1, lanes)]
                            a1 = x[vnc // c_in, vnc % c_in, r, T.Ramp(c0 + 1, 1, lanes)]
                            b1 = x[vnc // c_in, vnc % c_in, r, T.Ramp(c0 + 1 + lanes, 1, lanes)]
                            acc[T.Ramp(0, 1, lanes)] = acc[T.Ramp(0, 1, lanes)] + \
                                T.Broadcast(wt[vnc % c_in, 0, dy, 0], lanes) * T.Shuffle([a, b2], even) + \
                                T.Broadcast(wt[vnc % c_in, 0, dy, 1], lanes) * T.Shuffle([a1, b1], even) + \
                                T.Broadcast(wt[vnc % c_in, 0, dy, 2], lanes) * T.Shuffle([a1, b1], odd)
                    y[vnc // c_in, vnc % c_in, voy, T.Ramp(x0, 1, lanes)] = acc[T.Ramp(0, 1, lanes)]
                for i in range(n_scalar):  # the outputs left and right of the interior ones
                    ox = T.if_then_else(i < left_end, i, right_start + i - left_end)
                    scalar[0] = zero
                    # only the taps inside the input (the loops' bounds, not a check per tap)
                    for dy in range(T.max(pt - 2 * voy, 0), T.min(h + pt - 2 * voy, 3)):
                        for dx in range(T.max(pl - 2 * ox, 0), T.min(w + pl - 2 * ox, 3)):
                            scalar[0] = scalar[0] + wt[vnc % c_in, 0, dy, dx] * \
                                x[vnc // c_in, vnc % c_in, 2 * voy - pt + dy, 2 * ox - pl + dx]
                    y[vnc // c_in, vnc % c_in, voy, ox] = scalar[0]

    return depthwise_conv2d_stride2


def widest_lanes() -> int:
    """WIDE_LANES where the kernels are legalized for AVX-512
    (:func:`graphgen.tune.conv_call.legalize_lanes`), else LANES."""
    from graphgen.tune.conv_call import legalize_lanes

    return WIDE_LANES if (legalize_lanes() or 0) >= WIDE_LANES else LANES


def legalize(bb, call, fallback):
    """This kernel where :func:`_facts` takes the conv (and :func:`enabled`), else ``fallback(bb, call)``."""
    from tvm import relax

    facts = _facts(call) if enabled() else None
    if facts is None:
        return fallback(bb, call)
    shape, out_hw, pad_top, pad_left = facts
    try:
        func = depthwise_stride2_func(shape, out_hw, pad_top, pad_left, widest_lanes())
    except Exception:  # noqa: BLE001 - TVMScript could not parse the kernel (e.g. its source changed on
        return fallback(bb, call)  # disk while running): the other kernels, rather than fail the pipeline
    gv = bb.add_func(func, "depthwise_conv2d_stride2")
    return relax.call_tir(gv, [call.args[0], call.args[1]], call.ty)
