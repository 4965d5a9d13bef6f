"""3x3 / stride-2 depthwise convs as graphgen's shuffle kernel (graphgen.tune.depthwise_stride2),
with their fused bias and activation, against onnxruntime (fp32, relative L2 < 1e-5)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphgen.compile import resolve_target
from graphgen.testing import compile_and_compare
from graphgen.tune import depthwise_stride2
from graphgen.tune.depthwise_stride2 import KIND

TOL = 1e-5


def _dw_model(c, h, w=None, pads=(1, 1, 1, 1), *, batch=1, bias=True, tail="relu6", kernel=3, stride=2,
              dilation=1, pointwise_after=0):
    rng = np.random.default_rng(c * 1000 + h)
    w = w or h

    def out(size, before, after):
        return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1

    inits = [numpy_helper.from_array(rng.standard_normal((c, 1, kernel, kernel)).astype(np.float32), "w")]
    conv_in = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c" if tail else "y"], group=c, kernel_shape=[kernel, kernel],
                              strides=[stride, stride], pads=list(pads), dilations=[dilation, dilation])]
    if tail == "relu6":  # MobileNetV2's
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
    elif tail == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    if pointwise_after:  # a 1x1 conv to ``pointwise_after`` channels after it (a second kernel)
        inits.append(numpy_helper.from_array(rng.standard_normal((pointwise_after, c, 1, 1)).astype(np.float32), "pw"))
        nodes[-1].output[0] = "dw"
        nodes.append(helper.make_node("Conv", ["dw", "pw"], ["y"], kernel_shape=[1, 1]))
    g = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, pointwise_after or c,
                                                                                  out(h, pads[0], pads[2]),
                                                                                  out(w, pads[1], pads[3])])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


CASES = {
    # MobileNetV2 / ShuffleNetV2: padding 1, the first output column scalar, the rest 8-lane vectors
    "mobilenet_pad1": dict(c=8, h=40),
    "odd_width": dict(c=6, h=41, w=37),
    "no_padding": dict(c=4, h=33, pads=(0, 0, 0, 0)),          # every output interior
    "pad_bottom_right": dict(c=4, h=32, pads=(0, 0, 1, 1)),     # the last column scalar
    "pad_top_left": dict(c=4, h=31, pads=(1, 1, 0, 0)),
    "rectangular": dict(c=3, h=20, w=50),
    "last_vector_overlaps": dict(c=2, h=27, pads=(0, 0, 0, 0)),  # 13 outputs: 8 + 8 overlapping
    "narrow_4_lanes": dict(c=5, h=14),                          # 7 outputs: 4-lane vectors
    "wide_16_lanes": dict(c=3, h=56),                           # 27 interior: 16 lanes (AVX-512)
    "wide_last_overlaps": dict(c=2, h=41, pads=(0, 0, 0, 0)),   # 20 outputs: 16 + 16 overlapping
    "narrow_rows_scalar": dict(c=5, h=9),                       # 5 outputs, 3 interior: all scalar
    "batch2": dict(c=3, h=24, batch=2),
    "no_bias_relu": dict(c=8, h=28, bias=False, tail="relu"),
    "no_tail": dict(c=8, h=28, tail=None),                      # the conv writes the output itself
    "many_channels_parallel": dict(c=64, h=56),                 # above the parallel threshold
}


@pytest.mark.parametrize("name", list(CASES))
def test_stride2_depthwise_convs_match_onnxruntime(name, tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHGEN_DEPTHWISE_SHUFFLES", raising=False)
    kinds, c = compile_and_compare(_dw_model(**CASES[name]), tmp_path, "x86", TOL)
    assert kinds == {KIND: 1}, kinds  # one kernel: the bias and activation fused into it
    assert c.ok, c.summary()


@pytest.mark.parametrize("kwargs", [dict(stride=1), dict(kernel=5, pads=(2, 2, 2, 2)), dict(pads=(2, 2, 2, 2)),
                                    dict(dilation=2, pads=(2, 2, 2, 2))])
def test_other_depthwise_convs_keep_their_kernels(kwargs, tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHGEN_DEPTHWISE_SHUFFLES", raising=False)
    kinds, c = compile_and_compare(_dw_model(8, 32, **kwargs), tmp_path, "x86", TOL)
    assert KIND not in kinds and any(k.startswith("depthwise") for k in kinds), kinds
    assert c.ok, c.summary()


@pytest.mark.parametrize("c, h, parallel", [
    (64, 28, True),   # 12.5K outputs x 9 multiply-adds: worth a second thread (below 32K outputs)
    (4, 28, False),   # 784 outputs: one thread
])
def test_rows_are_parallel_by_the_work_of_their_outputs(c, h, parallel, monkeypatch):
    from graphgen.testing import parallel_loops, scheduled_kernel_tir

    monkeypatch.delenv("GRAPHGEN_DEPTHWISE_SHUFFLES", raising=False)
    tir = scheduled_kernel_tir(_dw_model(c, h), 2)
    assert bool(parallel_loops(tir)) == parallel, tir


def test_the_kernel_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHGEN_DEPTHWISE_SHUFFLES", "0")
    kinds, c = compile_and_compare(_dw_model(**CASES["mobilenet_pad1"]), tmp_path, "x86", TOL)
    assert kinds == {"depthwise conv2d (channel-blocked)": 1}, kinds
    assert c.ok, c.summary()


def test_wrong_weights_are_caught(tmp_path, monkeypatch):
    """The comparison can fail: the kernel given slightly different weights."""
    from tvm import relax

    monkeypatch.delenv("GRAPHGEN_DEPTHWISE_SHUFFLES", raising=False)
    def scaled(bb, call, fallback):
        facts = depthwise_stride2._facts(call)
        if facts is None:
            return fallback(bb, call)
        gv = bb.add_func(depthwise_stride2.depthwise_stride2_func(*facts), "depthwise_conv2d_stride2")
        w = call.args[1].value.numpy()
        return relax.call_tir(gv, [call.args[0], relax.const(w * 1.001)], call.ty)

    monkeypatch.setattr(depthwise_stride2, "legalize", scaled)
    kinds, c = compile_and_compare(_dw_model(**CASES["mobilenet_pad1"]), tmp_path, "x86", TOL)
    assert kinds == {KIND: 1}, kinds
    assert not c.ok


@pytest.mark.parametrize("target", ["arm", "armv7", "avx512"])
def test_the_kernel_compiles_for_neon_and_avx512(target, tmp_path, monkeypatch):
    from graphgen.compile.elf import check_elf

    monkeypatch.delenv("GRAPHGEN_DEPTHWISE_SHUFFLES", raising=False)
    spec = resolve_target(target)
    kinds, c = compile_and_compare(_dw_model(**CASES["odd_width"]), tmp_path, target, TOL)
    assert kinds == {KIND: 1}, kinds
    if spec.host_runnable:
        assert c.ok, c.summary()
    else:
        ok, _, problem = check_elf(tmp_path / "m.so", spec.arch)
        assert ok, problem


@pytest.mark.parametrize("widest", [depthwise_stride2.LANES, depthwise_stride2.WIDE_LANES])
@pytest.mark.parametrize("geometry", [((2, 27, 27), (13, 13), 0), ((3, 40, 40), (20, 20), 1),
                                      ((2, 14, 14), (7, 7), 1), ((2, 41, 37), (21, 19), 1),
                                      ((2, 41, 41), (20, 20), 0), ((2, 64, 64), (32, 32), 1)])
def test_the_kernel_writes_nothing_past_its_output(geometry, widest):
    """The last vector of a row ends at the last interior output, never past the row: the output
    is a view at the start of a larger canary-filled buffer, whose tail must be untouched."""
    import tvm

    (c, h, w), out_hw, pad = geometry
    func = depthwise_stride2.depthwise_stride2_func((1, c, h, w), out_hw, pad, pad, widest).with_attr(
        "global_symbol", "main")
    kernel = tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    n_out = c * out_hw[0] * out_hw[1]
    buf = tvm.runtime.tensor(np.full(n_out + 64, 12345.0, np.float32))
    kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(wt), buf._create_view((1, c, *out_hw)))
    got = buf.numpy()
    assert (got[n_out:] == 12345.0).all()
    padded = np.zeros((1, c, 2 * out_hw[0] + 2, 2 * out_hw[1] + 2), np.float32)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    want = np.zeros((1, c, *out_hw), np.float32)
    for dy in range(3):
        for dx in range(3):
            want += wt[None, :, 0, dy, dx, None, None] * padded[:, :, dy:dy + 2 * out_hw[0]:2, dx:dx + 2 * out_hw[1]:2]
    err = np.linalg.norm(got[:n_out] - want.ravel()) / np.linalg.norm(want)
    assert err < TOL, err


def test_avx512_rows_of_16_interior_outputs_take_whole_registers():
    from graphgen.tune.depthwise_stride2 import vector_lanes

    assert [vector_lanes(n, 16) for n in (55, 27, 16, 15, 13, 8, 6, 3)] == [16, 16, 16, 8, 8, 8, 4, 4]
    assert [vector_lanes(n) for n in (55, 27, 8, 7)] == [8, 8, 8, 4]  # AVX2, NEON
    for target, widest in (("avx512", 16), ("x86-64-v3", 8), ("arm", 8)):
        with resolve_target(target).tvm_target():
            assert depthwise_stride2.widest_lanes() == widest, target


def test_tuning_leaves_the_kernel_to_its_default_schedule(tmp_path, monkeypatch):
    """MetaSchedule cannot take the kernel (it cannot serialize its vector expressions), so it is
    no tuning task: a short tune of a model with it tunes the rest, and the build from that
    database still gives the kernel its default schedule and matches onnxruntime."""
    import onnx

    from graphgen import api
    from graphgen.tune import tune_onnx

    monkeypatch.delenv("GRAPHGEN_DEPTHWISE_SHUFFLES", raising=False)
    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(tmp_path / "cache"))
    model = _dw_model(**CASES["mobilenet_pad1"], pointwise_after=16)  # the pointwise conv: a task
    res = tune_onnx(model, resolve_target("x86"), trials=4, batch=2, db=tmp_path / "db")
    assert res.tasks == res.covered == 1 and not res.interrupted
    assert not any("depthwise" in p["name"] for p in res.per_task), res.per_task
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    built = api.build(str(path), "x86", out=tmp_path / "built", db=tmp_path / "db")
    assert built.manifest["verification"]["status"] == "passed"
    t = built.manifest["tuning"]
    assert t["kernels"] == 2 and t["records_used"] == 1 and t["default_schedules"] == 1, t
