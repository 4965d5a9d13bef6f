"""Every registered recipe, end to end at its small test size:

* the optimizer (every pass checked against the graph before it on onnxruntime, never more nodes),
* a TVM x86 library whose outputs equal onnxruntime's on the raw recipe graph,
* a TVM aarch64 library (the `graphgen build MODEL --target arm` pipeline) that is an aarch64 ELF.

Both run LLVM's back end at opt-level 0: the same Relax/TIR lowering, the same kernels and the
same IEEE arithmetic (TVM does not enable fast-math), 2.5x faster to compile, which is what keeps
81 networks inside CI's time. The optimized back end that builds ship with is exercised on real
builds in tests/test_compile.py (x86 verified, arm, armv7, cuda) and tests/test_emulate.py
(aarch64 run under qemu).

Networks above BIG parameters are compiled with their weights as run-time arguments: the same
kernels, without writing several hundred MB libraries per test (a VGG's classifier alone is 400 MB);
`graphgen build` itself always embeds the weights (tests/test_compile.py covers that path).
"""

import contextlib

import pytest

from graphgen.compile import compile_model, resolve_target, run_library
from graphgen.compile.elf import check_elf
from graphgen.optimize import optimize
from graphgen.registry import build_recipe, get, names
from graphgen.verify import compare, random_inputs, run_onnxruntime

BIG = 30_000_000
LARGE = 100_000_000  # VGGs, FCN-8s/16s/32s, Wide ResNet-101: the ones that raise a worker's peak to 12-13.5 GB


@pytest.mark.parametrize("name", names())
def test_recipe_builds_for_x86_and_arm(name, tmp_path, large_build_lock):
    recipe = get(name)
    size = recipe.test_input_size or recipe.input_size
    g = build_recipe(name, input_size=size)
    detach = g.parameter_count > BIG
    # the networks above LARGE raise a worker's peak by up to 2.8 GB, to 12-13.5 GB, while they
    # compile (measured per test at stop 19): one of them at a time across workers, or two at
    # once run a 24 GB machine out of memory
    with large_build_lock() if g.parameter_count > LARGE else contextlib.nullcontext():
        _optimize_compile_and_check(name, size, g, detach, tmp_path)


def _optimize_compile_and_check(name, size, g, detach, tmp_path):
    result = optimize(g.model, verify=True)  # raises PassEquivalenceError naming a pass that breaks it
    report = result.report()
    assert report["nodes_after"] <= report["nodes_before"]
    optimized = result.model

    inputs = random_inputs(g.model)
    expected = run_onnxruntime(g.model, inputs)
    x86 = resolve_target({**resolve_target("x86").tvm_json, "opt-level": 0})
    info = compile_model(optimized, x86, tmp_path / "x86.so", params_as_inputs=detach)
    # every kernel got its class's schedule or none: no class schedule raised (a bug) and fell back
    assert not info["schedules"].get("default_schedule_fallbacks"), info["schedules"]["default_schedule_fallbacks"]
    got = run_library(tmp_path / "x86.so", x86, optimized, inputs, info.get("detached_params"))
    c = compare(got, expected, [o.name for o in g.model.graph.output])
    assert c.ok, f"{name} at {size}: TVM x86 vs onnxruntime: {c.summary()} {c.detail}"

    arm = resolve_target({**resolve_target("arm").tvm_json, "opt-level": 0})
    compile_model(optimized, arm, tmp_path / "arm.so", params_as_inputs=detach)
    ok, elf, problem = check_elf(tmp_path / "arm.so", "aarch64")
    assert ok, f"{name}: {problem}"
