"""Winograd F(m x m, 3 x 3) for 3x3 stride-1 convolutions on CPU targets.

A direct convolution does 9 multiply-adds per output and input channel. onnxruntime already
runs SqueezeNet's and ResNet-18's direct convolutions at ~90 % of this host's fp32 GEMM speed,
so a direct schedule, however tuned, cannot get much closer to it; doing fewer multiply-adds
can. Winograd's minimal filtering (Lavin & Gray, 2016) computes an ``m x m`` output tile from an
``(m+2) x (m+2)`` input tile with ``(m+2)^2`` multiply-adds per channel pair instead of
``9 m^2``: 4x fewer for ``m = 4``, 2.25x for ``m = 2``.

How it enters the pipeline: :func:`legalize_conv2d` replaces the legalization of
``relax.nn.conv2d`` (graphgen's CPU pipeline, :func:`graphgen.tune.pipeline.fuse`) for convs
that qualify (3x3, stride 1, dilation 1, one group, NCHW, constant fp32 weights, enough
channels and output). The weight transform ``U = G g G^T`` is done here in float64 once
(the library holds ``U``); the rest is one TIR kernel of four stages

    winograd_data_pad      input padded to whole tiles (laid out channel-blocked by the schedule)
    winograd_data_rows     B^T d per tile and input channel
    winograd_data_pack     V = (B^T d) B                                  [P, alpha, alpha, C]
    winograd_bgemm         M = V U, one GEMM per tile position            [P, alpha, alpha, K]
    winograd_inverse_rows  A^T M per tile and output channel
    winograd_inverse       Y = (A^T M) A, cropped to the output

marked like a convolution (``op_pattern`` out-elementwise-fusable), so FuseOps fuses the bias,
ReLU and residual add into it as before. The transforms are written as explicit sums of the
matrices' nonzero entries, chosen by a ``Select`` on the tile position: once the schedule
unrolls the tile loops the selects fold away and no multiply by zero is left (LLVM may not
drop ``x * 0.0`` in IEEE arithmetic). :func:`graphgen.tune.defaults.schedule_winograd` gives
the kernel its default schedule.

Numerics (fp32, random data, against a float64 direct convolution): direct 1.6e-7 - 4.1e-7
relative L2 per layer, F(2x2) 1.7e-7 - 6.9e-7, F(4x4) with the interpolation points
0, -1, 1, 1/2, -2 (TVM's choice) 0.8e-6 - 2.8e-6. graphgen uses F(4x4) where the output is at
least 32 tiles of 4x4 (or 16, where the transformed weights are small), F(2x2) where that
gives at least 32 tiles, else the direct conv (:data:`MIN_TILES`,
:data:`F4_FEW_TILES_MAX_BYTES`). ``graphgen build --winograd off`` (or ``GRAPHGEN_WINOGRAD=0``)
turns the rewrite off, ``2`` or ``4`` forces one tile size; the build's manifest records the mode
(``build.schedules.winograd``).

Size: the library holds ``U``, ``alpha^2 / 9`` times the weights of each such conv (4x for
F(4x4), 1.8x for F(2x2)); ResNet-18's library grows from 47 MB to 60 MB. ``--winograd
off`` is the choice where flash matters more than speed.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from graphgen.tune.conv_call import OUT_ELEMWISE_FUSABLE

#: the tile count is padded to a multiple of this (the GEMM's register tile)
TILE_QUANTUM = 4


#: interpolation points per tile size (alpha - 1 finite points, plus infinity): TVM's
#: choice for F(4x4, 3x3), measured the most accurate of the few tried here
_POINTS = {2: (0.0, -1.0, 1.0), 4: (0.0, -1.0, 1.0, 0.5, -2.0)}


@functools.lru_cache(maxsize=None)
def transform_matrices(m: int):
    """(A^T [m, alpha], B^T [alpha, alpha], G [alpha, 3]) in float64 for F(m x m, 3 x 3)."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution

    a, b, g = _cook_toom_convolution(np.array(_POINTS[m], dtype=np.float64), m, 3)
    # exact dyadic entries: round off the float noise of the construction
    return np.round(a.T, 12), np.round(b.T, 12), g


def weight_transform(weight: np.ndarray, m: int) -> np.ndarray:
    """``U[e, n, c, k] = (G g_kc G^T)[e, n]`` for OIHW 3x3 weights, in float64, as float32."""
    _, _, g = transform_matrices(m)
    u = np.einsum("ea,kcab,nb->enck", g, weight.astype(np.float64), g)
    return np.ascontiguousarray(u.astype(np.float32))


def _tiles(out_h: int, out_w: int, m: int) -> int:
    return -(-out_h // m) * -(-out_w // m)


#: fewest output tiles (per image) worth a Winograd kernel: each transformed weight is used
#: once per tile, and the transformed weights are alpha^2/9 times the size of the originals
#: (4x for F(4x4)). Measured on AVX2, 512 -> 512 channels at 7x7: F(4x4) (4 tiles) ran 2.3x
#: slower than the direct conv, memory-bound on 38 MB of weights; F(2x2) (16 tiles) 1.1x faster
#: alone, but not in the model: on AVX-512 (Xeon, one thread, stop 28, with the weights'
#: prefetch) ResNet-18's three 512 -> 512 convs at 7x7 took 4.1-4.3 ms each as F(2x2) against
#: 1.9-2.0 direct (U of 16.8 MB from memory on every call)
MIN_TILES = 16

#: F(4x4) with fewer than 2 * MIN_TILES tiles (13x13 to 20x20 outputs) only where its
#: transformed weights are at most this size. Inside a model a layer's weights come from
#: memory, not the cache a kernel timed alone keeps them in, and 16 uses per weight do not
#: hide that. Measured (Xeon, AVX-512, one thread), SqueezeNet's 48 -> 192 and 64 -> 256 at
#: 13x13 (U of 1.3 and 2.4 MB): the second ran 0.28 ms alone as F(4x4) against 0.36 as F(2x2),
#: but 0.48 against 0.44 inside the model (onnxruntime 0.47). The whole model with F(2x2)
#: there: 3-4 % faster in two interleaved A/B runs; ResNet-18 (256 -> 256 at 14x14, U of
#: 9.4 MB): the same either way; stop 28 (with the weights' prefetch) F(4x4) there 1.71 ms a
#: conv against 1.32-1.38 as F(2x2), the model 5 % slower.
F4_FEW_TILES_MAX_BYTES = 512 * 1024


#: ``GRAPHGEN_WINOGRAD`` / ``--winograd`` values
MODES = ("auto", "off", "2", "4")


def resolve_mode(mode: str | None = None) -> str:
    """``mode``, else the environment's ``GRAPHGEN_WINOGRAD`` (``1`` meaning auto, ``0`` off);
    a value outside :data:`MODES` is a one-line user error."""
    from graphgen.errors import UserError

    if mode is None:
        mode = os.environ.get("GRAPHGEN_WINOGRAD", "auto") or "auto"
        mode = {"1": "auto", "0": "off"}.get(mode, mode)
    if mode not in MODES:
        raise UserError(f"unknown Winograd mode {mode!r}; accepted: {', '.join(MODES)} "
                        "(GRAPHGEN_WINOGRAD also takes 1 and 0)")
    return mode


def tile_size_for(out_h: int, out_w: int, mode: str | None = None,
                  channels: tuple[int, int] | None = None) -> int | None:
    """4 or 2 (the output tile), or None where a direct convolution is the better choice.
    ``channels``: (input, output) channels, for the size of the transformed weights (None:
    taken as small)."""
    mode = resolve_mode(mode)
    if mode == "off":
        return None
    if mode in ("2", "4"):
        return int(mode)
    tiles4 = _tiles(out_h, out_w, 4)
    u4_bytes = 36 * 4 * (channels[0] * channels[1] if channels else 0)
    if tiles4 >= 2 * MIN_TILES or (tiles4 >= MIN_TILES and u4_bytes <= F4_FEW_TILES_MAX_BYTES):
        return 4
    # F(2x2) where F(4x4) has too few tiles (or too big weights for them) and F(2x2) has
    # plenty (7x7: direct)
    if _tiles(out_h, out_w, 2) >= 2 * MIN_TILES:
        return 2
    return None


def enabled(mode: str | None = None) -> bool:
    return resolve_mode(mode) != "off"


def qualifies(in_channels: int, out_channels: int, out_h: int, out_w: int) -> bool:
    """Shapes where Winograd pays (and the default schedule has whole vectors): enough output
    channels for the GEMM's vector blocks, enough input channels for the transforms to be a
    small share of the work, and an output of at least a few tiles."""
    return out_channels % 8 == 0 and out_channels >= 16 and in_channels % 4 == 0 and in_channels >= 8 \
        and min(out_h, out_w) >= 4


def _sum_terms(terms):
    """``sum(coef * x)`` without multiplying by +-1."""
    expr = None
    for coef, x in terms:
        t = x if coef == 1.0 else (-x if coef == -1.0 else x * float(coef))
        expr = t if expr is None else expr + t
    return expr


def winograd_conv2d_te(data, u, pads, m: int):
    """The TE stages of a Winograd conv: ``data`` NCHW, ``u`` [alpha, alpha, C, K]; ``pads`` =
    (top, left, bottom, right). Output NCHW, stride 1."""
    from tvm import te, tirx

    n_b, c_in, h, w = (int(x) for x in data.shape)
    alpha, _, _, k_out = (int(x) for x in u.shape)
    pt, pl, pb, pr = pads
    out_h, out_w = h + pt + pb - 2, w + pl + pr - 2
    n_h, n_w = -(-out_h // m), -(-out_w // m)
    real_tiles = n_b * n_h * n_w
    # the GEMM's register tile takes 4 (or 8) tiles at a time; 49 or 169 tiles would leave
    # only 1, 7 or 13 as perfect divisors. The few extra tiles repeat the last one (never read)
    tiles = -(-real_tiles // TILE_QUANTUM) * TILE_QUANTUM
    at, bt, _ = transform_matrices(m)
    dt = data.dtype

    ph_total, pw_total = n_h * m + 2, n_w * m + 2
    zero = tirx.const(0.0, dt)
    data_pad = te.compute(
        (n_b, c_in, ph_total, pw_total),
        lambda b, c, y, x: tirx.if_then_else(
            tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w), data[b, c, y - pt, x - pl], zero),
        name="winograd_data_pad")

    def tile_of(p):
        if tiles != real_tiles:
            p = tirx.min(p, real_tiles - 1)
        return p // (n_h * n_w), (p // n_w) % n_h, p % n_w

    def select(i, n: int, branch):
        """``branch(v)`` for the value v of ``i`` (a loop index the schedule unrolls)."""
        e = branch(n - 1)
        for v in range(n - 2, -1, -1):
            e = tirx.Select(i == v, branch(v), e)
        return e

    # the transforms are separable (B^T d B = B^T (d B)): two passes of alpha-term sums keep
    # each expression small (one 2-D pass made TVM's common-subexpression pass take ~3 s per kernel)
    def rows(p, e, col, c):
        b, ty, tx = tile_of(p)
        return select(e, alpha, lambda ei: _sum_terms(
            [(bt[ei, a], data_pad[b, c, ty * m + a, tx * m + col]) for a in range(alpha) if bt[ei, a] != 0]))

    data_rows = te.compute((tiles, alpha, alpha, c_in), rows, name="winograd_data_rows")

    # tile-major: the pack writes each tile's alpha^2 x C values close together (plane-major,
    # 36 write streams 50 KB apart, ran 10x slower than the arithmetic)
    data_pack = te.compute(
        (tiles, alpha, alpha, c_in),
        lambda p, e, nu, c: select(nu, alpha, lambda ni: _sum_terms(
            [(bt[ni, col], data_rows[p, e, col, c]) for col in range(alpha) if bt[ni, col] != 0])),
        name="winograd_data_pack")
    rc = te.reduce_axis((0, c_in), name="rc")
    bgemm = te.compute(
        (tiles, alpha, alpha, k_out),
        lambda p, e, nu, k: te.sum(data_pack[p, e, nu, rc] * u[e, nu, rc, k], axis=rc),
        name="winograd_bgemm")
    inverse_rows = te.compute(
        (tiles, m, alpha, k_out),
        lambda p, i, nu, k: select(i, m, lambda iv: _sum_terms(
            [(at[iv, e], bgemm[p, e, nu, k]) for e in range(alpha) if at[iv, e] != 0])),
        name="winograd_inverse_rows")

    def inverse(b, k, y, x):
        p = b * (n_h * n_w) + (y // m) * n_w + x // m
        return select(x % m, m, lambda jv: _sum_terms(
            [(at[jv, nu], inverse_rows[p, y % m, nu, k]) for nu in range(alpha) if at[jv, nu] != 0]))

    return te.compute((n_b, k_out, out_h, out_w), inverse, name="winograd_inverse")


def _conv_facts(call):
    """(data shape, weight array, pads, out_h, out_w) of a relax.nn.conv2d call Winograd can
    take, else None."""
    from graphgen.tune.conv_call import static_conv

    conv = static_conv(call, (3, 3))
    if conv is None or any(p > 2 for p in conv.pads):
        return None
    shape, w, pads = conv.data_shape, conv.weight, list(conv.pads)
    out_h = shape[2] + pads[0] + pads[2] - 2
    out_w = shape[3] + pads[1] + pads[3] - 2
    if not qualifies(shape[1], w.shape[0], out_h, out_w):
        return None
    return shape, w, pads, out_h, out_w


def legalize_conv2d(bb, call, mode: str | None = None, pointwise_kernels: bool | None = None):
    """Legalization of ``relax.nn.conv2d``: Winograd where it qualifies, pointwise GEMM for 1x1
    convs (:mod:`graphgen.tune.pointwise`; ``pointwise_kernels``: None = the environment's), the
    phase-split kernel for strided stems and stride-1 depthwise convs (:mod:`graphgen.tune.phase_conv`),
    the shuffle kernel for 3x3 / stride-2 depthwise convs (:mod:`graphgen.tune.depthwise_stride2`),
    else TVM's own."""
    import tvm
    from tvm import relax

    from graphgen.tune import depthwise_stride2, phase_conv, pointwise

    tvm_conv = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")

    def stride2_depthwise_or_tvm(bb_, call_):  # 3x3 / stride-2 depthwise: graphgen's shuffle kernel
        return depthwise_stride2.legalize(bb_, call_, tvm_conv)

    def strided_or_tvm(bb_, call_):  # strided stems, stride-1 depthwise: graphgen's phase-split kernel
        return phase_conv.legalize(bb_, call_, stride2_depthwise_or_tvm)

    def default(bb_, call_):  # 1x1 convs: graphgen's pointwise GEMM kernel; the rest as above, or TVM's
        return pointwise.legalize(bb_, call_, strided_or_tvm, pointwise_kernels)

    facts = _conv_facts(call) if enabled(mode) else None
    if facts is None:
        return default(bb, call)
    _, w, pads, out_h, out_w = facts
    m = tile_size_for(out_h, out_w, mode, channels=(w.shape[1], w.shape[0]))
    if m is None:
        return default(bb, call)
    u = relax.const(weight_transform(w, m))
    return bb.call_te(winograd_conv2d_te, call.args[0], u, pads, m, primfunc_name_hint="winograd_conv2d",
                      primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})


def legalize_map(mode: str | None = None, pointwise_kernels: bool | None = None) -> dict:
    """LegalizeOps' ``customize_legalize_map`` for Winograd ``mode`` (see :func:`resolve_mode`)
    and pointwise kernels on or off (None: the environment's)."""
    import tvm

    from graphgen.tune import conv_transpose, max_pool_stride2

    mode = resolve_mode(mode)
    tvm_conv_transpose = tvm.ir.Op.get("relax.nn.conv2d_transpose").get_attr("FLegalize")

    def conv(bb, call):
        return legalize_conv2d(bb, call, mode, pointwise_kernels)

    tvm_max_pool = tvm.ir.Op.get("relax.nn.max_pool2d").get_attr("FLegalize")
    # transposed convs: a stride-1 conv over their phases (graphgen.tune.conv_transpose), given
    # the conv kernels above; 3x3 / stride-2 max pools: graphgen's vectorized kernel
    return {"relax.nn.conv2d": conv,
            "relax.nn.conv2d_transpose": lambda bb, call: conv_transpose.legalize(bb, call, conv, tvm_conv_transpose),
            "relax.nn.max_pool2d": lambda bb, call: max_pool_stride2.legalize(bb, call, tvm_max_pool)}
