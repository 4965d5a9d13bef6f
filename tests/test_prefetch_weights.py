"""The weights' software prefetch (graphgen.tune.prefetch_weights): the pass alone on small TIR
functions, and real builds against onnxruntime (fp32, relative L2 < 1e-5)."""

import re

import pytest
import tvm
from tvm.script import tirx as T

from graphgen.testing import compile_and_compare, single_conv_model
from graphgen.tune import prefetch_weights as pw

TOL = 1e-5


def _gemm(n_weights: int, triple: str | None = None, lanes: int = 1):
    """out[i] += x[k] * w[i * 256 + k]: an innermost reduction loop reading weights ``lanes`` at a
    time (``lanes`` > 1: vector loads, 16 outputs of a row at once)."""
    target = {"kind": "llvm"} if triple is None else {"kind": "llvm", "mtriple": triple}
    if lanes == 1:
        @T.prim_func(private=True)
        def gemm(x: T.Buffer((256,), "float32"), w: T.Buffer((n_weights,), "float32"),
                 out: T.Buffer((16,), "float32")):
            T.func_attr({"target": T.target(target)})
            for i in range(16):
                for k in range(256):
                    out[i] = out[i] + x[k] * w[i * 256 + k]
    else:
        @T.prim_func(private=True)
        def gemm(x: T.Buffer((256,), "float32"), w: T.Buffer((n_weights,), "float32"),
                 out: T.Buffer((16 * lanes,), "float32")):
            T.func_attr({"target": T.target(target)})
            for k in range(256):
                out[T.Ramp(0, 1, lanes)] = out[T.Ramp(0, 1, lanes)] + T.Broadcast(x[k], lanes) * w[
                    T.Ramp(k * lanes * 2, 1, lanes)]
                out[T.Ramp(lanes, 1, lanes)] = out[T.Ramp(lanes, 1, lanes)] + T.Broadcast(x[k], lanes) * w[
                    T.Ramp(k * lanes * 2 + lanes, 1, lanes)]
    return gemm.with_attr("global_symbol", "gemm")


def _apply(func, name: str = "param_0"):
    """The pass on ``func`` with its weight buffer named ``name`` (a kernel's constant argument
    is named param_*)."""
    text = func.script().replace("w: T.Buffer", f"{name}: T.Buffer").replace("w[", f"{name}[")
    func = tvm.script.from_source(text)
    return pw.PrefetchWeights(tvm.IRModule({"gemm": func}))["gemm"]


def test_an_innermost_loop_over_large_weights_prefetches_them_a_few_kb_ahead():
    f = _apply(_gemm(65536))
    text = f.script()
    ahead = pw.AHEAD_BYTES // 4
    assert text.count("llvm.prefetch") == 1, text
    # inside the k loop (the innermost), before the read, AHEAD_BYTES past it
    assert re.search(rf"for i, k in T.grid\(16, 256\):\n\s+T.call_llvm_intrin\(\"void\", \"llvm.prefetch\", "
                     rf"T.address_of\(param_0\[i \* 256 \+ k \+ {ahead}\]\), 0, 3, 1\)", text), text
    assert int(f.attrs["graphgen_weight_prefetches"]) == 1


def test_one_prefetch_per_cache_line_a_step_reads():
    """Two 16-lane weight vectors a step are 128 bytes: two lines, two prefetches 64 bytes apart."""
    f = _apply(_gemm(65536, lanes=16))
    text = f.script()
    ahead = pw.AHEAD_BYTES // 4
    assert text.count("llvm.prefetch") == 2, text
    assert f"param_0[k * 16 * 2 + {ahead}]" in text and f"param_0[k * 16 * 2 + {ahead + 16}]" in text, text


@pytest.mark.parametrize("case", ["small weights", "activation", "aarch64", "armv7"])
def test_small_weights_activations_and_arm_targets_are_left_alone(case):
    n = pw.MIN_WEIGHT_BYTES // 4 - 1 if case == "small weights" else 65536
    triple = {"aarch64": "aarch64-linux-gnu", "armv7": "armv7a-linux-gnueabihf"}.get(case)
    f = _apply(_gemm(n, triple), "lv3" if case == "activation" else "param_0")
    assert "llvm.prefetch" not in f.script()
    assert "graphgen_weight_prefetches" not in (f.attrs or {})


def _counting(monkeypatch) -> list:
    """How many loops the builds after this call prefetch in (the pass's helper, wrapped)."""
    counted: list = []
    original = pw._prefetches

    def prefetches(body):
        out = original(body)
        if out is not None:
            counted.append(1)
        return out

    monkeypatch.setattr(pw, "_prefetches", prefetches)
    return counted


@pytest.mark.parametrize("prefetch", ["1", "0"])
def test_a_build_with_large_weights_prefetches_them_and_matches_onnxruntime(prefetch, tmp_path, monkeypatch):
    """MobileNetV2's 160 -> 960 1x1 conv at 7x7 (614 KB of weights): the main GEMM and the rest
    computed apart stream them; ``GRAPHGEN_PREFETCH=0`` builds without (and the manifest says
    which)."""
    from graphgen.compile import compile_model, resolve_target, run_library
    from graphgen.verify import compare, random_inputs, run_onnxruntime

    monkeypatch.setenv("GRAPHGEN_PREFETCH", prefetch)
    counted = _counting(monkeypatch)
    model = single_conv_model(160, 960, 7, kernel=1, padding=0, relu=True)
    spec = resolve_target("x86")
    info = compile_model(model, spec, tmp_path / "m.so")
    assert info["schedules"]["pipeline"] == "graphgen"
    assert info["schedules"]["prefetch_weights"] is (prefetch == "1")
    assert (len(counted) >= 2) is (prefetch == "1"), counted
    x = random_inputs(model)
    c = compare(run_library(tmp_path / "m.so", spec, model, x), run_onnxruntime(model, x),
                [o.name for o in model.graph.output], TOL)
    assert c.ok, c.summary()


def test_arm_builds_do_not_prefetch(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHGEN_PREFETCH", raising=False)
    counted = _counting(monkeypatch)
    kinds, _ = compile_and_compare(single_conv_model(160, 960, 7, kernel=1, padding=0, relu=True), tmp_path, "arm")
    assert kinds == {"pointwise conv2d": 1}
    assert counted == []


def test_winograd_kernels_prefetch_too(tmp_path, monkeypatch):
    """Not only the pointwise GEMMs: a Winograd conv's transformed weights (64 -> 64 3x3: 144 KB)
    are streamed the same way; the build still matches onnxruntime."""
    monkeypatch.delenv("GRAPHGEN_PREFETCH", raising=False)
    counted = _counting(monkeypatch)
    kinds, c = compile_and_compare(single_conv_model(64, 64, 14, kernel=3, padding=1, relu=True), tmp_path, "x86")
    assert any("winograd" in k for k in kinds), kinds
    assert counted, "no loop prefetched"
    assert c.ok, c.summary()
