"""Tuning graphgen's own schedules: knobs, their variants, the coordinate search, the tuner."""

from __future__ import annotations

import json
import math

import pytest

from graphgen.compile import resolve_target
from graphgen.tune import defaults, knob_search
from graphgen.tune.defaults import Knobs, variants
from graphgen.tune.knob_search import KnobState, next_round


# -- decision logic (no TVM) ------------------------------------------------------------------

def test_knobs_take_the_heuristic_pick_unless_told_and_record_what_they_met():
    k = Knobs()
    assert k.pick("a", ["best", "second", "third"]) == "best"
    assert Knobs({"a": 2}).pick("a", ["best", "second", "third"]) == "third"
    assert Knobs({"a": 7}).pick("a", ["best", "second"]) == "best"  # out of range: the default
    many = list(range(20))
    k = Knobs(others=99)
    assert k.pick("b", many) == defaults.KNOB_OPTIONS - 1  # options are cut to KNOB_OPTIONS
    assert k.seen == {"b": defaults.KNOB_OPTIONS}
    with pytest.raises(defaults.NotMatched):
        Knobs().pick("c", [])


def test_variants_change_one_knob_at_a_time_around_the_best():
    seen = {"x": 3, "y": 2}
    assert variants(seen) == [{"x": 1}, {"x": 2}, {"y": 1}]
    assert variants(seen, {"x": 2}) == [{"x": 0}, {"x": 1}, {"x": 2, "y": 1}]
    assert variants({"x": 1}) == []  # one option: nothing to try


def test_search_state_moves_only_on_a_confirmed_clear_gain_and_stops_when_a_round_brings_nothing():
    st = KnobState()
    seen = {"x": 3}
    first = next_round(st, seen)
    assert first == [{}, {"x": 1}, {"x": 2}]
    for c, s in zip(first, [100e-6, 98.5e-6, 80e-6]):
        st.record(c, s)
    # a winner is timed again, with the current best, before the search moves
    assert not st.settle(first) and st.best == {} and not st.done
    assert next_round(st, seen) == [{}, {"x": 2}]
    st.record({}, 97e-6)
    st.record({"x": 2}, 82e-6)
    assert st.settle(first) and st.best == {"x": 2} and math.isclose(st.best_s, 80e-6) and not st.done
    # everything around {"x": 2} is measured ({"x": 0} is the default {}): the search is over
    assert next_round(st, seen) == []
    # a winner that loses its second timing does not replace the current best
    lucky = KnobState()
    for c, s in zip(first, [100e-6, 99e-6, 80e-6]):
        lucky.record(c, s)
    lucky.settle(first)
    lucky.record({}, 79e-6)  # the load that slowed the first timing is gone
    lucky.record({"x": 2}, 95e-6)
    assert not lucky.settle(first) and lucky.best == {} and lucky.done
    st2 = KnobState()
    for c, s in zip(first, [100e-6, 98.5e-6, 99e-6]):  # 1.5 % is timing noise, not a gain
        st2.record(c, s)
    assert not st2.settle(first) and st2.best == {} and st2.done
    assert next_round(st2, seen) == []
    assert st.is_measured({"x": 0}) and st.is_measured({})  # option 0 is the default


def test_a_finished_search_reopens_when_the_schedule_gains_a_knob():
    st = KnobState()
    st.reopen_if_new_knobs({"x": 2})
    st.record({}, 1e-4)
    st.record({"x": 1}, 1e-4)
    assert not st.settle([{}, {"x": 1}]) and st.done
    st.reopen_if_new_knobs({"x": 2})
    assert st.done and next_round(st, {"x": 2}) == []
    st.reopen_if_new_knobs({"x": 2, "y": 2})  # a newer schedule has a second knob
    assert not st.done and next_round(st, {"x": 2, "y": 2}) == [{"y": 1}]
    back = KnobState.from_json(json.loads(json.dumps(st.to_json())))
    assert back.knobs == {"x": 2, "y": 2}


def test_a_failed_default_is_replaced_by_any_setting_that_runs():
    st = KnobState()
    st.record({}, 1e10)
    st.record({"x": 1}, 5e-5)
    assert st.settle([{}, {"x": 1}]) and st.best == {"x": 1}


def test_search_state_round_trips_and_a_corrupt_or_foreign_file_is_a_fresh_start(tmp_path):
    st = KnobState()
    st.record({}, 1e-4)
    st.record({"x": 1}, 5e-5)
    st.settle([{}, {"x": 1}])
    assert st.confirm
    knob_search.save(tmp_path, {"123": st})
    back = knob_search.load(tmp_path)["123"]
    assert back.measured == st.measured and back.confirm == st.confirm and back.best == st.best
    assert next_round(back, {"x": 2}) == [{}, {"x": 1}]  # an interrupted confirmation resumes
    (tmp_path / knob_search.STATE_FILE).write_text("{not json")
    assert knob_search.load(tmp_path) == {}
    (tmp_path / knob_search.STATE_FILE).write_text(json.dumps({"version": 999, "workloads": {"1": {}}}))
    assert knob_search.load(tmp_path) == {}
    assert knob_search.load(tmp_path / "missing") == {}


# -- every option of every knob computes the same thing -----------------------------------------

def _knob_model():
    """One kernel of each searched class: a 3-channel strided stem (phase-split), a strided 3x3
    conv (channel tiles), a Winograd conv, a pointwise conv, three depthwise convs (on rows, 3x3
    stride 2: the shuffle kernel, which has no knobs, and 5x5 stride 2: channel-blocked), a conv with 6
    channels (no channel vector: row tiles), a strided conv with 6 (scalar row pieces) and a
    dense layer."""
    from graphgen.builder import GraphBuilder

    b = GraphBuilder("knobs")
    x = b.input("input", (1, 3, 64, 64))
    x = b.relu(b.conv(x, 8, 3, stride=2, padding=1, name="stem"))         # 3 channels: phase-split
    x = b.relu(b.conv(x, 16, 3, stride=2, padding=1, name="strided"))     # 16x16, channel tiles
    x = b.relu(b.conv(x, 16, 3, padding=1, name="wino"))                  # Winograd F(4x4)
    x = b.relu(b.conv(x, 32, 1, name="pw"))                               # pointwise GEMM
    x = b.relu(b.conv(x, 32, 3, padding=1, groups=32, name="dw"))          # depthwise, on rows
    x = b.relu(b.conv(x, 32, 3, stride=2, padding=1, groups=32, name="dw2"))  # 3x3 / stride 2: shuffles
    x = b.relu(b.conv(x, 32, 5, stride=2, padding=2, groups=32, name="dw3"))  # 5x5 / 2: channel-blocked
    y = b.relu(b.conv(x, 6, 3, padding=1, name="rows"))                   # 6 channels: row tiles
    y = b.relu(b.conv(y, 6, 3, stride=2, padding=1, name="odd"))          # strided, 6 channels
    y = b.flatten(b.global_avg_pool(y))
    b.output(b.linear(y, 16, name="fc"), "out")
    return b.build()


@pytest.mark.parametrize("option", [0, 1, 2, 5])
def test_every_knob_option_matches_onnxruntime(tmp_path, monkeypatch, option):
    """Every kernel built with every knob at ``option`` (clamped to each knob's last), checked
    against onnxruntime (fp32, relative L2 < 1e-5): a variant the tuner measures can become the
    library's kernel, so each must compute the same as the default."""
    from graphgen.testing import compile_and_compare

    seen: dict[str, int] = {}
    original = defaults.default_schedule

    def with_option(func, isa, mod=None, knobs=None, **kwargs):
        k = Knobs(others=option)
        out = original(func, isa, mod=mod, knobs=k, **kwargs)
        seen.update({n: max(c, seen.get(n, 0)) for n, c in k.seen.items()})
        return out

    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    monkeypatch.setattr(defaults, "default_schedule", with_option)
    kinds, cmp = compile_and_compare(_knob_model(), tmp_path)
    assert cmp.ok, cmp.summary()
    for kind in ("conv2d", "conv2d (phase-split)", "winograd conv2d F(4x4)", "pointwise conv2d",
                 "depthwise conv2d (channel-blocked)", "depthwise conv2d (rows)", "dense",
                 "depthwise conv2d (stride 2, shuffles)"):
        assert kind in kinds, kinds
    # the knobs exercised, and that several have real alternatives to measure
    assert {"conv.tile", "winograd.gemm_tile", "pointwise.tile", "depthwise.tile", "depthwise.pad",
            "dense.features", "conv.row_tile", "conv.row_piece", "phase_conv.tile"} <= set(seen), seen
    assert sum(1 for n in seen.values() if n > 1) >= 4, seen


# -- the tuner --------------------------------------------------------------------------------

def test_tuner_searches_the_knobs_resumes_from_its_state_and_the_build_uses_the_best(tmp_path, monkeypatch):
    """``graphgen tune`` measures the default and every single-knob variant of each kernel (each
    a tuning record), keeps its state in the database folder, and a second run measures none of
    them again; the build then uses a record for every kernel and matches onnxruntime."""
    import onnx

    from graphgen import api
    from graphgen.testing import winograd_and_pointwise_model
    from graphgen.tune import tune_onnx

    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(tmp_path / "cache"))
    model = winograd_and_pointwise_model()
    spec = resolve_target("x86")
    db = tmp_path / "db"
    res = tune_onnx(model, spec, trials=12, batch=2, db=db)
    assert res.covered == 2 and not res.interrupted
    states = knob_search.load(db)
    assert len(states) == 2
    measured = {h: set(st.measured) for h, st in states.items()}
    assert all(len(m) >= 2 for m in measured.values()), measured  # the default and its variants
    assert sum(len(m) for m in measured.values()) <= res.trials_run
    # a second run with a bigger budget: the settings measured before are not measured again
    tune_onnx(model, spec, trials=res.trials_total + 4, batch=2, db=db)
    again = knob_search.load(db)
    for h, before in measured.items():
        assert before <= set(again[h].measured)
        # resumed, not restarted: every timing of the first run is kept, in its order
        for key, times in states[h].measured.items():
            assert again[h].measured[key][:len(times)] == times, (key, times, again[h].measured[key])
    # and the new budget was spent: new settings, or the second timings that confirm a move
    # (whichever kernel the plan gave it to)
    timings = lambda st: sum(len(t) for t in st.measured.values())  # noqa: E731
    assert sum(timings(again[h]) - timings(states[h]) for h in measured) > 0 \
        or all(again[h].done for h in measured), again
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    built = api.build(str(path), "x86", out=tmp_path / "built", db=db)
    assert built.manifest["verification"]["status"] == "passed"
    assert built.manifest["tuning"]["records_used"] == built.manifest["tuning"]["kernels"] == 2


@pytest.mark.parametrize("target", ["arm", "armv7"])
def test_knob_options_compile_for_neon(tmp_path, monkeypatch, target):
    """The second option of every knob, sized for NEON, compiles for the boards (run there by
    the tuner's RPC runner, or under emulation)."""
    from graphgen.testing import compile_and_compare

    original = defaults.default_schedule
    monkeypatch.delenv("GRAPHGEN_WINOGRAD", raising=False)
    monkeypatch.setattr(defaults, "default_schedule",
                        lambda func, isa, mod=None, knobs=None, **kw: original(func, isa, mod=mod, **kw,
                                                                               knobs=Knobs(others=1)))
    kinds, cmp = compile_and_compare(_knob_model(), tmp_path, target)
    assert cmp is None and "depthwise conv2d (channel-blocked)" in kinds and "pointwise conv2d" in kinds, kinds
