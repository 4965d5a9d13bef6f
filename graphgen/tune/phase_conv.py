"""Strided convs over few input channels (image stems) on an input split by column phase, on CPU targets.

A stride-``s`` conv reads input column ``s * x + rx`` for output column ``x``: along the
output row its window taps are ``s`` floats apart, so no tap is one vector load. graphgen's
direct conv schedule therefore vectorizes such a conv over output channels instead, with a
channels-last register tile written back transposed, one float at a time. With 3 input
channels the reduction is only ``3 x KH x KW`` long, and those scalar stores cost as much as
the multiply-adds. Measured (AVX-512, one thread, in the model): SqueezeNet 1.1's 3 -> 64 3x3/2
stem (111 x 111 outputs, whose width splits into no tile but 3 or 37 columns) 1.48 ms against
onnxruntime's 0.54; MobileNetV2's 3 -> 32 3x3/2 0.59 against 0.47.

Here the input is copied once (a few hundred KB for a 224 x 224 image) into its ``s`` column
phases, ``[N, C, rows, s, columns / s]``: phase ``p`` holds columns ``p, p + s, p + 2 s, ...``,
so tap ``rx`` of output columns ``x .. x + 15`` is 16 consecutive floats of phase ``rx % s``
from column ``x + rx // s``. The output row is padded to a multiple of :data:`W_QUANTUM`
columns, so every register tile is whole vectors: ``cb`` output channels (weights broadcast)
x ``hb`` rows x ``nv`` vectors of columns, stored into the NCHW output rows as vectors.
Stages of the kernel (one TIR function; FuseOps fuses the bias and activation into it):

    phase_conv_data   [N, C, rows, s, columns / s], zero padding included
    phase_conv        [N, K, OH, OW_pad]
    phase_conv_out    [N, K, OH, OW], the rows cropped (the fused tail runs here)

Scratch measurement of this form (AVX-512, one thread, conv + bias + ReLU, copy included,
8 channels x 1 vector tiles): SqueezeNet's stem 0.49 ms, MobileNetV2's 0.25, ShuffleNetV2's
3 -> 24 0.22 (0.34 before), ResNet's 7x7/2 3 -> 64 2.1-2.3 (2.9 before, onnxruntime 2.2).
:func:`graphgen.tune.defaults.schedule_phase_conv` is its default schedule. Used for convs
with a column stride of 2 or more, a window wider than 1, one group and at most
:data:`MAX_IN_CHANNELS` input channels (NCHW fp32, constant weights). Convs over more
channels keep the direct schedule: their reduction is long enough to hide the write-back
(ResNet-18's 64 -> 128 3x3/2 at 56 x 56: this form 1.25 ms, scratch, not kept).

Stride-1 depthwise convs (:func:`phase_depthwise_te`, block ``phase_depthwise``) take the same
form with one phase, each output channel reading its own input channel: the padded copy is
contiguous rows (0.054 ms for 144 x 56 x 56), where graphgen's channel-blocked depthwise kernel
transposes its input into channel blocks and its tiles back (144 x 56 x 56 with bias and
ReLU, AVX-512, one thread: 0.307 ms that way, 0.17 this way).
"""

from __future__ import annotations

from graphgen.tune.conv_call import OUT_ELEMWISE_FUSABLE

#: output rows are padded to a multiple of this many columns (one AVX-512 vector, two AVX2)
W_QUANTUM = 16

#: the most input channels a conv may have to take this kernel (RGB, RGBA, grey stems)
MAX_IN_CHANNELS = 4


def _out_size(size: int, before: int, after: int, window: int, stride: int) -> int:
    return (size + before + after - window) // stride + 1


def phase_conv2d_te(data, weight, strides, pads):
    """``data`` NCHW, ``weight`` OIHW -> NCHW: the stages in the module docstring."""
    from tvm import te

    n_b, c_in, h, w = (int(x) for x in data.shape)
    k_out, _, kh, kw = (int(x) for x in weight.shape)
    (sh, sw), (pt, pl, pb, pr) = strides, pads
    out_h = _out_size(h, pt, pb, kh, sh)
    out_w = _out_size(w, pl, pr, kw, sw)
    w_pad = -(-out_w // W_QUANTUM) * W_QUANTUM
    split = _phases(data, strides, pads, (kh, kw), out_h, w_pad)
    rc = te.reduce_axis((0, c_in), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    conv = te.compute((n_b, k_out, out_h, w_pad), lambda n, k, y, x: te.sum(
        weight[k, rc, ry, rx] * split[n, rc, y * sh + ry, rx % sw, x + rx // sw], axis=[rc, ry, rx]),
        name="phase_conv")
    return te.compute((n_b, k_out, out_h, out_w), lambda n, k, y, x: conv[n, k, y, x], name="phase_conv_out")


def phase_depthwise_te(data, weight, strides, pads):
    """``data`` NCHW, ``weight`` [C, 1, KH, KW] of a stride-1 depthwise conv -> NCHW: as
    :func:`phase_conv2d_te` with one phase, each output channel reading its own input channel
    (``phase_depthwise``)."""
    from tvm import te

    n_b, c_in, h, w = (int(x) for x in data.shape)
    _, _, kh, kw = (int(x) for x in weight.shape)
    (sh, sw), (pt, pl, pb, pr) = strides, pads
    out_h = _out_size(h, pt, pb, kh, sh)
    out_w = _out_size(w, pl, pr, kw, sw)
    # rows padded to whole 8-lane vectors only (56 columns: 7 AVX2 vectors or AVX-512 halves, no
    # crop; padded to 64 and cropped, 144 x 56 x 56 took 0.42 ms against 0.17)
    w_pad = -(-out_w // DEPTHWISE_W_QUANTUM) * DEPTHWISE_W_QUANTUM
    split = _phases(data, strides, pads, (kh, kw), out_h, w_pad)
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    conv = te.compute((n_b, c_in, out_h, w_pad), lambda n, k, y, x: te.sum(
        weight[k, 0, ry, rx] * split[n, k, y * sh + ry, rx % sw, x + rx // sw], axis=[ry, rx]),
        name="phase_depthwise")
    return te.compute((n_b, c_in, out_h, out_w), lambda n, k, y, x: conv[n, k, y, x], name="phase_conv_out")


def _phases(data, strides, pads, window, out_h: int, w_pad: int):
    """``phase_conv_data``: ``data`` copied into its column phases, zero padding included."""
    from tvm import te, tirx

    n_b, c_in, h, w = (int(x) for x in data.shape)
    (sh, sw), (pt, pl, _, _) = strides, pads
    kh, kw = window
    rows = (out_h - 1) * sh + kh
    cols = w_pad + (kw - 1) // sw  # per phase: the padded row's last tile and its window
    zero = tirx.const(0.0, data.dtype)

    def phase(n, c, y, p, j):
        iy = y - pt
        ix = j * sw + p - pl
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        # clamped indices: the select reads only inside the input (TVM's bound checks see that)
        return tirx.if_then_else(inside, data[n, c, tirx.max(tirx.min(iy, h - 1), 0),
                                              tirx.max(tirx.min(ix, w - 1), 0)], zero)

    return te.compute((n_b, c_in, rows, sw, cols), phase, name="phase_conv_data")


#: a depthwise conv's output rows are padded to a multiple of this many columns
DEPTHWISE_W_QUANTUM = 8

#: depthwise convs narrower than this keep graphgen's channel-blocked kernel. Measured
#: (AVX-512, one thread, conv + bias + ReLU): 960 x 7 x 7 0.028 ms channel-blocked against 0.040
#: on rows of 8, 232 x 7 x 7 0.010 against 0.018; at 14 x 14 they tie (384: 0.047 / 0.045)
DEPTHWISE_MIN_WIDTH = 14


def _depthwise_facts(call):
    """(weights, strides, pads) of a stride-1 depthwise conv this kernel takes, else None.

    Stride 2 is not taken: its phase copy reads every other column, which TVM assembles one
    float at a time (measured: 1.6 ms for MobileNetV2's 96 x 112 x 112 input, against 0.05
    for a stride-1 padded copy of a 144 x 56 x 56 one).
    """
    from graphgen.tune.conv_call import static_conv

    conv = static_conv(call, None, depthwise=True)
    if conv is None or conv.weight.shape[3] < 2:
        return None
    n_b, c_in, h, w = conv.data_shape
    (pt, pl, pb, pr), (kh, kw) = conv.pads, conv.weight.shape[2:]
    if _out_size(h, pt, pb, kh, 1) < 1 or _out_size(w, pl, pr, kw, 1) < DEPTHWISE_MIN_WIDTH:
        return None
    return conv.weight, conv.strides, conv.pads


def _facts(call):
    """(weights OIHW, strides, pads) of a conv this kernel takes, else None."""
    from graphgen.tune.conv_call import static_conv

    conv = static_conv(call, None, strided=True)
    if conv is None or conv.strides[1] < 2 or conv.weight.shape[3] < 2:
        return None
    n_b, c_in, h, w = conv.data_shape
    if c_in > MAX_IN_CHANNELS:
        return None
    (pt, pl, pb, pr), (kh, kw) = conv.pads, conv.weight.shape[2:]
    if _out_size(h, pt, pb, kh, conv.strides[0]) < 1 or _out_size(w, pl, pr, kw, conv.strides[1]) < W_QUANTUM // 2:
        return None  # a row shorter than half a tile: mostly padding; the direct conv is better
    return conv.weight, conv.strides, conv.pads


def legalize(bb, call, fallback):
    """The phase-split kernel where the conv qualifies, else ``fallback(bb, call)``."""
    depthwise = _depthwise_facts(call)
    if depthwise is not None:
        _, strides, pads = depthwise
        return bb.call_te(phase_depthwise_te, call.args[0], call.args[1], strides, pads,
                          primfunc_name_hint="phase_depthwise", primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
    facts = _facts(call)
    if facts is None:
        return fallback(bb, call)
    _, strides, pads = facts
    return bb.call_te(phase_conv2d_te, call.args[0], call.args[1], strides, pads,
                      primfunc_name_hint="phase_conv2d", primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
