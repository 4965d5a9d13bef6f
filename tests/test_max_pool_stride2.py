"""3x3 / stride-2 max pools as graphgen's vectorized kernel (graphgen.tune.max_pool_stride2),
against onnxruntime (a max pool is exact: relative L2 must be 0, checked at < 1e-7)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphgen.compile import resolve_target
from graphgen.testing import compile_and_compare
from graphgen.tune.max_pool_stride2 import KIND

TOL = 1e-7


def _pool_model(c, h, w, pads, *, ceil=False, batch=1, kernel=3, stride=2):
    # inputs shifted below zero: a padding read as 0 instead of "below everything" shows
    shift = numpy_helper.from_array(np.array(10.0, np.float32), "shift")
    nodes = [helper.make_node("Sub", ["x", "shift"], ["s"]),
             helper.make_node("MaxPool", ["s"], ["y"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                              pads=list(pads), ceil_mode=int(ceil))]
    g = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shift])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


CASES = {
    "shufflenet_pad1": dict(c=8, h=40, w=40, pads=[1, 1, 1, 1]),        # first column scalar
    "squeezenet_ceil": dict(c=8, h=33, w=33, pads=[0, 0, 0, 0], ceil=True),  # every output interior
    "ceil_past_the_edge": dict(c=4, h=34, w=34, pads=[0, 0, 0, 0], ceil=True),  # last column's window leaves the row
    "pad_bottom_right": dict(c=4, h=32, w=32, pads=[0, 0, 1, 1]),
    "pad_top_left": dict(c=4, h=31, w=31, pads=[1, 1, 0, 0]),
    "rectangular": dict(c=3, h=20, w=50, pads=[1, 1, 1, 1]),
    "narrow_rows_scalar": dict(c=5, h=9, w=9, pads=[1, 1, 1, 1]),       # 5 outputs a row: no whole vector
    "last_vector_overlaps": dict(c=2, h=27, w=27, pads=[0, 0, 0, 0], ceil=True),  # 13 outputs: 8 + 8 overlapping
    "batch2": dict(c=3, h=24, w=24, pads=[1, 1, 1, 1], batch=2),
    "many_channels_parallel": dict(c=64, h=56, w=56, pads=[1, 1, 1, 1]),  # above the parallel threshold
}


# the same geometries with rows taken rows-first (the window's rows maxed into a row buffer
# first, the kernel's form from ROW_MIN columns), plus rows that take that form by default
WIDE = {
    "wide_pad1": dict(c=2, h=70, w=70, pads=[1, 1, 1, 1]),
    "wide_ceil_odd": dict(c=2, h=67, w=67, pads=[0, 0, 0, 0], ceil=True),
}


@pytest.mark.parametrize("rows_first", [False, True], ids=["three_rows", "rows_first"])
@pytest.mark.parametrize("name", list(CASES) + list(WIDE))
def test_stride2_max_pools_match_onnxruntime(name, rows_first, tmp_path, monkeypatch):
    from graphgen.tune import max_pool_stride2

    monkeypatch.delenv("GRAPHGEN_POOL_SHUFFLES", raising=False)
    geometry = {**CASES, **WIDE}[name]
    if rows_first:
        monkeypatch.setattr(max_pool_stride2, "ROW_MIN", 0)  # every row at least a vector wide
    else:
        monkeypatch.setattr(max_pool_stride2, "ROW_MIN", 10_000)
    kinds, c = compile_and_compare(_pool_model(**geometry), tmp_path, "x86", TOL)
    assert kinds.get(KIND) == 1, kinds
    assert c.ok, c.summary()


@pytest.mark.parametrize("kwargs", [dict(kernel=3, stride=1, pads=[1, 1, 1, 1]), dict(kernel=2, stride=2, pads=[0] * 4),
                                    dict(kernel=3, stride=2, pads=[2, 2, 2, 2])])
def test_other_pools_keep_graphgens_pool_schedule(kwargs, tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHGEN_POOL_SHUFFLES", raising=False)
    kinds, c = compile_and_compare(_pool_model(4, 20, 20, **kwargs), tmp_path, "x86", TOL)
    assert KIND not in kinds and any(k.startswith("pool") for k in kinds), kinds
    assert c.ok, c.summary()


def test_the_kernel_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHGEN_POOL_SHUFFLES", "0")
    kinds, c = compile_and_compare(_pool_model(**CASES["shufflenet_pad1"]), tmp_path, "x86", TOL)
    assert kinds == {"generic": 1, "pool (strided)": 1}, kinds
    assert c.ok, c.summary()


@pytest.mark.parametrize("target", ["arm", "armv7", "avx512"])
def test_the_kernel_compiles_for_neon_and_avx512(target, tmp_path, monkeypatch):
    from graphgen.compile.elf import check_elf

    monkeypatch.delenv("GRAPHGEN_POOL_SHUFFLES", raising=False)
    spec = resolve_target(target)
    kinds, _ = compile_and_compare(_pool_model(**CASES["shufflenet_pad1"]), tmp_path, target, TOL)
    assert kinds.get(KIND) == 1, kinds
    if not spec.host_runnable:
        ok, _, problem = check_elf(tmp_path / "m.so", spec.arch)
        assert ok, problem


def test_hand_written_kernels_are_not_tuning_tasks(monkeypatch):
    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune import pipeline

    monkeypatch.delenv("GRAPHGEN_POOL_SHUFFLES", raising=False)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    target = resolve_target("x86").tvm_target()
    fused = pipeline.fuse(import_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])), target)
    names = sorted(gv.name_hint for gv in fused.functions)
    assert any(n.startswith("max_pool2d_stride2") for n in names), names
    tasks = [t.task_name for t in pipeline.extract_tasks(fused, target)]
    assert tasks and not any("pool" in t for t in tasks), tasks


@pytest.mark.parametrize("geometry", [((2, 27, 27), (13, 13), 0), ((3, 40, 40), (20, 20), 1),
                                      ((2, 34, 34), (17, 17), 0), ((2, 67, 67), (33, 33), 0),
                                      ((2, 70, 70), (35, 35), 1)])
def test_the_kernel_writes_nothing_past_its_output(geometry):
    """The last vector of a row ends at the last interior output, never past the row: the output
    is a view at the start of a larger canary-filled buffer, whose tail must be untouched."""
    import tvm

    from graphgen.tune.max_pool_stride2 import ROW_MIN, max_pool_func

    (c, h, w), out_hw, pad = geometry
    assert (w >= ROW_MIN) == (w > 64)  # both forms among the geometries
    func = max_pool_func((1, c, h, w), out_hw, pad, pad, parallel=False).with_attr("global_symbol", "main")
    kernel = tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"]
    x = np.random.default_rng(0).standard_normal((1, c, h, w)).astype(np.float32)
    n_out = c * out_hw[0] * out_hw[1]
    buf = tvm.runtime.tensor(np.full(n_out + 64, 12345.0, np.float32))
    kernel(tvm.runtime.tensor(x), buf._create_view((1, c, *out_hw)))
    got = buf.numpy()
    assert (got[n_out:] == 12345.0).all()
    padded = np.full((1, c, 2 * out_hw[0] + 2, 2 * out_hw[1] + 2), -np.inf, np.float32)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    want = np.full((1, c, *out_hw), -np.inf, np.float32)
    for dy in range(3):
        for dx in range(3):
            want = np.maximum(want, padded[:, :, dy:dy + 2 * out_hw[0]:2, dx:dx + 2 * out_hw[1]:2])
    assert np.array_equal(got[:n_out].reshape(want.shape), want)


def test_with_a_database_the_kernel_counts_as_a_default_schedule(tmp_path, monkeypatch):
    """The manifest's counts add up with a tuning database too (the kernel is scheduled as
    written, not a database record)."""
    from graphgen.compile import compile_model
    from graphgen.tune import database as dbm
    from graphgen.tune.pipeline import tuning_target_json

    monkeypatch.delenv("GRAPHGEN_POOL_SHUFFLES", raising=False)
    spec = resolve_target("x86")
    dbm.create(tmp_path / "db", tuning_target_json(spec))
    info = compile_model(_pool_model(**CASES["shufflenet_pad1"]), spec, tmp_path / "m.so", database=tmp_path / "db")
    s = info["schedules"]
    assert s["pipeline"] == "graphgen" and s["default_schedule_kinds"].get(KIND) == 1, s
    assert s["from_database"] == 0 and s["plain_lowering"] == 0 and s["default_schedule"] == s["kernels"], s
