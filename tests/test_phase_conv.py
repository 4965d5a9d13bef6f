"""Strided convs over few input channels on a phase-split input (graphgen.tune.phase_conv),
against onnxruntime (fp32, relative L2 < 1e-5)."""

import pytest

from graphgen.compile import resolve_target
from graphgen.testing import (compile_and_compare, every_knob_at, parallel_loops, scheduled_kernel_tir,
                              single_conv_model)
from graphgen.tune import phase_conv

TOL = 1e-5
KIND = "conv2d (phase-split)"


def _check(model, tmp_path, target="x86"):
    return compile_and_compare(model, tmp_path, target, TOL)


CASES = {
    # SqueezeNet 1.1's stem: no padding, 17 output columns (a last tile of one column)
    "squeezenet_stem": dict(c=3, k=64, h=35, padding=0),
    # MobileNetV2's and ShuffleNetV2's stems: padded, whole tiles of 16 columns
    "mobilenet_stem": dict(c=3, k=32, h=32),
    "shufflenet_stem_24": dict(c=3, k=24, h=32),
    # ResNet's 7x7/2 stem: a window of 7 over two phases (taps 0..3 of one, 0..2 of the other)
    "resnet_stem_7x7": dict(c=3, k=64, h=40, kernel=7, padding=3),
    "stride3_rect_odd_channels": dict(c=3, k=10, h=29, w=50, stride=3),
    "grey_batch2_nobias": dict(c=1, k=16, h=30, batch=2, bias=False),
    "rgba_5x5_no_relu": dict(c=4, k=8, h=36, kernel=5, padding=2, relu=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_phase_split_kernels_match_onnxruntime(name, tmp_path):
    kw = dict(CASES[name])
    kw.setdefault("stride", 2)
    kinds, c = _check(single_conv_model(**kw), tmp_path)
    assert kinds == {KIND: 1}, kinds
    assert c.ok, c.summary()


@pytest.mark.parametrize("kwargs", [
    dict(c=8, k=16, h=32, stride=2),            # 8 input channels: the direct conv's reduction is long enough
    dict(c=3, k=16, h=32, stride=1),            # stride 1: its window taps are whole row vectors already
    dict(c=3, k=16, h=13, stride=2),            # 7 output columns: less than half a tile
    dict(c=3, k=16, h=32, stride=2, kernel=1, padding=0),  # strided 1x1: the subsampled pointwise GEMM
])
def test_other_convs_keep_their_kernels(kwargs, tmp_path):
    kinds, c = _check(single_conv_model(**kwargs), tmp_path)
    assert KIND not in kinds, kinds
    assert c.ok, c.summary()


def test_wrong_weights_are_caught(tmp_path, monkeypatch):
    """The comparison can fail: the kernel built from slightly different weights."""
    from tvm import relax

    def scaled(bb, call, fallback):
        if phase_conv._facts(call) is None:
            return fallback(bb, call)
        w, strides, pads = phase_conv._facts(call)
        return bb.call_te(phase_conv.phase_conv2d_te, call.args[0], relax.const(w * 1.001), strides, pads,
                          primfunc_name_hint="phase_conv2d",
                          primfunc_attrs={"op_pattern": phase_conv.OUT_ELEMWISE_FUSABLE})

    monkeypatch.setattr(phase_conv, "legalize", scaled)
    kinds, c = _check(single_conv_model(3, 16, 32, stride=2), tmp_path)
    assert kinds == {KIND: 1}, kinds
    assert not c.ok


@pytest.mark.parametrize("option", [0, 2, 5])
@pytest.mark.parametrize("target", ["x86", "x86-64-v3"])
def test_every_tile_option_matches_onnxruntime(target, option, tmp_path, monkeypatch):
    """Each register tile the tuner may pick (AVX-512 and AVX2 lanes; 32 columns padded: tiles
    of one, two or four vectors), checked against onnxruntime."""
    seen = every_knob_at(option, monkeypatch)
    kinds, c = _check(single_conv_model(3, 24, 63, stride=2, padding=0), tmp_path, target)
    assert kinds == {KIND: 1}, kinds
    assert c.ok, c.summary()
    assert seen.get("phase_conv.tile", 0) > 2, seen


@pytest.mark.parametrize("target", ["arm", "armv7", "avx512"])
def test_phase_split_kernels_compile_for_neon_and_avx512(target, tmp_path):
    from graphgen.compile.elf import check_elf

    spec = resolve_target(target)
    kinds, _ = _check(single_conv_model(3, 32, 35, stride=2, padding=0), tmp_path, target)
    assert kinds == {KIND: 1}, kinds
    if not spec.host_runnable:
        ok, _, problem = check_elf(tmp_path / "m.so", spec.arch)
        assert ok, problem


@pytest.mark.parametrize("target, threads, tile", [
    ("avx512", 1, (8, 3)),      # 32 registers: 8 channels x 3 rows (24 accumulators)
    ("avx512", 2, (8, 3)),      # 18 rows: 6 row blocks of 3 still split between two threads
    ("x86-64-v3", 1, (8, 1)),   # 16 registers: 8 accumulators, one row, as before
])
def test_strided_stems_take_several_rows_per_tile_on_32_registers(target, threads, tile):
    tir = scheduled_kernel_tir(single_conv_model(3, 64, 37, padding=0, stride=2), threads, target)
    cb, hb = tile
    assert f"for k_1 in T.unroll(T.int64({cb}))" in tir
    assert f"for y_1 in T.unroll(T.int64({hb}))" in tir


# -- stride-1 depthwise convs on rows (phase_depthwise) ---------------------------------------

DW_KIND = "depthwise conv2d (rows)"

DW_CASES = {
    # MobileNetV2's 144 x 56 x 56: rows of 7 half vectors (AVX-512) or 7 AVX2 vectors, no crop
    "mobilenet_56": dict(c=24, h=56),
    # 28 and 14 columns: rows padded to 32 and 16, cropped
    "mobilenet_28": dict(c=32, h=28),
    "shufflenet_14_no_relu": dict(c=20, h=14, relu=False),
    # 112 columns: 7 whole AVX-512 vectors
    "mobilenet_112_batch2": dict(c=8, h=112, w=40, batch=2),
    # EfficientNet / MnasNet: 5x5 windows; a residual add fused into the tail
    "five_by_five_residual": dict(c=16, h=24, kernel=5, padding=2, residual=True),
    "no_bias_no_padding": dict(c=12, h=18, padding=0, bias=False),
}


@pytest.mark.parametrize("name", list(DW_CASES))
def test_depthwise_row_kernels_match_onnxruntime(name, tmp_path):
    kw = dict(DW_CASES[name])
    c = kw.pop("c")
    kinds, cmp = _check(single_conv_model(c, c, groups=c, **kw), tmp_path)
    assert kinds == {DW_KIND: 1}, kinds
    assert cmp.ok, cmp.summary()


@pytest.mark.parametrize("kwargs, threads, per_block", [
    (dict(c=24, h=56), 1, True),             # 56 columns: each channel block's padded rows copied in the loop
    (dict(c=24, h=28), 2, True),
    (dict(c=24, h=14), 1, False),            # 3x3 at 14 columns: the whole padded input first (faster there)
    (dict(c=24, h=14, kernel=5, padding=2), 1, True),  # 5x5 windows: per block at 14 columns too
    (dict(c=4, h=56), 2, False),             # one channel block: too few for two threads alone
])
def test_depthwise_rows_copy_each_channel_blocks_input_in_the_parallel_loop(kwargs, threads, per_block):
    """Per block: the conv's parallel loop is over channel blocks alone, the padded copy inside it
    (it stays in the cache); else the whole copy comes first, outside the conv's loop."""
    kw = dict(kwargs)
    c = kw.pop("c")
    tir = scheduled_kernel_tir(single_conv_model(c, c, groups=c, **kw), threads)
    conv_loop = parallel_loops(tir)[-1]
    assert conv_loop == ("n_k_0_fused" if per_block else "n_k_0_y_0_fused"), conv_loop
    copied_inside = tir.index('T.sblock("phase_conv_data")') > tir.index(f"for {conv_loop} in T.parallel")
    assert copied_inside == per_block


@pytest.mark.parametrize("kwargs", [
    dict(c=16, k=16, h=56, stride=2, groups=16),  # stride 2: its copy would read every other column
    dict(c=16, k=16, h=7, groups=16),             # 7 columns: rows padded to 16 would be mostly padding
    dict(c=16, k=32, h=28, groups=16),            # two outputs per channel: not depthwise
    dict(c=16, k=16, h=28, groups=8),             # grouped
])
def test_other_grouped_convs_keep_their_kernels(kwargs, tmp_path):
    kinds, c = _check(single_conv_model(**kwargs), tmp_path)
    assert DW_KIND not in kinds, kinds
    assert c.ok, c.summary()


def test_wrong_depthwise_weights_are_caught(tmp_path, monkeypatch):
    from tvm import relax

    def scaled(bb, call, fallback):
        facts = phase_conv._depthwise_facts(call)
        if facts is None:
            return fallback(bb, call)
        w, strides, pads = facts
        return bb.call_te(phase_conv.phase_depthwise_te, call.args[0], relax.const(w * 1.001), strides, pads,
                          primfunc_name_hint="phase_depthwise",
                          primfunc_attrs={"op_pattern": phase_conv.OUT_ELEMWISE_FUSABLE})

    monkeypatch.setattr(phase_conv, "legalize", scaled)
    kinds, c = _check(single_conv_model(16, 16, 28, groups=16), tmp_path)
    assert kinds == {DW_KIND: 1}, kinds
    assert not c.ok


@pytest.mark.parametrize("option", [0, 1, 3, 5])
@pytest.mark.parametrize("target", ["x86", "x86-64-v3"])
def test_every_depthwise_tile_option_matches_onnxruntime(target, option, tmp_path, monkeypatch):
    seen = every_knob_at(option, monkeypatch)
    kinds, c = _check(single_conv_model(8, 8, 24, w=32, groups=8), tmp_path, target)
    assert kinds == {DW_KIND: 1}, kinds
    assert c.ok, c.summary()
    assert seen.get("phase_conv.tile", 0) > 5, seen


@pytest.mark.parametrize("target", ["arm", "armv7", "avx512"])
def test_depthwise_row_kernels_compile_for_neon_and_avx512(target, tmp_path):
    from graphgen.compile.elf import check_elf

    spec = resolve_target(target)
    kinds, _ = _check(single_conv_model(16, 16, 28, groups=16), tmp_path, target)
    assert kinds == {DW_KIND: 1}, kinds
    if not spec.host_runnable:
        ok, _, problem = check_elf(tmp_path / "m.so", spec.arch)
        assert ok, problem
