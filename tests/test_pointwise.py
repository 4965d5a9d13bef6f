"""1x1 convs as a GEMM over the flattened image (graphgen.tune.pointwise), against onnxruntime
(fp32, relative L2 < 1e-5)."""

import re

import numpy as np
import pytest

from graphgen.compile import resolve_target
from graphgen.testing import compile_and_compare, every_knob_at, single_conv_model
from graphgen.tune import pointwise

TOL = 1e-5


def _model(c, k, h, w=None, *, act=True, **kw):
    return single_conv_model(c, k, h, w, kernel=1, padding=kw.pop("padding", 0), relu=act, **kw)


def _check(model, tmp_path, target="x86"):
    return compile_and_compare(model, tmp_path, target, TOL)


CASES = {
    "mobilenet_expand_14": dict(c=96, k=576, h=14),            # 196 positions: padded to 208
    "squeezenet_classifier_13": dict(c=64, k=100, h=13),       # 169 positions, odd channel count
    "whole_vectors_56": dict(c=24, k=144, h=56),               # 3136 positions: no padding stage
    "project_residual_7": dict(c=32, k=32, h=7, residual=True, act=False),
    "shufflenet_58": dict(c=58, k=58, h=28),                   # GEMM rows padded to 60
    "shufflenet_232_7": dict(c=40, k=232, h=7),                # rows padded to 240: 6-channel blocks
    "padded_rows_wide_112": dict(c=8, k=30, h=112),            # 32 rows: no fused single pass
    "batch2_rect_nobias": dict(c=16, k=24, h=10, w=6, batch=2, bias=False),
    "mobilenet_expand_112": dict(c=16, k=96, h=112),           # AVX-512: one-vector tiles in the rows
    "shufflenet_464_1024_7": dict(c=64, k=1024, h=7),          # 49 positions: 48 + 1 computed apart
    "split_5x5_batch2": dict(c=24, k=40, h=5, batch=2),        # 25 positions: 16 + 9
    "split_9x9_residual": dict(c=16, k=16, h=9, residual=True),  # 81 positions: 80 + 1
    "squeezenet_squeeze_55": dict(c=128, k=16, h=55),          # 3025 = 3024 + 1: more in than out
    "squeezenet_squeeze_13": dict(c=512, k=64, h=13),          # 169 = 160 + 9
}


@pytest.mark.parametrize("name", list(CASES))
def test_pointwise_kernels_match_onnxruntime(name, tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    kinds, c = _check(_model(**CASES[name]), tmp_path)
    assert kinds == {"pointwise conv2d": 1}, kinds
    assert c.ok, c.summary()


@pytest.mark.parametrize("kwargs", [dict(c=16, k=16, h=14, padding=1), dict(c=64, k=64, h=3),
                                    dict(c=16, k=16, h=6, stride=2)])  # 3x3 outputs: too few positions
def test_other_1x1_convs_keep_the_direct_schedule(kwargs, tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    kinds, c = _check(_model(**kwargs), tmp_path)
    assert "pointwise conv2d" not in kinds, kinds
    assert c.ok, c.summary()


@pytest.mark.parametrize("kwargs", [
    dict(c=64, k=128, h=56, stride=2),                          # ResNet's downsample: 28x28, whole tiles
    dict(c=16, k=24, h=15, w=9, stride=2),                      # 8x5 = 40 positions, padded to 48
    dict(c=8, k=16, h=13, stride=3, batch=2, bias=False),       # stride 3, batch 2
    dict(c=8, k=30, h=14, stride=2),                            # GEMM rows padded to 32
])
def test_strided_1x1_convs_are_gemms_over_the_subsampled_input(kwargs, tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    kinds, c = _check(_model(**kwargs), tmp_path)
    assert kinds == {"pointwise conv2d (strided)": 1}, kinds
    assert c.ok, c.summary()


def test_pointwise_can_be_turned_off_and_the_choice_is_recorded_and_replayed(tmp_path, monkeypatch):
    """``GRAPHGEN_POINTWISE=0`` keeps the direct conv; the manifest's ``build.schedules.pointwise``
    records the choice, and a build "like" it (the armv7 kernel check's host reference) gets
    the same kernels whatever the environment says then."""
    from graphgen.compile import compile_model
    from graphgen.emulate.kernels import _schedule_as

    monkeypatch.setenv("GRAPHGEN_POINTWISE", "0")
    model = _model(c=32, k=64, h=14)
    kinds, c = _check(model, tmp_path)
    assert kinds == {"conv2d": 1}, kinds
    assert c.ok
    spec = resolve_target("x86")
    off = compile_model(model, spec, tmp_path / "off.so")["schedules"]
    assert off["pointwise"] is False
    monkeypatch.delenv("GRAPHGEN_POINTWISE")
    on = compile_model(model, spec, tmp_path / "on.so")["schedules"]
    assert on["pointwise"] is True and on["default_schedule_kinds"] == {"pointwise conv2d": 1}
    monkeypatch.setenv("GRAPHGEN_POINTWISE", "1")
    like_off = compile_model(model, spec, tmp_path / "like.so", **_schedule_as(spec, off))["schedules"]
    assert like_off["default_schedule_kinds"] == {"conv2d": 1} and like_off["pointwise"] is False
    # manifests from before the pointwise kernels (no "winograd" entry either): none
    assert _schedule_as(spec, {"pipeline": "graphgen"})["pointwise"] is False
    assert _schedule_as(spec, {"pipeline": "graphgen", "winograd": "auto"})["pointwise"] is True


def test_wrong_weights_are_caught(tmp_path, monkeypatch):
    """The comparison can fail: the kernel built from slightly different weights."""
    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    real = pointwise._facts

    def scaled(call):
        facts = real(call)
        return None if facts is None else (facts[0] * np.float32(1.001), facts[1])

    monkeypatch.setattr(pointwise, "_facts", scaled)
    kinds, c = _check(_model(c=32, k=32, h=14), tmp_path)
    assert kinds == {"pointwise conv2d": 1}
    assert not c.ok


@pytest.mark.parametrize("target", ["arm", "armv7", "avx512"])
def test_pointwise_kernels_compile_for_neon_and_avx512(target, tmp_path, monkeypatch):
    from graphgen.compile.elf import check_elf

    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    spec = resolve_target(target)
    kinds, _ = _check(_model(c=32, k=48, h=13), tmp_path, target)
    assert kinds == {"pointwise conv2d": 1}, kinds
    if not spec.host_runnable:
        ok, _, problem = check_elf(tmp_path / "m.so", spec.arch)
        assert ok, problem


def test_gemm_rows_are_padded_with_zeros_to_whole_channel_blocks():
    import numpy as np

    from graphgen.tune.pointwise import K_QUANTUM, pad_rows, padded_rows

    w = np.arange(58 * 3, dtype=np.float32).reshape(58, 3)
    p = pad_rows(w)
    assert p.shape == (60, 3) and p.shape[0] % K_QUANTUM == 0
    assert np.array_equal(p[:58], w) and not p[58:].any()
    assert pad_rows(w[:56]).shape == (56, 3)  # 60 would waste 4 of 56 rows
    # 6-channel blocks where a multiple of 12 wastes at most 1/25 of the rows
    assert [padded_rows(k) for k in (1024, 1000, 232, 116, 96, 160, 64, 16, 30)] == \
        [1032, 1008, 240, 120, 96, 160, 64, 16, 32]
    assert padded_rows(1024, wide=False) == 1024 and padded_rows(1000, wide=False) == 1000
    # AVX-512: 8-channel blocks (multiples of 8 as they are)
    assert [padded_rows(k, quantum=8) for k in (1280, 320, 1024, 1000, 232, 116, 58, 30)] == \
        [1280, 320, 1024, 1000, 232, 120, 60, 32]
    for target, quantum in (("avx512", 8), ("x86-64-v3", 12), ("arm", 12)):
        with resolve_target(target).tvm_target():
            assert pointwise.wide_quantum() == quantum, target


def test_one_vector_tiles_in_the_output_rows_only_with_avx512_vectors():
    """Computed inside the output rows, a one-vector tile of about 8 channels comes first where
    a vector is 16 lanes; several-vector tiles keep their order before it; 8 lanes: none."""
    from graphgen.tune.defaults import _fused_pointwise_tiles

    tiles = [(2, 12), (1, 24), (2, 8), (1, 16), (1, 12), (1, 8), (1, 6), (1, 4), (1, 1)]
    assert _fused_pointwise_tiles(tiles, 16) == [(2, 12), (2, 8), (1, 8), (1, 6), (1, 12), (1, 4), (1, 1),
                                                 (1, 16), (1, 24)]
    assert _fused_pointwise_tiles(tiles, 8) == [(2, 12), (2, 8)]


def _scheduled_pointwise(model, target_name="x86"):
    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune.pipeline import fuse, schedule_kernels
    from tvm import tirx

    target = resolve_target(target_name).tvm_target()
    with target:
        mod = schedule_kernels(fuse(import_onnx(model), target), target)
    return [f for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and ("pointwise" in gv.name_hint or "im2col" in gv.name_hint)]


def _with_knobs(monkeypatch, choices: dict) -> None:
    """Default schedules built with the knob options ``choices`` (the rest: the defaults)."""
    from graphgen.tune import defaults
    from graphgen.tune.defaults import Knobs

    original = defaults.default_schedule
    monkeypatch.setattr(defaults, "default_schedule",
                        lambda func, isa, mod=None, knobs=None, **kw: original(func, isa, mod=mod, **kw,
                                                                               knobs=Knobs(choices)))


@pytest.mark.parametrize("target_name", ["x86-64-v3", "avx512", "arm"])
@pytest.mark.parametrize("h", [14, 7, 13])
def test_crops_of_rows_that_are_no_vector_are_vectorized_and_the_weights_still_repacked_once(
        target_name, h, monkeypatch):
    """In two passes (the only choice at 7x7, the positions past the last vector computed
    apart; the default at 14x14 and 13x13, whose positions are padded), rows of 14, 7 or 13
    columns are no vector: the
    crop and its tail run over the image as one axis, whole vectors then the rest
    (``loop_partition``). The partition leaves the kernel ill-formed until it is parsed again,
    and a kernel no Schedule can be made of lost its ``layout_free_buffers`` mark: the weights
    were repacked on every call (measured: ShuffleNetV2's 464 -> 1024 conv 0.60 -> 0.82 ms)."""
    import tvm
    from tvm.s_tir import Schedule

    from graphgen.tune.defaults import has_layout_rewrite

    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    # the default: 14, 13: ["two", "write-back"]; 7: ["two"]
    (f,) = _scheduled_pointwise(_model(c=16, k=24, h=h), target_name)
    Schedule(tvm.IRModule({"main": f}))  # well-formed
    assert "layout_free_buffers" in f.attrs and has_layout_rewrite(f)
    text = f.script()
    lanes = {"avx512": 16, "x86-64-v3": 8, "arm": 4}[target_name]
    crop = text.split("pointwise_gemm_global[v0, v1, v2]\n")[-1]  # after the GEMM's write-back
    assert f"T.vectorized(T.int64({lanes}))" in crop
    assert ("_fused0_partition" in crop) == (h * h % lanes != 0)
    assert "pointwise_gemm[" in crop  # the second pass reads the GEMM's rows


@pytest.mark.parametrize("target_name,c,k,h", [
    *((t, *g) for t in ("x86-64-v3", "avx512", "arm") for g in ((16, 24, 14), (16, 24, 13))),
    # 56 and 28 columns are whole tiles of two 4-lane NEON vectors (the rows path), not of AVX's
    *((t, *g) for t in ("x86-64-v3", "avx512") for g in ((24, 144, 56), (58, 58, 28)))])
def test_the_tail_runs_in_the_gemm_tiles_write_back_where_rows_are_no_tiles(target_name, c, k, h, monkeypatch):
    """A pointwise GEMM whose rows are no whole tiles (14, 13, 56 or 28 columns) can be one
    pass (the default where the positions are whole vectors, 56x56 and 28x28; a knob option
    where they are padded, 14x14 and 13x13): the crop and its tail are inlined into the
    register tile's write-back, which
    stores the output (predicated where positions or channels are padded) from the vector it
    holds; no intermediate of the whole GEMM is left, and the weights are still repacked once.
    Numerics: ``test_pointwise_kernels_match_onnxruntime`` (these geometries are its cases)."""
    import tvm
    from tvm.s_tir import Schedule

    from graphgen.tune.defaults import has_layout_rewrite

    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    if h * h % pointwise.P_QUANTUM:
        _with_knobs(monkeypatch, {"pointwise.passes": 1})  # ["two", "write-back"]
    (f,) = _scheduled_pointwise(_model(c=c, k=k, h=h), target_name)
    Schedule(tvm.IRModule({"main": f}))  # well-formed
    assert "layout_free_buffers" in f.attrs and has_layout_rewrite(f)
    text = f.script()
    lanes = {"avx512": 16, "x86-64-v3": 8, "arm": 4}[target_name]
    write_back = text.split('T.sblock("pointwise_gemm_global")')
    assert len(write_back) == 2, text
    assert f"T.vectorized(T.int64({lanes}))" in write_back[0].rsplit("for ", 1)[-1]
    assert "T.max(pointwise_gemm_global[v0, v1, v2] + " in write_back[1]  # bias and ReLU on the tile
    # the output is written there, and nothing reads the GEMM's rows again
    assert re.search(r"T.writes\((T_relu|compute)_intermediate\[", write_back[1].split("T.sblock(", 1)[0]), write_back[1][:600]
    assert "pointwise_gemm[" not in text and 'T.sblock("pointwise_out")' not in text


def test_ill_formed_kernels_are_parsed_again():
    """What ``loop_partition`` leaves (two blocks defining the same variables) is refused by
    Schedule; after ``_reparse_ill_formed`` it is not, and it computes the same."""
    import tvm
    from tvm import s_tir
    from tvm.script import tirx as T

    from graphgen.tune.pipeline import _reparse_ill_formed

    @T.prim_func(s_tir=True)
    def double(a: T.Buffer((1, 3, 4, 5), "float32"), b: T.Buffer((1, 3, 4, 5), "float32")):
        for n, c, y, x in T.grid(1, 3, 4, 5):
            with T.sblock("b"):
                vn, vc, vy, vx = T.axis.remap("SSSS", [n, c, y, x])
                b[vn, vc, vy, vx] = a[vn, vc, vy, vx] * T.float32(2)

    sch = s_tir.Schedule(tvm.IRModule({"main": double}))
    _, _, y, x = sch.get_loops(sch.get_sblock("b"))
    sch.loop_partition(sch.fuse(y, x), [16, None])
    with pytest.raises(Exception, match="ill-formed"):
        s_tir.Schedule(sch.mod)
    fixed = _reparse_ill_formed(sch.mod)
    s_tir.Schedule(fixed)
    lib = tvm.tirx.build(fixed, target="llvm")
    a = np.random.default_rng(0).random((1, 3, 4, 5), dtype=np.float32)
    b = tvm.runtime.tensor(np.zeros((1, 3, 4, 5), np.float32))
    lib["main"](tvm.runtime.tensor(a), b)
    assert np.array_equal(b.numpy(), a * 2)


@pytest.mark.parametrize("target_name", ["x86-64-v3", "avx512", "arm"])
def test_positions_past_the_last_whole_vector_are_computed_apart_where_padding_wastes_much(
        target_name, tmp_path, monkeypatch):
    """A 7x7 image's 49 positions: a GEMM over 48 and one over the last (channels as the
    vector), not 64 padded positions (measured: ShuffleNetV2's 464 -> 1024 0.57 -> 0.47 ms).
    14x14 (196 -> 208, 6 % padding) keeps its padded copy, unless the input has more channels
    than the output (a squeeze conv: its copy would cost more than a second pass over the
    output; 196 = 192 + 4). All against onnxruntime where they run here (x86-64-v3 does)."""
    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    for h, c_in, k_out, main in ((7, 32, 40, 48), (14, 32, 40, None), (14, 64, 16, 192)):
        model = _model(c=c_in, k=k_out, h=h)
        (f,) = _scheduled_pointwise(model, target_name)
        text = f.script()
        split = main is not None
        assert ("pointwise_gemm_rest" in text) == split, h
        assert ("pointwise_data_pad" in text) == (not split), h
        if split:  # the main GEMM
            assert f"T.sblock_alloc_buffer((T.int64(1), T.int64({k_out}), T.int64({main})))" in text
        (tmp_path / f"{h}_{c_in}").mkdir()
        kinds, c = _check(model, tmp_path / f"{h}_{c_in}", target_name)
        assert kinds == {"pointwise conv2d": 1}, kinds
        assert c is None or c.ok, c.summary()
        assert (c is not None) == (target_name != "arm")


@pytest.mark.parametrize("target_name", ["avx512", "x86-64-v3"])
@pytest.mark.parametrize("option", [0, 1, 2, 3])
def test_every_gemm_tile_of_a_7x7_image_matches_onnxruntime(target_name, option, tmp_path, monkeypatch):
    """The 48 whole-vector positions of a 7x7 image take tiles of 1, 2 or 3 vectors (16 or 8
    lanes), each vector its own unrolled step; every option against onnxruntime. By default
    AVX-512 takes 3 vectors x 8 channels (24 FMAs per 3 + 8 loads)."""
    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    model = _model(c=32, k=40, h=7)
    if option == 0 and target_name == "avx512":
        (f,) = _scheduled_pointwise(model, target_name)
        text = f.script()
        assert "in T.unroll(T.int64(3)):" in text and "T.vectorized(T.int64(48))" not in text
    seen = every_knob_at(option, monkeypatch)
    kinds, c = _check(model, tmp_path, target_name)
    assert kinds == {"pointwise conv2d": 1}, kinds
    assert c.ok, c.summary()
    assert seen.get("pointwise.tile", 0) > 3, seen


def test_a_build_scheduled_like_another_target_pads_rows_as_that_target_does():
    """The armv7 kernel check's x86 reference is scheduled like armv7 (``schedule_like``): its
    pointwise kernels must take the armv7 library's weight shapes, so the rows are padded for
    the ISA given (to 12: 128 -> 132), not for this host's AVX-512 (to 8: 128)."""
    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune.defaults import isa_of
    from graphgen.tune.pipeline import fuse

    model = _model(c=32, k=128, h=7)
    x86 = resolve_target("avx512").tvm_target()
    armv7 = isa_of(resolve_target("armv7").tvm_target())

    def weight_rows(isa):
        import tvm

        mod = fuse(import_onnx(model), x86, isa=isa)
        shapes = []
        tvm.relax.analysis.post_order_visit(mod["main"].body, lambda e: shapes.append(tuple(e.value.shape))
                                            if isinstance(e, tvm.ir.expr.GenericConst) and hasattr(e.value, "shape")
                                            and len(e.value.shape) == 2 else None)
        return [s[0] for s in shapes]

    assert weight_rows(None) == [128]
    assert weight_rows(armv7) == [132]


def test_narrowing_convs_over_a_large_input_put_positions_outside():
    """Which loop order goes first (``pointwise_orders``): a projection (more input channels than
    output) whose input outgrows L2 walks the positions outside, reading its input once instead
    of once per channel block; expansions and small inputs keep channels outside."""
    from graphgen.tune.defaults import POSITIONS_OUTSIDE_MIN_INPUT, pointwise_orders

    assert pointwise_orders(144, 24, 56 * 56)[0] == "positions outside"       # 1.8 MB of input
    assert pointwise_orders(32, 16, 112 * 112)[0] == "positions outside"      # 1.6 MB
    assert pointwise_orders(24, 144, 56 * 56)[0] == "channels outside"        # an expansion
    assert pointwise_orders(192, 32, 28 * 28)[0] == "channels outside"        # 0.6 MB: fits L2
    assert pointwise_orders(64, 64, 64 * 64)[0] == "channels outside"         # not narrowing
    edge = POSITIONS_OUTSIDE_MIN_INPUT // (4 * 256)
    assert pointwise_orders(256, 16, edge)[0] == "positions outside"
    assert pointwise_orders(256, 16, edge - 16)[0] == "channels outside"
    assert sorted(pointwise_orders(144, 24, 3136)) == ["channels outside", "positions outside"]


@pytest.mark.parametrize("residual", [False, True])
def test_a_projection_over_56x56_runs_positions_outside_and_matches_onnxruntime(residual, tmp_path, monkeypatch):
    """MobileNetV2's 144 -> 24 at 56x56, with and without its residual add fused: the parallel
    loop is positions outside channel blocks in the default schedule, and the library matches
    onnxruntime."""
    from graphgen.builder import GraphBuilder

    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    b = GraphBuilder("projection")
    y = b.conv(b.input("input", (1, 144, 56, 56)), 24, 1, padding=0, name="conv")
    if residual:
        y = b.add(y, b.input("skip", (1, 24, 56, 56)))
    b.output(y, "out")
    model = b.build()
    (f,) = _scheduled_pointwise(model, "avx512")
    parallel = re.findall(r"for (\w+) in T\.parallel", f.script())
    assert any("_p_0_k_0_fused" in name for name in parallel), parallel
    kinds, cmp = _check(model, tmp_path)
    assert kinds == {"pointwise conv2d": 1}, kinds
    assert cmp.ok, cmp.summary()


@pytest.mark.parametrize("c_in, parts", [(160, 4), (58, 2), (15, 1)])
def test_positions_computed_apart_sum_in_independent_parts(c_in, parts, tmp_path, monkeypatch):
    """The positions past the last whole vector (7x7: the 49th) are accumulated in partial sums
    over interleaved input channels, 4 where the channels divide by 4, else 2, else 1 (several
    FMA chains instead of one as long as the reduction), added in the output stage; every
    case against onnxruntime."""
    from graphgen.tune.pointwise import rest_partial_sums

    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    assert rest_partial_sums(c_in) == parts
    model = _model(c=c_in, k=48, h=7)
    (f,) = _scheduled_pointwise(model, "avx512")
    text = f.script()
    assert f"pointwise_gemm_rest = T.sblock_alloc_buffer((T.int64(1), T.int64(1), T.int64({parts}), " in text
    kinds, c = _check(model, tmp_path)
    assert kinds == {"pointwise conv2d": 1}, kinds
    assert c.ok, c.summary()


def test_a_prime_count_of_16_lane_vectors_is_padded_to_an_even_one_for_wide_reductions():
    """AVX-512: a padded image whose count of 16-lane vectors is odd and no multiple of 3 (13x13:
    176 positions = 11 vectors, 14x14: 13) leaves tiles of one vector only; with at least
    ``WIDE_ROWS_MIN_CHANNELS`` input channels one vector more is padded. Not for 8 or 4 lanes
    (every count of 8-lane vectors is even), fewer channels, or counts that split already."""
    from graphgen.tune.conv_call import legalizing_for
    from graphgen.tune.defaults import Isa

    low = pointwise.WIDE_ROWS_MIN_CHANNELS - 1
    with legalizing_for(Isa("avx512", 16, 32)):
        assert pointwise.padded_positions(169, 512) == 192
        assert pointwise.padded_positions(196, 128) == 224
        assert pointwise.padded_positions(169, low) == 176
        assert pointwise.padded_positions(225, 512) == 240  # 15 vectors: rows of 3
        assert pointwise.padded_positions(16 * 7 * 7 - 3, 512) == 16 * 7 * 7 + 16  # 49 -> 50
    for isa in (Isa("avx2", 8, 16), Isa("neon", 4, 32)):
        with legalizing_for(isa):
            assert pointwise.padded_positions(169, 512) == 176
    assert pointwise.padded_positions(169, 512) == 176  # no target: the plain quantum


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("option", [0, 1, 2])
def test_a_13x13_gemm_over_many_channels_takes_several_vector_tiles_and_matches_onnxruntime(
        stride, option, tmp_path, monkeypatch):
    """SqueezeNet's 512 -> 1000 classifier shape, smaller: 13x13 positions (and a strided 1x1
    conv's 13x13 output) padded to 12 vectors on AVX-512, so the default tile is several vectors
    (the classifier's 3 x 8 channels, was one vector x 20: 1.39 -> 1.17 ms); every leading tile against
    onnxruntime."""
    monkeypatch.delenv("GRAPHGEN_POINTWISE", raising=False)
    h = 13 if stride == 1 else 25  # a 13x13 output either way
    model = _model(c=pointwise.WIDE_ROWS_MIN_CHANNELS, k=144, h=h, stride=stride)  # more out than in: padded
    if option == 0:
        from graphgen.tune.defaults import Knobs

        picked = {}
        pick = Knobs.pick
        monkeypatch.setattr(Knobs, "pick", lambda self, name, options: picked.setdefault(name, pick(self, name, options)))
        (f,) = _scheduled_pointwise(model, "avx512")
        monkeypatch.setattr(Knobs, "pick", pick)
        text = f.script()
        assert "T.int64(192)" in text and "T.int64(176)" not in text
        assert picked["pointwise.tile"][0] > 1, picked  # (vectors, channels)
    seen = every_knob_at(option, monkeypatch)
    kinds, c = _check(model, tmp_path, "avx512")
    assert kinds == {"pointwise conv2d (strided)" if stride == 2 else "pointwise conv2d": 1}, kinds
    assert c.ok, c.summary()
    assert seen.get("pointwise.tile", 0) > 2, seen
