"""Small buffers stay on the stack (graphgen.tune.stack_tiles): register tiles of 1-4 KB and the
1-element "local" values of the TVMScript kernels. Which buffers the pass marks, that TVM then emits no workspace calls for them, and that kernels using them -
in parallel loops, where each thread needs its own - still compute the right values (fp32 against
numpy and onnxruntime, relative L2 < 1e-5)."""

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from graphgen.compile import resolve_target
from graphgen.testing import compile_and_compare, single_conv_model
from graphgen.tune import stack_tiles
from graphgen.tune.pipeline import compile_cpu

TOL = 1e-5
ROWS = 64


def _scratch_kernel(floats: int):
    """out[i, j] = sum over k < floats of (i + j * k) % 7, through a ``floats``-long scratch
    buffer per row of a parallel loop: every thread writes and reads its own copy."""

    @T.prim_func(s_tir=True)
    def scratch(out: T.Buffer((ROWS, 4), "float32")):
        T.func_attr({"global_symbol": "scratch", "tirx.noalias": True})
        for i in T.parallel(ROWS):
            with T.sblock("row"):
                vi = T.axis.spatial(ROWS, i)
                buf = T.sblock_alloc_buffer((floats,), "float32")
                for j in range(4):
                    for k in range(floats):
                        buf[k] = T.Cast("float32", T.truncmod(vi + j * k, 7))
                    out[vi, j] = T.float32(0)
                    for k in range(floats):
                        out[vi, j] = out[vi, j] + buf[k]

    return scratch


def _expected(floats: int) -> np.ndarray:
    i = np.arange(ROWS)[:, None, None]
    j = np.arange(4)[None, :, None]
    k = np.arange(floats)[None, None, :]
    return ((i + j * k) % 7).sum(axis=2).astype(np.float32)


def _build(floats: int, pipeline: str):
    mod = tvm.IRModule({"scratch": _scratch_kernel(floats)})
    return tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}), tir_pipeline=pipeline)


def _workspace_calls(module) -> int:
    """Calls of TVMBackendAllocWorkspace in an LLVM module (each loads the function pointer)."""
    return module.inspect_source("ll").count("load ptr, ptr @__TVMBackendAllocWorkspace")


@pytest.mark.parametrize("floats,on_stack", [(255, True), (256, True), (384, True), (1024, True),
                                             (1025, False), (2048, False)])
def test_buffers_from_1_kb_to_4_kb_are_marked_and_larger_ones_are_not(floats, on_stack):
    lib = _build(floats, stack_tiles.register())
    # TVM keeps buffers under 1 KB (256 floats) on the stack by itself; the pass adds 1-4 KB
    assert (_workspace_calls(lib.mod) == 0) == on_stack
    out = tvm.runtime.tensor(np.zeros((ROWS, 4), np.float32))
    lib["scratch"](out)
    np.testing.assert_array_equal(out.numpy(), _expected(floats))


def test_without_the_pass_tvm_allocates_a_kilobyte_from_its_workspace_pool():
    # the reason for the pass: TVM's own threshold is "under 1024 bytes"
    assert _workspace_calls(_build(256, "default").mod) > 0
    assert _workspace_calls(_build(255, "default").mod) == 0


def test_the_pass_can_be_turned_off(monkeypatch):
    # the weights' prefetch (graphgen.tune.prefetch_weights) shares the pipeline
    monkeypatch.setenv("GRAPHGEN_STACK_TILES", "0")
    monkeypatch.setenv("GRAPHGEN_PREFETCH", "0")
    assert stack_tiles.register() == "default"
    monkeypatch.delenv("GRAPHGEN_PREFETCH")
    assert stack_tiles.register() == stack_tiles.PIPELINE + "_no_stack"
    monkeypatch.delenv("GRAPHGEN_STACK_TILES")
    assert stack_tiles.register() == stack_tiles.PIPELINE


@pytest.mark.parametrize("kernel", ["max_pool", "depthwise"])
def test_values_named_in_a_tvmscript_kernel_need_no_workspace(kernel):
    # x0 = ..., a = x[...] in a loop body are 1-element "local" buffers: TVM takes each from its
    # workspace pool, per parallel iteration, whatever its size; the pass keeps them on the stack
    if kernel == "max_pool":
        from graphgen.tune.max_pool_stride2 import max_pool_func

        func = max_pool_func((1, 64, 27, 27), (13, 13), 0, 0)
    else:
        from graphgen.tune import depthwise_stride2

        func = depthwise_stride2.depthwise_stride2_func((1, 32, 28, 28), (14, 14), 1, 1)
    mod = tvm.IRModule({"kernel": func.with_attr("global_symbol", "kernel")})
    target = tvm.target.Target({"kind": "llvm"})
    assert _workspace_calls(tvm.compile(mod, target=target, tir_pipeline="default").mod) > 0
    assert _workspace_calls(tvm.compile(mod, target=target, tir_pipeline=stack_tiles.register()).mod) == 0


def _pointwise_library(cpu: str):
    from graphgen.compile.tvm_build import import_onnx

    model = single_conv_model(16, 64, 55, kernel=1, padding=0)
    return compile_cpu(import_onnx(model), resolve_target("x86", cpu=cpu), None, True, {}).mod.imports[0]


def test_an_avx512_pointwise_kernels_register_tile_has_no_workspace_call(monkeypatch):
    # SqueezeNet's 16 -> 64 1x1 conv at 55x55: its default AVX-512 tile is 2 vectors x 8
    # channels = 16 x 64 bytes. Compiled, not run: any x86 host can build for AVX-512.
    monkeypatch.setenv("GRAPHGEN_STACK_TILES", "0")
    before = _workspace_calls(_pointwise_library("skylake-avx512"))
    monkeypatch.delenv("GRAPHGEN_STACK_TILES")
    after = _workspace_calls(_pointwise_library("skylake-avx512"))
    # the padded GEMM rows (64 x 3040 floats) still come from the pool; the tile no longer does
    assert after < before, (before, after)


@pytest.mark.parametrize("kwargs", [dict(c=16, k=64, h=55), dict(c=32, k=192, h=28), dict(c=512, k=1000, h=13),
                                    dict(c=64, k=64, h=28, kernel=3, padding=1)])
def test_models_with_stacked_tiles_match_onnxruntime(kwargs, tmp_path, monkeypatch):
    # on an AVX-512 host these kernels run 16-24 accumulator tiles (1-1.5 KB) from the stack
    monkeypatch.delenv("GRAPHGEN_STACK_TILES", raising=False)
    kwargs = {"kernel": 1, "padding": 0, **kwargs}
    _, c = compile_and_compare(single_conv_model(**kwargs), tmp_path, "x86", TOL)
    assert c.ok, c.summary()


def test_the_manifest_records_whether_tiles_were_kept_on_the_stack(monkeypatch):
    from graphgen.compile.tvm_build import import_onnx

    mod = import_onnx(single_conv_model(8, 8, 8, kernel=1, padding=0))
    for env, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("GRAPHGEN_STACK_TILES", env)
        info = {}
        compile_cpu(mod, resolve_target("x86"), None, True, info)
        assert info["schedules"]["stack_tiles"] is expected
