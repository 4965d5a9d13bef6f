"""Assertions shared by the test suite (and usable by anyone writing a recipe)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from graphgen.verify import DEFAULT_TOLERANCE, compare, random_inputs, run_onnxruntime


def assert_onnx_equivalent(before: onnx.ModelProto, after: onnx.ModelProto, tolerance: float = DEFAULT_TOLERANCE,
                           seed: int = 0) -> None:
    """Both models on onnxruntime, same seeded inputs: every output within relative L2 tolerance."""
    from graphgen.verify import check_equivalent

    c = check_equivalent(before, after, seed=seed, tolerance=tolerance)
    assert c.ok, c.summary() + (f" ({c.detail})" if c.detail else "")


def assert_tvm_matches_ort(model: onnx.ModelProto, target: str = "x86", tolerance: float = DEFAULT_TOLERANCE,
                           optimize: bool = True, seed: int = 0, params_as_inputs: bool = False) -> None:
    """Optimize (as a build does), compile for the host with TVM, run the library in TVM's VM, and
    compare with onnxruntime on the *unoptimized* model.

    ``params_as_inputs`` compiles the same kernels with the weights passed at run time instead of
    embedded (hundreds of MB for VGG-sized nets): for keeping CI fast on very large models.
    """
    from graphgen.compile import compile_model, resolve_target, run_library
    from graphgen.optimize import optimize as run_optimizer

    spec = resolve_target(target)
    optimized = run_optimizer(model).model if optimize else model
    inputs = random_inputs(model, seed)
    expected = run_onnxruntime(model, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "model.so"
        info = compile_model(optimized, spec, lib, params_as_inputs=params_as_inputs)
        got = run_library(lib, spec, optimized, inputs, info.get("detached_params"))
    c = compare(got, expected, [o.name for o in model.graph.output], tolerance)
    assert c.ok, c.summary() + (f" ({c.detail})" if c.detail else "")


def onnx_full_check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def run_recipe_on_ort(model: onnx.ModelProto, seed: int = 0) -> list[np.ndarray]:
    outs = run_onnxruntime(model, random_inputs(model, seed))
    for o in outs:
        assert np.all(np.isfinite(o)), "non-finite output"
    return outs


def single_conv_model(c: int, k: int, h: int, w: int | None = None, *, kernel: int = 3, padding=1, batch: int = 1,
                      residual: bool = False, bias: bool = True, stride: int = 1, groups: int = 1,
                      relu: bool = True) -> onnx.ModelProto:
    """One conv (``c`` -> ``k`` channels, ``kernel`` square) with its usual tail: optional
    residual add of the input, then ReLU. For kernel-class tests."""
    from graphgen.builder import GraphBuilder

    b = GraphBuilder(f"conv{kernel}_{c}_{k}_{h}")
    x = b.input("input", (batch, c, h, w or h))
    y = b.conv(x, k, kernel, stride=stride, padding=padding, groups=groups, bias=bias, name="conv")
    if residual:
        y = b.add(y, x)
    b.output(b.relu(y) if relu else y, "out")
    return b.build()


def winograd_and_pointwise_model() -> onnx.ModelProto:
    """Two kernels of graphgen's own classes: a 3x3 conv (Winograd F(4x4)) and a 1x1 conv
    (pointwise GEMM), each with ReLU, at 16x16. For tuning tests."""
    from graphgen.builder import GraphBuilder

    b = GraphBuilder("wino_and_pw")
    x = b.input("input", (1, 16, 16, 16))
    x = b.relu(b.conv(x, 16, 3, padding=1, name="c3"))
    x = b.relu(b.conv(x, 32, 1, name="c1"))
    b.output(x, "out")
    return b.build()


def compile_and_compare(model: onnx.ModelProto, out_dir: Path, target: str = "x86",
                        tolerance: float = DEFAULT_TOLERANCE, threads: int | None = None):
    """Compile ``model`` for ``target`` (scheduled for ``threads`` threads; default: the
    target's default count) into ``out_dir/m.so`` (no optimizer) and, where it runs here,
    compare it with onnxruntime. Returns (default-schedule kinds, comparison or None) and
    asserts no default schedule failed."""
    from graphgen.compile import compile_model, resolve_target, run_library

    spec = resolve_target(target, threads=threads)
    info = compile_model(model, spec, Path(out_dir) / "m.so")
    s = info["schedules"]
    assert not s.get("default_schedule_failures") and not s.get("default_schedule_fallbacks"), s
    kinds = s.get("default_schedule_kinds", {})
    if not spec.host_runnable:
        return kinds, None
    x = random_inputs(model)
    got = run_library(Path(out_dir) / "m.so", spec, model, x)
    return kinds, compare(got, run_onnxruntime(model, x), [o.name for o in model.graph.output], tolerance)


def every_knob_at(option: int, monkeypatch) -> dict:
    """Default schedules built with every knob at ``option`` (its last option where it has
    fewer), through pytest's ``monkeypatch``; returns the knobs they met and their option counts."""
    from graphgen.tune import defaults
    from graphgen.tune.defaults import Knobs

    seen = {}
    original = defaults.default_schedule

    def with_option(func, isa, mod=None, knobs=None, **kwargs):
        k = Knobs(others=option)
        out = original(func, isa, mod=mod, knobs=k, **kwargs)
        seen.update(k.seen)
        return out

    monkeypatch.setattr(defaults, "default_schedule", with_option)
    return seen


def scheduled_kernel_tir(model: onnx.ModelProto, threads: int, target: str = "avx512") -> str:
    """The TIR (TVMScript) of ``model``'s one conv kernel after graphgen's default schedule, built
    as ``graphgen tune`` and ``build`` do for ``target`` at ``threads`` threads. For tests of a
    schedule's structure (which loops are parallel, what is computed where)."""
    from tvm import tirx

    from graphgen.compile import resolve_target
    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune.pipeline import fuse, schedule_kernels, tuning_target

    tvm_target = tuning_target(resolve_target(target, threads=threads))
    with tvm_target:
        mod = schedule_kernels(fuse(import_onnx(model), tvm_target), tvm_target)
    (f,) = [f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)
            and any(s in gv.name_hint for s in ("pointwise", "conv", "phase"))]
    return f.script()


def parallel_loops(tir_text: str) -> list[str]:
    """The names of the parallel loops in a kernel's TVMScript, in order."""
    import re

    return re.findall(r"for (\w+) in T\.parallel", tir_text)
