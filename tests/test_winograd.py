"""Winograd F(4x4 / 2x2, 3x3) convolutions (graphgen.tune.winograd): the arithmetic, which convs
take it, and the compiled kernels against onnxruntime (fp32, relative L2 < 1e-5)."""

import numpy as np
import pytest

from graphgen.compile import compile_model, resolve_target, run_library
from graphgen.testing import compile_and_compare, single_conv_model
from graphgen.tune import winograd
from graphgen.verify import compare, random_inputs, run_onnxruntime

TOL = 1e-5


def _direct(x, w, pad):
    c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((w.shape[0], h + 2 * pad - 2, wd + 2 * pad - 2))
    for a in range(3):
        for b in range(3):
            out += np.einsum("kc,chw->khw", w[:, :, a, b], xp[:, a:a + out.shape[1], b:b + out.shape[2]])
    return out


@pytest.mark.parametrize("m", [2, 4])
def test_transform_matrices_compute_the_convolution_exactly(m):
    """A^T [(G g G^T) * (B^T d B)] A is the 3x3 correlation of every m x m tile (float64)."""
    at, bt, _ = winograd.transform_matrices(m)
    rng = np.random.default_rng(m)
    x = rng.standard_normal((5, 4 * m, 4 * m))
    w = rng.standard_normal((6, 5, 3, 3))
    u = np.einsum("ea,kcab,nb->enck", winograd.transform_matrices(m)[2], w, winograd.transform_matrices(m)[2])
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    a = m + 2
    out = np.zeros((6, 4 * m, 4 * m))
    for ty in range(4):
        for tx in range(4):
            d = xp[:, ty * m:ty * m + a, tx * m:tx * m + a]
            v = np.einsum("ea,cab,nb->enc", bt, d, bt)
            mm = np.einsum("enc,enck->enk", v, u)
            out[:, ty * m:(ty + 1) * m, tx * m:(tx + 1) * m] = np.einsum("ie,enk,jn->kij", at, mm, at)
    ref = _direct(x, w, 1)
    assert np.abs(out - ref).max() < 1e-9 * np.abs(ref).max()
    # the float32 weight transform is the float64 one rounded
    u32 = winograd.weight_transform(w.astype(np.float32), m)
    assert u32.dtype == np.float32 and u32.shape == (a, a, 5, 6)


def test_which_convs_take_winograd(monkeypatch):
    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    assert winograd.tile_size_for(56, 56) == 4
    assert winograd.tile_size_for(13, 13) == 4      # 4 x 4 tiles
    # 16 to 31 tiles of 4x4: F(4x4) only where its weights are small (inside a model they come
    # from memory), else F(2x2); 32 and more: F(4x4) whatever the weights
    assert winograd.tile_size_for(13, 13, channels=(16, 64)) == 4      # 147 KB
    assert winograd.tile_size_for(13, 13, channels=(48, 192)) == 2     # 1.3 MB
    assert winograd.tile_size_for(14, 14, channels=(256, 256)) == 2
    assert winograd.tile_size_for(27, 27, channels=(256, 256)) == 4    # 7 x 7 tiles
    assert winograd.tile_size_for(7, 7, channels=(16, 16)) is None
    assert winograd.tile_size_for(12, 12) == 2      # 3 x 3 tiles of 4: too few; 6 x 6 of 2
    assert winograd.tile_size_for(7, 7) is None     # 16 tiles of 2: memory-bound, direct conv
    assert winograd.qualifies(64, 64, 56, 56)
    assert not winograd.qualifies(3, 64, 224, 224)  # the RGB stem: too few input channels
    assert not winograd.qualifies(64, 10, 56, 56)   # output channels make no vector block
    monkeypatch.setenv("GRAPHGEN_WINOGRAD", "2")
    assert winograd.tile_size_for(56, 56) == 2
    monkeypatch.setenv("GRAPHGEN_WINOGRAD", "0")
    assert not winograd.enabled()


def _conv_model(c, k, h, w=None, *, pad=1, **kw):
    return single_conv_model(c, k, h, w, kernel=3, padding=pad, **kw)


def _compile_and_compare(model, tmp_path, target="x86"):
    return compile_and_compare(model, tmp_path, target, TOL)


CASES = {
    # name: (builder kwargs, tile size forced or None, expect winograd)
    "resnet_56": (dict(c=64, k=64, h=56), None, "F(4x4)"),
    "odd_55_small_c": (dict(c=16, k=64, h=55), None, "F(4x4)"),          # SqueezeNet's expand3x3
    "odd_13": (dict(c=48, k=192, h=13), None, "F(2x2)"),                  # 16 tiles of 4, U of 1.3 MB
    "odd_13_f4": (dict(c=48, k=192, h=13), "4", "F(4x4)"),
    "odd_13_small_c": (dict(c=16, k=32, h=13), None, "F(4x4)"),          # U of 74 KB
    "residual_tail": (dict(c=32, k=32, h=28, residual=True), None, "F(4x4)"),
    "no_bias_batch2": (dict(c=16, k=32, h=20, batch=2, bias=False), None, "F(4x4)"),
    "rect_odd_channels": (dict(c=12, k=24, h=18, w=11), "2", "F(2x2)"),   # 4-lane channel blocks
    "pad_0": (dict(c=16, k=16, h=22, pad=0), None, "F(4x4)"),
    "pad_2": (dict(c=16, k=16, h=14, pad=2), None, "F(4x4)"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_winograd_kernels_match_onnxruntime(name, tmp_path, monkeypatch):
    kwargs, force, tile = CASES[name]
    if force:
        monkeypatch.setenv("GRAPHGEN_WINOGRAD", force)
    else:
        monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    kinds, c = _compile_and_compare(_conv_model(**kwargs), tmp_path)
    assert kinds == {f"winograd conv2d {tile}": 1}, kinds
    assert c.ok, c.summary()


def _force_stages(monkeypatch, stages: str) -> None:
    """Default schedules whose Winograd kernels run their stages ``stages`` ("per tile row" or
    "apart"), the other knobs at their defaults."""
    from graphgen.tune.defaults import Knobs

    original = Knobs.pick

    def pick(self, name, options):
        if name == "winograd.stages":
            assert stages in options, options
            self.seen[name] = len(options)
            return stages
        return original(self, name, options)

    monkeypatch.setattr(Knobs, "pick", pick)


STAGE_CASES = ["odd_55_small_c", "odd_13", "residual_tail", "no_bias_batch2", "rect_odd_channels", "pad_2"]


@pytest.mark.parametrize("stages", ["per tile row", "apart"])
@pytest.mark.parametrize("name", STAGE_CASES)
def test_both_stage_orders_match_onnxruntime(name, stages, tmp_path, monkeypatch):
    kwargs, force, tile = CASES[name]
    if force:
        monkeypatch.setenv("GRAPHGEN_WINOGRAD", force)
    else:
        monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    _force_stages(monkeypatch, stages)
    kinds, c = _compile_and_compare(_conv_model(**kwargs), tmp_path)
    assert kinds == {f"winograd conv2d {tile}": 1}, kinds
    assert c.ok, c.summary()


def _scheduled_winograd(model, target_name="x86"):
    """(schedule, kind, knobs) of the model's one Winograd kernel under its default schedule."""
    from tvm import tirx

    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune import defaults
    from graphgen.tune.pipeline import fuse

    target = resolve_target(target_name).tvm_target()
    mod = fuse(import_onnx(model), target)
    funcs = [f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and "winograd" in gv.name_hint]
    assert len(funcs) == 1
    knobs = defaults.Knobs()
    sch, kind = defaults.default_schedule(funcs[0], defaults.isa_of(target), knobs=knobs)
    return sch, kind, knobs


def _parallel_loop_of(sch, block):
    from tvm import tirx

    loops = [lp for lp in sch.get_loops(block) if sch.get(lp).kind == tirx.ForKind.PARALLEL]
    return loops[0] if loops else None


def _block_named(sch, name):
    from graphgen.tune.defaults import _blocks

    found = [b for b in _blocks(sch) if sch.get(b).name_hint in (name, name + "_update")]  # (the GEMM's
    assert len(found) == 1, name                                                          # after its init)
    return found[0]


@pytest.mark.parametrize("target_name", ["x86-64-v3", "avx512", "arm"])
def test_small_weights_run_the_stages_per_tile_row_and_big_ones_apart(target_name, monkeypatch):
    """Per tile row: the data pack, the GEMM and the output under one parallel loop over tile
    rows (V and M a row at a time); apart (big U, which would be read once per tile row): each
    stage parallel on its own. Both knob options are offered where there are two tile rows."""
    from graphgen.tune.defaults import WINOGRAD_ROWS_MAX_U_BYTES, _output_blocks

    small = _conv_model(c=16, k=64, h=55)      # U: 36 x 16 x 64 floats, 147 KB
    big = _conv_model(c=128, k=128, h=28)      # 2.4 MB
    assert 36 * 16 * 64 * 4 <= WINOGRAD_ROWS_MAX_U_BYTES < 36 * 128 * 128 * 4
    for model, per_row in ((small, True), (big, False)):
        sch, kind, knobs = _scheduled_winograd(model, target_name)
        assert kind == "winograd conv2d F(4x4)" and knobs.seen["winograd.stages"] == 2, (kind, knobs.seen)
        loops = {name: _parallel_loop_of(sch, _block_named(sch, name)) for name in ("winograd_data_pack", "winograd_bgemm")}
        loops["output"] = _parallel_loop_of(sch, _output_blocks(sch)[0])  # the inverse, with the tail
        script = sch.mod["main"].script()
        assert all(lp is not None for lp in loops.values()), script
        pack, gemm, inverse = (sch.get(lp) for lp in loops.values())
        assert pack.same_as(gemm) == per_row and gemm.same_as(inverse) == per_row, script
    # one tile row: nothing to split, stages apart
    monkeypatch.setenv("GRAPHGEN_WINOGRAD", "4")
    _, _, knobs = _scheduled_winograd(_conv_model(c=16, k=16, h=4, pad=1), target_name)
    assert knobs.seen["winograd.stages"] == 1


@pytest.mark.parametrize("kwargs", [dict(c=16, k=16, h=28, stride=2), dict(c=16, k=16, h=28, groups=4),
                                    dict(c=64, k=64, h=7)])
def test_other_convs_keep_the_direct_schedule(kwargs, tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    kinds, c = _compile_and_compare(_conv_model(**kwargs), tmp_path)
    assert not any(k.startswith("winograd") for k in kinds), kinds
    assert c.ok, c.summary()


def test_winograd_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHGEN_WINOGRAD", "0")
    kinds, c = _compile_and_compare(_conv_model(c=64, k=64, h=56), tmp_path)
    assert kinds == {"conv2d": 1}, kinds
    assert c.ok, c.summary()


def test_weights_passed_at_run_time_keep_the_direct_conv(tmp_path, monkeypatch):
    """params_as_inputs (the zoo test's path for very large nets): no constant weights to transform."""
    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    model = _conv_model(c=32, k=32, h=28)
    spec = resolve_target("x86")
    info = compile_model(model, spec, tmp_path / "m.so", params_as_inputs=True)
    assert not any(k.startswith("winograd") for k in info["schedules"].get("default_schedule_kinds", {}))
    x = random_inputs(model)
    got = run_library(tmp_path / "m.so", spec, model, x, info.get("detached_params"))
    assert compare(got, run_onnxruntime(model, x), ["out"], TOL).ok


def test_a_wrong_transform_is_caught(tmp_path, monkeypatch):
    """The comparison can fail: a Winograd kernel built from slightly wrong weight transforms."""
    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    real = winograd.weight_transform
    monkeypatch.setattr(winograd, "weight_transform", lambda w, m: real(w, m) * np.float32(1.001))
    kinds, c = _compile_and_compare(_conv_model(c=16, k=16, h=16), tmp_path)
    assert kinds == {"winograd conv2d F(4x4)": 1}
    assert not c.ok


@pytest.mark.parametrize("target", ["arm", "armv7", "avx512"])
def test_winograd_kernels_compile_for_neon_and_avx512(target, tmp_path, monkeypatch):
    from graphgen.compile.elf import check_elf

    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    spec = resolve_target(target)
    kinds, _ = _compile_and_compare(_conv_model(c=16, k=32, h=27, residual=False), tmp_path, target)
    assert kinds == {"winograd conv2d F(4x4)": 1}, kinds
    if not spec.host_runnable:
        ok, _, problem = check_elf(tmp_path / "m.so", spec.arch)
        assert ok, problem


def test_cli_winograd_switch_is_recorded_and_bad_modes_are_one_line(tmp_path, monkeypatch, capsys):
    import json

    import onnx

    from graphgen.cli import main

    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    path = tmp_path / "conv.onnx"
    onnx.save(_conv_model(c=16, k=16, h=16), str(path))
    for mode, kind in (("off", None), ("auto", "winograd conv2d F(4x4)")):
        out = tmp_path / mode
        assert main(["build", str(path), "--winograd", mode, "-o", str(out)]) == 0
        schedules = json.loads((out / "manifest.json").read_text())["build"]["schedules"]
        assert schedules["winograd"] == mode
        kinds = schedules.get("default_schedule_kinds", {})
        assert (kind in kinds) if kind else not any(k.startswith("winograd") for k in kinds), kinds
    import os

    assert "GRAPHGEN_WINOGRAD" not in os.environ  # the switch does not outlive the command
    monkeypatch.setenv("GRAPHGEN_WINOGRAD", "8")
    capsys.readouterr()
    assert main(["build", str(path), "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown Winograd mode '8'" in err[0] and "auto, off, 2, 4" in err[0], err
    assert not (tmp_path / "bad").exists()


def test_tuning_keeps_winograd_kernels_at_their_default_and_searches_the_rest(tmp_path, monkeypatch):
    """MetaSchedule's generic rules cannot generate a design space for a Winograd kernel; the
    tuner measures its default schedule and its knob variants, excludes it from MetaSchedule's
    search and tunes the others; a build with the database then uses a record for every kernel
    and matches onnxruntime."""
    from graphgen import api
    from graphgen.testing import winograd_and_pointwise_model
    from graphgen.tune import tune_onnx

    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(tmp_path / "cache"))
    model = winograd_and_pointwise_model()
    spec = resolve_target("x86")
    # (12 trials: with 8, a fast Winograd kernel's share of the budget was sometimes its default
    # alone when the host was loaded)
    res = tune_onnx(model, spec, trials=12, batch=2, db=tmp_path / "db")
    assert res.tasks == 2 and res.covered == 2 and not res.interrupted
    per = {p["name"]: p for p in res.per_task}
    wino = [n for n in per if n.startswith("fused_winograd")]
    # the default and its knob variants (graphgen's own search), no MetaSchedule trials
    from graphgen.tune import knob_search

    from graphgen.tune import database as dbm

    # each kernel's records: its knob settings, then its schedules timed again at the end
    choices = dbm.read_choices(tmp_path / "db")
    knob_trials = sorted(len(st.measured) + choices.get(h, {}).get("candidates", 0)
                         for h, st in knob_search.load(tmp_path / "db").items())
    assert len(wino) == 1 and per[wino[0]]["trials"] in knob_trials and per[wino[0]]["trials"] >= 2
    other = [n for n in per if n not in wino]
    assert per[other[0]]["trials"] + per[wino[0]]["trials"] >= 12 - 1  # the rest of the budget (within a batch)
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    built = api.build(str(path), "x86", out=tmp_path / "built", db=tmp_path / "db")
    t = built.manifest["tuning"]
    assert built.manifest["verification"]["status"] == "passed"
    assert t["records_used"] == t["kernels"] == 2
