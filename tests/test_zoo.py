"""Every registered recipe, end to end at its small test size:

* the optimizer (every pass checked against the graph before it on onnxruntime),
* a TVM x86 library whose outputs equal onnxruntime's on the raw recipe graph,
* a TVM aarch64 library (the `graphgen build MODEL --target arm` pipeline) that is an aarch64 ELF.
  Its LLVM back end runs at opt-level 0 here: the same Relax/TIR lowering and the same kernels,
  2.5x faster to compile, and it is the lowering, not LLVM's optimizer, that can refuse a graph.

Networks above BIG parameters are compiled with their weights as run-time arguments: the same
kernels, without writing several hundred MB libraries per test (a VGG's classifier alone is 400 MB);
`graphgen build` itself always embeds the weights (tests/test_compile.py covers that path).
"""

import pytest

from graphgen.compile import compile_model, resolve_target, run_library
from graphgen.compile.elf import check_elf
from graphgen.optimize import optimize
from graphgen.registry import build_recipe, get, names
from graphgen.verify import compare, random_inputs, run_onnxruntime

BIG = 30_000_000


@pytest.mark.parametrize("name", names())
def test_recipe_builds_for_x86_and_arm(name, tmp_path):
    recipe = get(name)
    size = recipe.test_input_size or recipe.input_size
    g = build_recipe(name, input_size=size)
    detach = g.parameter_count > BIG
    optimized = optimize(g.model, verify=True).model

    inputs = random_inputs(g.model)
    expected = run_onnxruntime(g.model, inputs)
    x86 = resolve_target("x86")
    info = compile_model(optimized, x86, tmp_path / "x86.so", params_as_inputs=detach)
    got = run_library(tmp_path / "x86.so", x86, optimized, inputs, info.get("detached_params"))
    c = compare(got, expected, [o.name for o in g.model.graph.output])
    assert c.ok, f"{name} at {size}: TVM x86 vs onnxruntime: {c.summary()} {c.detail}"

    arm = resolve_target({**resolve_target("arm").tvm_json, "opt-level": 0})
    compile_model(optimized, arm, tmp_path / "arm.so", params_as_inputs=detach)
    ok, elf, problem = check_elf(tmp_path / "arm.so", "aarch64")
    assert ok, f"{name}: {problem}"
