"""The first optimizer passes, each proven equivalent on onnxruntime."""

import numpy as np
import onnx
import pytest

from graphgen.builder import GraphBuilder
from graphgen.errors import PassEquivalenceError
from graphgen.optimize import PASS_ORDER, load_pass, optimize
from graphgen.optimize.graph import op_counts
from graphgen.registry import build_recipe
from graphgen.testing import assert_onnx_equivalent


def _conv_bn_model(bias: bool, groups: int = 1, shared_output: bool = False):
    b = GraphBuilder("cb", seed=3)
    x = b.input("input", (1, 8, 12, 12))
    y = b.conv(x, 16, 3, padding=1, groups=groups, bias=bias, name="conv")
    z = b.batch_norm(y, name="bn", eps=1e-3)
    out = b.relu(z)
    b.output(out, "out")
    if shared_output:
        b.output(y, "conv_out")  # the conv output is needed too: folding must not happen
    return b.build()


def _apply(pass_name, model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    n = load_pass(pass_name).run(m)
    onnx.checker.check_model(m, full_check=True)
    return m, n


@pytest.mark.parametrize("bias,groups", [(True, 1), (False, 1), (False, 8), (True, 4)])
def test_fold_batchnorm_into_conv_is_exact(bias, groups):
    model = _conv_bn_model(bias, groups)
    folded, n = _apply("fold_batchnorm", model)
    assert n == 1
    assert "BatchNormalization" not in op_counts(folded)
    assert_onnx_equivalent(model, folded)


def test_fold_batchnorm_leaves_a_shared_conv_output_alone():
    model = _conv_bn_model(True, shared_output=True)
    folded, n = _apply("fold_batchnorm", model)
    assert n == 0
    assert op_counts(folded) == op_counts(model)


def test_remove_identity_drops_dropout_and_identity_keeping_output_names():
    g = build_recipe("squeezenet1_1", input_size=(64, 64))
    out, n = _apply("remove_identity", g.model)
    assert n >= 2
    counts = op_counts(out)
    assert "Dropout" not in counts and "Identity" not in counts
    assert [o.name for o in out.graph.output] == ["output"]
    assert_onnx_equivalent(g.model, out)


def test_simplify_is_equivalent():
    model = _conv_bn_model(True)
    out, _ = _apply("simplify", model)
    assert_onnx_equivalent(model, out)


def test_pipeline_on_squeezenet_and_report():
    g = build_recipe("squeezenet1_0", input_size=(64, 64))
    res = optimize(g.model, verify=True)
    assert_onnx_equivalent(g.model, res.model)
    rep = res.report()
    assert rep["nodes_after"] < rep["nodes_before"]
    assert [p["pass"] for p in rep["passes"]] == PASS_ORDER
    assert "total" in res.format()


def test_a_pass_that_changes_outputs_stops_with_its_name(monkeypatch):
    import graphgen.optimize.fold_batchnorm as fb

    real_run = fb.run

    def broken(model):
        n = real_run(model)
        for init in model.graph.initializer:
            if init.name == "conv.bias":
                arr = onnx.numpy_helper.to_array(init) + 1.0
                init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        return n

    monkeypatch.setattr(fb, "run", broken)
    with pytest.raises(PassEquivalenceError, match="fold_batchnorm"):
        optimize(_conv_bn_model(True), verify=True)
