"""1x1 convolutions as a GEMM over the flattened image, vectorized along it, on CPU targets.

An NCHW 1x1 stride-1 conv is ``Y[k, p] = sum_c W[k, c] X[c, p]`` with ``p = y * W + x``: a GEMM
whose right operand and result are the activations' own rows. graphgen's direct conv schedule
vectorizes over output channels and tiles the image in ``hb x wb`` blocks that must divide it:
at 14x14 or 7x7 (MobileNetV2, ShuffleNet) and 13x13 (SqueezeNet's 512 -> 1000 classifier) the
register tile shrinks to a few accumulators, and its channels-last tile is written back
transposed. Measured (AVX2, one thread): MobileNetV2's 1x1 convs ran at ~30 GFLOP/s, 13.2 of its
16.3 ms; SqueezeNet's classifier conv 3.5 ms against onnxruntime's 1.8.

Here the image is one axis of ``P = H * W`` positions, padded to a multiple of
:data:`P_QUANTUM`, so every register tile is whole: ``kb`` output channels (weights broadcast)
x ``nv`` vectors of positions (loaded straight from the input rows), with the result rows
stored contiguously. Stages of the kernel (one TIR function; FuseOps fuses the bias, ReLU and
residual add into it as for any conv):

    pointwise_data_pad  the input rows padded to P_pad (when P is not a multiple, padding
                        adds at most SPLIT_MIN_WASTE of the positions and the input has no more
                        channels than the output: 14x14, 13x13 expansions)
    pointwise_gemm      [N, K, P_pad], or [N, K, P_main] over the whole vectors of positions
    pointwise_gemm_rest [N, P - P_main, K]: the positions past them (7x7: 49 = 48 + 1), with
                        the channels as the vector, instead of padding
    pointwise_out       [N, K, H, W], the GEMM's rows cropped (the fused tail runs here)

:func:`graphgen.tune.defaults.schedule_pointwise` is its default schedule. Used for convs
that are 1x1, stride 1, no padding, one group, NCHW fp32 with constant weights;
``GRAPHGEN_POINTWISE=0`` keeps graphgen's direct conv schedule for them.
"""

from __future__ import annotations

import os

import numpy as np

from graphgen.tune.conv_call import OUT_ELEMWISE_FUSABLE

#: the flattened image is padded to a multiple of this (two AVX2 vectors)
P_QUANTUM = 16



def enabled(use: bool | None = None) -> bool:
    """Whether 1x1 convs become pointwise GEMM kernels: ``use``, else the environment's
    ``GRAPHGEN_POINTWISE`` (``0`` turns them off), else yes."""
    if use is not None:
        return bool(use)
    return os.environ.get("GRAPHGEN_POINTWISE", "1") != "0"


#: positions are computed apart (not padded) when padding would add more than this share of them
SPLIT_MIN_WASTE = 1 / 8


def computes_rest_apart(c_in: int, k_out: int, positions: int, threads: int = 1) -> bool:
    """Whether the positions past the last whole vector are a GEMM of their own rather than
    padding: where padding wastes much (7x7: 49 -> 64), and where the padded copy of the input
    would be larger than the second pass over the output that computing them apart costs (more
    input channels than output channels: SqueezeNet's squeeze convs). Measured (Xeon, AVX-512,
    one thread): 128 -> 16 at 55x55 0.59 ms padded vs 0.36-0.40 apart, 256 -> 32 at 27x27
    0.235 vs 0.174 (onnxruntime 0.42, 0.25).

    On more than one thread (``threads``), also where few positions are left (at most
    :data:`THREADED_REST_MAX_SHARE` of the image): the padded copy is one more pass between
    the threads (each GEMM thread reads rows the copy wrote on the other core), and the whole
    vectors split into position chunks for the threads (``defaults.position_chunks``) where a
    padded count often does not (13 vectors at 14x14). Measured (Xeon, AVX-512, two threads,
    conv + bias + ReLU alone, us, padded -> apart): 116 -> 116 at 14x14 61-65 -> 39 (one
    thread: 39 padded), 232 -> 232 at 14x14 101 -> 82, 96 -> 576 at 14x14 110 -> 105,
    48 -> 192 at 13x13 34 -> 28, 512 -> 1000 at 13x13 618 -> 594; but 64 -> 256 at 13x13 37 -> 48,
    and SqueezeNet in the model slower with its 13x13 convs apart (9 positions of 169 left,
    computed at a fraction of the GEMM's speed), hence the bound (14x14: 4 of 196 left)."""
    padded = -(-positions // P_QUANTUM) * P_QUANTUM
    return (padded == positions or padded - positions > positions * SPLIT_MIN_WASTE or c_in > k_out
            or (threads > 1 and positions % P_QUANTUM <= positions * THREADED_REST_MAX_SHARE))


#: on more than one thread, positions past the last whole vector are computed apart where
#: they are at most this share of the image (see :func:`computes_rest_apart`)
THREADED_REST_MAX_SHARE = 1 / 25


#: AVX-512: input channels from which a padded image's positions are padded further, to a
#: count of 16-lane vectors that splits into rows of 2 or 3 (see :func:`padded_positions`)
WIDE_ROWS_MIN_CHANNELS = 128


def padded_positions(positions: int, c_in: int) -> int:
    """The padded GEMM's position count: a multiple of :data:`P_QUANTUM`, and on AVX-512 (16
    lanes, one vector per quantum) one vector more where the count of vectors is odd and no
    multiple of 3 (13x13: 11 vectors -> 12, 14x14: 13 -> 14) and the conv has at least
    :data:`WIDE_ROWS_MIN_CHANNELS` input channels. A prime count of vectors leaves the register
    tile one vector of positions x ``kb`` channels: ``kb`` weight broadcasts and one input
    vector loaded per ``kb`` FMAs, each weight read once per 16 positions, which holds where
    the reduction's weights and input column stay in L1 but not past it. Measured (Xeon,
    AVX-512, one thread, conv + bias + ReLU, 1 x 20 or 24 tiles -> 3 x 8 over the extra
    vector; onnxruntime), ms: 512 -> 1000 at 13x13 1.39 -> 1.17 (1.18-1.24), 512 -> 512
    0.673 -> 0.566 (0.574), 384 -> 768 0.743 -> 0.652 (0.663), 1024 -> 1024 2.75 -> 2.52
    (2.19), 256 -> 1000 0.607 -> 0.574; at 14x14 232 -> 232 0.154 -> 0.141, 128 -> 512 0.183
    -> 0.174, 256 -> 1024 0.692 -> 0.673; below the bound the same or slower: 116 -> 116 at
    14x14 0.039 -> 0.038, 64 -> 256 at 13x13 0.036 -> 0.036-0.039, 96 -> 576 at 14x14 0.154
    -> 0.157-0.162."""
    from graphgen.tune.conv_call import legalize_lanes

    p_pad = -(-positions // P_QUANTUM) * P_QUANTUM
    lanes = legalize_lanes() or 0
    if lanes == P_QUANTUM and c_in >= WIDE_ROWS_MIN_CHANNELS:
        vectors = p_pad // lanes
        if vectors > 1 and vectors % 2 and vectors % 3:
            p_pad += lanes
    return p_pad


def pointwise_conv2d_te(data, weight, k_out: int):
    """``data`` NCHW, ``weight`` [K_pad, C] (rows past ``k_out`` zero, see :func:`pad_rows`)
    -> NCHW with ``k_out`` channels."""
    from tvm import te, tirx

    from graphgen.tune.conv_call import legalize_threads

    n_b, c_in, h, w = (int(x) for x in data.shape)
    p_real = h * w
    p_pad = padded_positions(p_real, c_in)
    if computes_rest_apart(c_in, k_out, p_real, legalize_threads()):
        # whole vectors, or a 7x7 image (49 positions: 48 + 1 apart rather than 64), or more
        # input channels than output channels
        def x_at(n, c, p):  # the NCHW image's rows are one contiguous axis of positions
            return data[n, c, p // w, p % w]

        return _gemm_rows(x_at, weight, k_out, (n_b, c_in, p_real), (h, w), split=True)
    # 14x14 (196 positions padded to 208) or 13x13: the input rows copied, padded
    zero = tirx.const(0.0, data.dtype)
    x_pad = te.compute((n_b, c_in, p_pad), lambda n, c, p: tirx.if_then_else(
        p < p_real, data[n, c, tirx.min(p, p_real - 1) // w, tirx.min(p, p_real - 1) % w], zero),
        name="pointwise_data_pad")
    return _gemm_rows(lambda n, c, p: x_pad[n, c, p], weight, k_out, (n_b, c_in, p_pad), (h, w))


def _gemm_rows(x_at, weight, k_out: int, dims, out_hw, split: bool = False):
    """The stages the kernels share: ``pointwise_gemm`` [N, K_pad, P] over the rows
    ``x_at(n, c, p)``, then ``pointwise_out`` [N, k_out, H, W] cropped from its rows.

    ``split``: positions past the last whole :data:`P_QUANTUM` are not padded but computed
    apart, ``pointwise_gemm_rest`` [N, P % P_QUANTUM, K_pad], vectorized along the channels
    (a 7x7 image's 49 positions are 48 + 1, not 64).
    """
    from tvm import te, tirx

    n_b, c_in, p_all = dims
    out_h, out_w = out_hw
    k_pad = int(weight.shape[0])
    main = p_all // P_QUANTUM * P_QUANTUM if split else p_all
    rc = te.reduce_axis((0, c_in), name="rc")
    gemm = te.compute((n_b, k_pad, main),
                      lambda n, k, p: te.sum(weight[k, rc] * x_at(n, rc, p), axis=rc), name="pointwise_gemm")
    if main == p_all:
        return te.compute((n_b, k_out, out_h, out_w), lambda n, k, y, x: gemm[n, k, y * out_w + x],
                          name="pointwise_out")
    parts = rest_partial_sums(c_in)
    rc2 = te.reduce_axis((0, c_in // parts), name="rc")
    rest = te.compute((n_b, p_all - main, parts, k_pad),
                      lambda n, q, j, k: te.sum(weight[k, rc2 * parts + j] * x_at(n, rc2 * parts + j, q + main),
                                                axis=rc2),
                      name="pointwise_gemm_rest")

    def at(n, k, p):
        # clamped indices: each side of the select reads only inside its buffer
        q = tirx.max(p - main, 0)
        total = rest[n, q, 0, k]
        for j in range(1, parts):
            total = total + rest[n, q, j, k]
        return tirx.if_then_else(p < main, gemm[n, k, tirx.min(p, main - 1)], total)

    return te.compute((n_b, k_out, out_h, out_w), lambda n, k, y, x: at(n, k, y * out_w + x), name="pointwise_out")


#: partial sums the positions computed apart are accumulated in (see :func:`rest_partial_sums`)
REST_PARTS = 4


def rest_partial_sums(c_in: int) -> int:
    """Partial sums over interleaved input channels (``c = rc * parts + j``) the positions
    computed apart are accumulated in, added in the output stage. Few positions are left
    (7x7: 48 + 1), so one sum per output-channel block is one FMA chain as long as the
    reduction, run at the FMA's latency, not its throughput; ``parts`` independent chains read
    the weights in the main GEMM's own order (``[K/kb, C, kb]``: consecutive ``c``), so both
    stages share one repacked copy. Channels past a whole number of parts: fewer parts."""
    return next(p for p in (REST_PARTS, 2, 1) if c_in % p == 0)


def _strided_positions(h: int, w: int, strides, pads, c_in: int) -> tuple[int, int, int]:
    """(output height, output width, padded position count) of a strided 1x1 conv."""
    (sh, sw), (pt, pl, pb, pr) = strides, pads
    out_h = (h + pt + pb - 1) // sh + 1
    out_w = (w + pl + pr - 1) // sw + 1
    return out_h, out_w, padded_positions(out_h * out_w, c_in)


def strided_conv2d_te(data, weight, k_out: int, strides, pads):
    """``data`` NCHW, ``weight`` [K_pad, C] of a strided 1x1 conv -> NCHW with ``k_out``
    channels: every ``stride``-th input position copied into the padded rows first
    (``pointwise_data_im2col``, ``[N, C, P_pad]``), then the pointwise GEMM over them."""
    from tvm import te, tirx

    n_b, c_in, h, w = (int(x) for x in data.shape)
    (sh, sw), (pt, pl, _, _) = strides, pads
    out_h, out_w, p_pad = _strided_positions(h, w, strides, pads, c_in)
    p_real = out_h * out_w
    zero = tirx.const(0.0, data.dtype)

    def column(n, c, p):
        q = tirx.min(p, p_real - 1)
        y = q // out_w * sh - pt
        x = q % out_w * sw - pl
        inside = tirx.all(p < p_real, y >= 0, y < h, x >= 0, x < w)
        # clamped indices: the select reads only inside the input (TVM's bound checks see that)
        return tirx.if_then_else(inside, data[n, c, tirx.max(tirx.min(y, h - 1), 0),
                                              tirx.max(tirx.min(x, w - 1), 0)], zero)

    cols = te.compute((n_b, c_in, p_pad), column, name="pointwise_data_im2col")
    return _gemm_rows(lambda n, c, p: cols[n, c, p], weight, k_out, (n_b, c_in, p_pad), (out_h, out_w))


#: the largest subsampled input a strided kernel materializes (bytes); bigger convs keep the direct kernel
IM2COL_MAX_BYTES = 64 << 20


def _strided_facts(call):
    """(weights [K, C], strides, pads) of a strided 1x1 conv the strided kernel takes, else None.

    Only 1x1 kernels: their column matrix is the input subsampled (ResNet's stride-2
    downsample convs, AVX2, one thread: 64 -> 128 at 56x56 0.19 ms vs 0.49 direct, onnxruntime
    0.21-0.25; 256 -> 512 at 14x14 0.27 vs 0.26). The same im2col form for 3x3 and 7x7 windows
    was measured and not kept: the strided copy into columns cost more than the GEMM won
    (SqueezeNet's 3 -> 64 3x3/2 stem: 10 ms vs 0.8 direct; ResNet's 7x7/2 stem: 10.6 vs 7.0;
    its 3x3/2 convs 1.0-1.4x slower). Nor for small outputs (stop 28, Xeon, AVX-512, one thread,
    conv + bias + ReLU alone, the 49 positions as 48 + 1 apart): ResNet-18's 512 -> 512 3x3 at
    7x7 2.08 ms against 1.61 direct (onnxruntime 1.75), its 256 -> 512 3x3/2 1.17 against 0.87
    (0.84): the GEMM's 4608-long reduction streams its columns from L2.
    """
    from graphgen.tune.conv_call import static_conv

    conv = static_conv(call, (1, 1), strided=True)
    if conv is None or conv.strides == (1, 1):
        return None
    n_b, c_in, h, w = conv.data_shape
    out_h, out_w, p_pad = _strided_positions(h, w, conv.strides, conv.pads, c_in)
    if out_h * out_w < P_QUANTUM or n_b * c_in * p_pad * 4 > IM2COL_MAX_BYTES:
        return None
    return conv.weight.reshape(conv.weight.shape[0], c_in), conv.strides, conv.pads


def _facts(call):
    """The [K, C] weights and the input shape (NCHW) of a conv this kernel takes, else None."""
    from graphgen.tune.conv_call import static_conv

    conv = static_conv(call, (1, 1))
    if conv is None or any(conv.pads):
        return None
    if conv.data_shape[2] * conv.data_shape[3] < P_QUANTUM:
        return None  # a 1x1 or 2x2 image: nothing to vectorize along; the direct conv (or dense) is better
    return conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1]), conv.data_shape


#: the GEMM's output channels are padded to a multiple of this (zero weight rows, results
#: never read): its register tiles take whole blocks of channels, and a count like
#: ShuffleNetV2's 58 (2 x 29) leaves only 1- or 2-channel blocks. Measured (AVX2, one thread,
#: 58 -> 58 at 28x28): 0.11-0.12 ms as it is, 0.084 ms computing 60 rows
K_QUANTUM = 4

#: ... or to a multiple of this when that adds at most :data:`K_WIDE_MAX_WASTE` of the rows:
#: 12 rows split into 6-channel blocks, whose 6 x 2-vector tile (12 accumulators, 8 loads per
#: 12 FMAs) beats the 4 x 2 tile a count like 1024, 232 or 1000 allows (8 accumulators, just
#: enough to cover the FMA latency). Measured (AVX2, one thread, conv + bias + ReLU, rows
#: padded to 4 -> 12, onnxruntime): 464 -> 1024 at 7x7 1.005 -> 0.882 ms (0.747),
#: 232 -> 232 at 7x7 0.105 -> 0.093 (0.097), 232 -> 232 at 14x14 0.329 -> 0.291 (0.317),
#: 512 -> 1000 at 13x13 2.351 -> 2.281 (2.475), 64 -> 256 at 13x13 0.103 -> 0.092; but with
#: more rows wasted, 384 -> 64 (to 72) 0.151 -> 0.154, 192 -> 32 (to 36) 0.140 -> 0.153,
#: 960 -> 160 (to 168) 0.266 -> 0.268
K_WIDE_QUANTUM = 12
K_WIDE_MAX_WASTE = 1 / 25
#: AVX-512's: its tiles of 3 vectors (48 positions of a 7x7 image) x 8 channels take blocks of
#: 8, which padding to 12 breaks where a count is a multiple of 8 but not of 12 (1280 -> 1284,
#: 320 -> 324: 6-channel tiles). Measured (Zen 5, one thread, conv + ReLU6, rows padded to 12
#: -> 8): 320 -> 1280 at 7x7 0.218 -> 0.199 ms, 960 -> 320 at 7x7 0.163 -> 0.149; 160 -> 960,
#: 464 -> 1024 at 7x7 and 512 -> 1000 at 13x13 the same
K_WIDE_QUANTUM_AVX512 = 8


def wide_quantum() -> int:
    """K_WIDE_QUANTUM_AVX512 where the kernels are legalized for AVX-512
    (:func:`graphgen.tune.conv_call.legalize_lanes`), else K_WIDE_QUANTUM."""
    from graphgen.tune.conv_call import legalize_lanes

    return K_WIDE_QUANTUM_AVX512 if (legalize_lanes() or 0) >= 16 else K_WIDE_QUANTUM


def padded_rows(k: int, wide: bool = True, quantum: int = K_WIDE_QUANTUM) -> int:
    """The GEMM's row count for ``k`` output channels (see :data:`K_WIDE_QUANTUM`; ``quantum``
    is the wide one)."""
    wide_k = -(-k // quantum) * quantum
    if wide and wide_k - k <= k * K_WIDE_MAX_WASTE:
        return wide_k
    return -(-k // K_QUANTUM) * K_QUANTUM


def pad_rows(w2: np.ndarray, wide: bool = True, quantum: int = K_WIDE_QUANTUM) -> np.ndarray:
    """``w2`` with zero rows appended up to :func:`padded_rows`."""
    extra = padded_rows(len(w2), wide, quantum) - len(w2)
    if extra:
        w2 = np.concatenate([w2, np.zeros((extra, w2.shape[1]), w2.dtype)])
    return np.ascontiguousarray(w2)


def legalize(bb, call, fallback, use: bool | None = None):
    """Pointwise GEMM kernel where the conv qualifies (and :func:`enabled`), else ``fallback(bb, call)``."""
    from tvm import relax

    if not enabled(use):
        return fallback(bb, call)
    facts = _facts(call)
    if facts is None:
        strided = _strided_facts(call)
        if strided is None:
            return fallback(bb, call)
        w2, strides, pads = strided
        return bb.call_te(strided_conv2d_te, call.args[0], relax.const(pad_rows(w2, quantum=wide_quantum())),
                          len(w2), strides, pads, primfunc_name_hint="im2col_conv2d",
                          primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
    w2, (_, _, _, width) = facts
    # image rows that are whole tiles give the GEMM fused into its output (no second pass) if
    # no GEMM row is padded (schedule_pointwise): keep that rather than pad to wider blocks
    fused_rows = width % P_QUANTUM == 0
    weights = pad_rows(w2, wide=not fused_rows, quantum=wide_quantum())
    return bb.call_te(pointwise_conv2d_te, call.args[0], relax.const(weights), len(w2),
                      primfunc_name_hint="pointwise_conv2d", primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
