"""Transposed convolutions as a stride-1 conv over their phases (graphgen.tune.conv_transpose).

The rearranged weight and the geometry are checked against a direct numpy transposed conv;
the compiled kernels against onnxruntime (relative L2 < 1e-5), with constant weights and with
weights passed at run time, for x86 and an aarch64 compile.
"""

import numpy as np
import pytest

from graphgen.builder import GraphBuilder
from graphgen.compile import compile_model, resolve_target, run_library
from graphgen.tune.conv_transpose import phase_geometry, phase_weight
from graphgen.verify import compare, random_inputs, run_onnxruntime

CASES = {
    "fcn_4x4_s2": dict(c=4, k=6, h=5, kernel_size=4, stride=2, padding=1),
    "unet_2x2_s2": dict(c=8, k=8, h=7, kernel_size=2, stride=2, padding=0),          # phase conv is 1x1
    "fcn32s_64x64_s32": dict(c=3, k=5, h=2, kernel_size=64, stride=32, padding=16),
    "k3_s2_outpad": dict(c=4, k=4, h=6, kernel_size=3, stride=2, padding=1, output_padding=1),
    "k5_s3_outpad2": dict(c=4, k=4, h=6, kernel_size=5, stride=3, padding=2, output_padding=2),
    "outpad_past_last_tap": dict(c=3, k=4, h=4, kernel_size=2, stride=2, padding=0, output_padding=1),
    "non_square": dict(c=4, k=3, h=5, kernel_size=(3, 4), stride=(2, 3), padding=(1, 0)),
    "no_bias": dict(c=16, k=16, h=8, kernel_size=2, stride=2, padding=0, bias=False),
}


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _model(case: dict):
    case = dict(case)
    c, k, h = case.pop("c"), case.pop("k"), case.pop("h")
    b = GraphBuilder("conv_transpose")
    x = b.input("input", (1, c, h, h))
    b.output(b.relu(b.conv_transpose(x, k, name="up", **case)), "out")
    return b.build()


def _direct(x, wt, strides, pads, out_pad):
    """Transposed conv by its definition: every input pixel scatters its kernel."""
    c, h, w = x.shape
    _, k, kh, kw = wt.shape
    (sh, sw), (pt, pl, pb, pr) = strides, pads
    full = np.zeros((k, sh * (h - 1) + kh + out_pad[0], sw * (w - 1) + kw + out_pad[1]))
    for iy in range(h):
        for ix in range(w):
            full[:, iy * sh:iy * sh + kh, ix * sw:ix * sw + kw] += np.einsum("c,ckij->kij", x[:, iy, ix], wt)
    return full[:, pt:full.shape[1] - pb, pl:full.shape[2] - pr]


def _via_phases(x, wt, strides, pads, out_pad):
    """The same through phase_weight / phase_geometry: a stride-1 conv, then the interleave."""
    c, h, w = x.shape
    k = wt.shape[1]
    (sh, sw) = strides
    (jh, jw), (ct, cl, cb, cr), (oh, ow) = phase_geometry((h, w), wt.shape[2:], strides, pads, out_pad)
    wp = phase_weight(wt, strides)
    xp = np.pad(x, ((0, 0), (ct, cb), (cl, cr)))
    q, r = xp.shape[1] - jh + 1, xp.shape[2] - jw + 1
    ph = np.zeros((wp.shape[0], q, r))
    for t in range(jh):
        for v in range(jw):
            ph += np.einsum("oc,cqr->oqr", wp[:, :, t, v], xp[:, t:t + q, v:v + r])
    out = np.zeros((k, oh, ow))
    for y in range(oh):
        for xx in range(ow):
            u, z = y + pads[0], xx + pads[1]
            out[:, y, xx] = ph[(np.arange(k) * sh + u % sh) * sw + z % sw, u // sh, z // sw]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_phase_weight_and_geometry_equal_the_transposed_conv(name):
    case = CASES[name]
    kh, kw = _pair(case["kernel_size"])
    strides = _pair(case["stride"])
    p = _pair(case.get("padding", 0))
    pads = (p[0], p[1], p[0], p[1])
    out_pad = _pair(case.get("output_padding", 0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case["c"], case["h"], case["h"]))
    wt = rng.standard_normal((case["c"], case["k"], kh, kw))
    want = _direct(x, wt, strides, pads, out_pad)
    got = _via_phases(x, wt, strides, pads, out_pad)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _graphgen_pipeline(info):
    s = info["schedules"]
    assert s["pipeline"] == "graphgen" and not s.get("database_note"), s
    assert not s.get("default_schedule_failures") and s["plain_lowering"] == 0, s
    return s


@pytest.mark.parametrize("name", list(CASES))
def test_transposed_convs_compile_to_phase_convs_and_match_onnxruntime(name, tmp_path):
    model = _model(CASES[name])
    spec = resolve_target("x86")
    info = compile_model(model, spec, tmp_path / "m.so")
    kinds = _graphgen_pipeline(info)["default_schedule_kinds"]
    # the phase conv is one of graphgen's conv kernels (1x1: the pointwise GEMM), the interleave a copy
    assert ("pointwise conv2d" in kinds) == (name in ("unet_2x2_s2", "no_bias")), kinds
    x = random_inputs(model)
    c = compare(run_library(tmp_path / "m.so", spec, model, x), run_onnxruntime(model, x), ["out"], 1e-5)
    assert c.ok, c.summary()


def test_phase_conv_does_the_multiply_adds_the_output_needs():
    """FCN-32s's layer: the phase conv's weight is [K*32*32, C, 2, 2], not a 64x64 window over a
    32x-dilated input."""
    import tvm
    from tvm import relax

    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune.pipeline import fuse

    case = CASES["fcn32s_64x64_s32"]
    mod = fuse(import_onnx(_model(case)), resolve_target("x86").tvm_target())
    shapes = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: shapes.append(tuple(e.value.shape))
                                    if isinstance(e, tvm.ir.expr.GenericConst) else None)
    assert (case["k"] * 32 * 32, case["c"], 2, 2) in shapes, shapes
    assert not any(len(s) == 4 and s[2:] == (64, 64) for s in shapes), shapes


def test_weights_passed_at_run_time_are_rearranged_by_a_kernel(tmp_path):
    model = _model(CASES["fcn_4x4_s2"])
    spec = resolve_target("x86")
    info = compile_model(model, spec, tmp_path / "m.so", params_as_inputs=True)
    _graphgen_pipeline(info)
    x = random_inputs(model)
    got = run_library(tmp_path / "m.so", spec, model, x, info.get("detached_params"))
    c = compare(got, run_onnxruntime(model, x), ["out"], 1e-5)
    assert c.ok, c.summary()


def test_transposed_convs_compile_for_aarch64(tmp_path):
    from graphgen.compile.elf import check_elf

    spec = resolve_target("arm")
    info = compile_model(_model(CASES["fcn_4x4_s2"]), spec, tmp_path / "m.so")
    _graphgen_pipeline(info)
    ok, _, problem = check_elf(tmp_path / "m.so", "aarch64")
    assert ok, problem
