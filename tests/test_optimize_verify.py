"""optimize(verify=True): each pass against the graph before it, and models too chaotic for fp32."""

import numpy as np
import onnx
import pytest

from graphgen.builder import GraphBuilder
from graphgen.errors import PassEquivalenceError
from graphgen.optimize import MAX_NOISE_FLOOR, noise_floor, optimize
from graphgen.verify import random_inputs


def _chaotic(depth, gain):
    """Conv -> BN -> Tanh stacked with a gain above 1: tiny changes grow layer by layer, like a
    deep network with untrained weights."""
    b = GraphBuilder("chaos", seed=0)
    x = b.input("input", (1, 16, 6, 6))
    for i in range(depth):
        x = b.conv(x, 16, 1, bias=False, name=f"c{i}", weight_init="normal", weight_std=gain / 4.0)
        x = b.tanh(b.batch_norm(x, name=f"bn{i}"))
    b.output(x, "out")
    return b.build()


def test_a_model_with_a_noise_floor_above_tolerance_is_checked_against_it():
    model = _chaotic(30, 3.0)
    nf = noise_floor(model, random_inputs(model))
    assert 1e-5 < nf < MAX_NOISE_FLOOR
    res = optimize(model, passes=["fold_batchnorm"], verify=True)
    entry = next(p for p in res.passes if p["pass"] == "fold_batchnorm")
    assert entry["rewrites"] == 30 and "noise floor" in entry["verified"]


def test_the_noise_floor_does_not_hide_a_wrong_pass(monkeypatch):
    import graphgen.optimize.fold_batchnorm as fb

    real = fb.run

    def wrong(model):
        n = real(model)
        init = next(i for i in model.graph.initializer if i.name == "c3.weight")
        arr = onnx.numpy_helper.to_array(init) * np.float32(1.05)  # 5 %: far above the floor
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return n

    monkeypatch.setattr(fb, "run", wrong)
    with pytest.raises(PassEquivalenceError, match="'fold_batchnorm' changed the model's outputs"):
        optimize(_chaotic(30, 3.0), passes=["fold_batchnorm"], verify=True)


def test_a_model_too_chaotic_for_fp32_is_not_called_verified():
    model = _chaotic(60, 5.0)
    with pytest.raises(PassEquivalenceError, match="cannot be verified in fp32"):
        optimize(model, passes=["fold_batchnorm"], verify=True)
    assert "BatchNormalization" not in {n.op_type for n in optimize(model, verify=False).model.graph.node}


def test_a_pass_emitting_a_graph_onnxruntime_rejects_is_named(monkeypatch):
    import graphgen.optimize.collapse_reshape as cr

    def breaks(model):
        model.graph.node[0].op_type = "NoSuchOp"
        return 1

    monkeypatch.setattr(cr, "run", breaks)
    with pytest.raises(PassEquivalenceError, match="'collapse_reshape' produced a model onnxruntime cannot run"):
        optimize(_chaotic(2, 1.0), passes=["collapse_reshape"], verify=True)
