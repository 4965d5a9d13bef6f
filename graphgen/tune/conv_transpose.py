"""Transposed convolutions as a stride-1 convolution into ``stride^2`` phases, then an interleave.

TOPI computes ``conv2d_transpose`` as a convolution over its input dilated by the stride (zeros
between the pixels) and padded by ``kernel - 1``: a ``k x k`` window per output pixel of which
all but ``(k/s)^2`` taps multiply zeros. FCN-32s's 64x64 / stride 32 layer does 1024x the
multiply-adds it needs: at CI's 32x32 input its x86 library (LLVM opt-level 0) took 147 s for one
inference.

The sub-pixel form (Shi et al., *Real-Time Single Image and Video Super-Resolution Using an
Efficient Sub-Pixel Convolutional Neural Network*, 2016, read backwards): output pixel
``u = q * s + a`` (phase ``a = u mod s``) only ever meets kernel taps ``a, a + s, a + 2s, ...``,
so the full transposed-conv output is

    F[n, k, q*s + a, r*s + b] = sum_{c, j, l} X[n, c, q - j, r - l] * Wt[c, k, j*s + a, l*s + b]

with ``j, l < J = ceil(k / s)``: per phase ``(a, b)`` an ordinary ``J x J`` convolution. All
``s^2`` phases are one convolution with ``K * s^2`` output channels (the kernel flipped, padded
by ``J - 1``), and the output is its channels interleaved into pixels (DepthToSpace, CRD order)
and cropped by the transposed conv's padding. The convolution then gets graphgen's conv kernels
(a 1x1 one - U-Net's 2x2 / stride 2 layers - the pointwise GEMM) and the interleave + crop
(with the bias and any fused tail) is one injective kernel.

Applies to NCHW fp32 ``relax.nn.conv2d_transpose`` with one group and dilation 1. Constant
weights are rearranged at compile time; weights passed at run time (``params_as_inputs``) by a
small kernel each call.
"""

from __future__ import annotations

import numpy as np


def _facts(call):
    """(kernel (kh, kw), strides, pads (top, left, bottom, right), output padding) of a
    transposed conv this rewrite takes, else None."""
    from tvm import relax

    attrs = call.attrs
    data, weight = call.args
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "IOHW", "NCHW"):
        return None
    if int(attrs.groups) != 1 or [int(d) for d in attrs.dilation] != [1, 1]:
        return None
    if str(attrs.out_dtype) not in ("", "float32", "void", "None"):
        return None
    for t in (data.ty, weight.ty):
        if not isinstance(t, relax.type.TensorType) or str(t.dtype) != "float32" or t.shape is None:
            return None
    try:
        d_shape = [int(x) for x in data.ty.shape]
        w_shape = [int(x) for x in weight.ty.shape]
    except TypeError:  # symbolic dimensions
        return None
    if len(d_shape) != 4 or len(w_shape) != 4:
        return None
    strides = tuple(int(s) for s in attrs.strides)
    pads = [int(p) for p in attrs.padding]
    if len(pads) == 2:
        pads = pads * 2
    out_pad = tuple(int(p) for p in attrs.output_padding)
    if len(strides) != 2 or len(pads) != 4 or len(out_pad) != 2 or min(pads) < 0:
        return None
    if strides == (1, 1):
        return None  # no zeros to skip: TOPI's form is already a plain convolution
    return (w_shape[2], w_shape[3]), strides, tuple(pads), out_pad


def phase_geometry(in_hw, kernel, strides, pads, out_pad):
    """(J per axis, the phase conv's pads (top, left, bottom, right), output height and width).

    The phase conv's output has ``in + J - 1 (+ extra)`` rows per axis; ``extra`` covers an
    output padding that reaches past the last row any tap writes (those rows get only the bias).
    """
    j, conv_pads_lo, conv_pads_hi, out_hw = [], [], [], []
    for i in range(2):
        n, k, s = in_hw[i], kernel[i], strides[i]
        lo, hi = pads[i], pads[i + 2]
        jj = -(-k // s)
        out = s * (n - 1) + out_pad[i] + k - lo - hi
        rows = n + jj - 1
        extra = max(0, -(-(lo + out - rows * s) // s))
        j.append(jj)
        conv_pads_lo.append(jj - 1)
        conv_pads_hi.append(jj - 1 + extra)
        out_hw.append(out)
    return tuple(j), (conv_pads_lo[0], conv_pads_lo[1], conv_pads_hi[0], conv_pads_hi[1]), tuple(out_hw)


def phase_weight(wt: np.ndarray, strides) -> np.ndarray:
    """Transposed-conv weight ``[C, K, kh, kw]`` -> phase conv weight ``[K * sh * sw, C, Jh, Jw]``:
    ``W[(k*sh + a)*sw + b, c, t, v] = Wt[c, k, (Jh-1-t)*sh + a, (Jw-1-v)*sw + b]`` (zero past the kernel)."""
    c, k, kh, kw = wt.shape
    sh, sw = strides
    jh, jw = -(-kh // sh), -(-kw // sw)
    padded = np.zeros((c, k, jh * sh, jw * sw), wt.dtype)
    padded[:, :, :kh, :kw] = wt
    w6 = padded.reshape(c, k, jh, sh, jw, sw)[:, :, ::-1, :, ::-1, :]  # taps flipped: j -> J-1-t
    return np.ascontiguousarray(w6.transpose(1, 3, 5, 0, 2, 4).reshape(k * sh * sw, c, jh, jw))


def _phase_weight_te(wt, strides):
    """:func:`phase_weight` as a kernel, for weights passed at run time."""
    from tvm import te, tirx

    c, k, kh, kw = (int(x) for x in wt.shape)
    sh, sw = strides
    jh, jw = -(-kh // sh), -(-kw // sw)

    def value(o, ci, t, v):
        ko, a, b = o // (sh * sw), o // sw % sh, o % sw
        ky, kx = (jh - 1 - t) * sh + a, (jw - 1 - v) * sw + b
        inside = tirx.all(ky < kh, kx < kw)
        return tirx.if_then_else(inside, wt[ci, ko, tirx.min(ky, kh - 1), tirx.min(kx, kw - 1)],
                                 tirx.const(0.0, wt.dtype))

    return te.compute((k * sh * sw, c, jh, jw), value, name="conv_transpose_phase_weight")


def _interleave_te(phases, k_out: int, strides, pads, out_hw):
    """Phase conv output ``[N, K*sh*sw, Q, R]`` -> the transposed conv's ``[N, K, OH, OW]``:
    DepthToSpace (CRD) and the crop by the transposed conv's leading pads, in one pass."""
    from tvm import te

    n_b = int(phases.shape[0])
    sh, sw = strides
    top, left = pads[0], pads[1]

    def value(n, k, y, x):
        u, w = y + top, x + left
        return phases[n, (k * sh + u % sh) * sw + w % sw, u // sh, w // sw]

    return te.compute((n_b, k_out, *out_hw), value, name="conv_transpose_interleave")


def legalize(bb, call, conv_legalize, fallback):
    """Sub-pixel form of a ``relax.nn.conv2d_transpose`` call where :func:`_facts` takes it (the
    phase conv legalized by ``conv_legalize(bb, conv_call)``: graphgen's conv kernels), else
    ``fallback(bb, call)`` (TVM's)."""
    import tvm
    from tvm import relax

    facts = _facts(call)
    if facts is None:
        return fallback(bb, call)
    kernel, strides, pads, out_pad = facts
    data, weight = call.args
    in_hw = [int(data.ty.shape[i]) for i in (2, 3)]
    k_out = int(weight.ty.shape[1])
    _, conv_pads, out_hw = phase_geometry(in_hw, kernel, strides, pads, out_pad)
    if isinstance(weight, tvm.ir.expr.Constant):
        w_phase = relax.const(phase_weight(weight.value.numpy(), strides))
    else:
        w_phase = bb.emit(bb.call_te(_phase_weight_te, weight, strides,
                                     primfunc_name_hint="conv_transpose_phase_weight"))
    conv = bb.normalize(relax.op.nn.conv2d(data, w_phase, strides=1, padding=conv_pads, dilation=1, groups=1,
                                           data_layout="NCHW", kernel_layout="OIHW", out_layout="NCHW"))
    phases = bb.emit(conv_legalize(bb, conv))
    return bb.call_te(_interleave_te, phases, k_out, strides, pads, out_hw,
                      primfunc_name_hint="conv_transpose_interleave")
