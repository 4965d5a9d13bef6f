"""ShuffleNet V1 / V2 through the optimizer: no Transpose left, fewer nodes than onnxsim and
onnxslim on the same graph, outputs unchanged, and TVM still compiles the result."""

import onnx
import onnxsim
import pytest

from graphgen.optimize import optimize
from graphgen.optimize.graph import op_counts
from graphgen.registry import build_recipe, get
from graphgen.testing import assert_onnx_equivalent, assert_tvm_matches_ort

V2 = ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"]
V1 = ["shufflenet_v1", "shufflenet_v1_g2", "shufflenet_v1_g8"]


def _build(name, **options):
    return build_recipe(name, input_size=get(name).test_input_size, **options).model


def _shuffles(model):
    return op_counts(model).get("Transpose", 0)


@pytest.mark.parametrize("name", V2)
def test_v2_concat_shuffle_split_leaves_only_splits_and_concats(name):
    raw = _build(name)
    res = optimize(raw, verify=True)
    ops = op_counts(res.model)
    assert_onnx_equivalent(raw, res.model)  # relative L2 < 1e-5 against the raw graph
    assert not {"Transpose", "Reshape", "Gather", "BatchNormalization"} & set(ops)
    # 16 shuffles (48 nodes), 16 Concats and 13 Splits became one Split per branch output that
    # several units read and one Concat per branch input
    before = sum(op_counts(raw)[k] for k in ("Concat", "Split", "Reshape", "Transpose"))
    assert ops["Concat"] + ops["Split"] <= 32 < before
    sim, _ = onnxsim.simplify(raw)
    assert len(res.model.graph.node) < len(sim.graph.node)


@pytest.mark.parametrize("name,options", [(n, {}) for n in V1] + [("shufflenet_v1", {"megvii_shuffle": True})])
def test_v1_shuffle_between_grouped_convs_is_at_most_one_gather(name, options):
    raw = _build(name, **options)
    res = optimize(raw, verify=True)
    ops = op_counts(res.model)
    assert_onnx_equivalent(raw, res.model)
    assert "Transpose" not in ops and "Reshape" not in ops
    # grouped 1x1 convs on both sides cannot take a permutation that crosses groups: one Gather
    # per shuffle, except stage 2's first unit, whose ungrouped first conv emits the shuffled order
    assert ops["Gather"] == _shuffles(raw) - 1
    sim, _ = onnxsim.simplify(raw)
    assert len(res.model.graph.node) < len(sim.graph.node)


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v1"])
def test_fewer_nodes_than_onnxslim(name):
    onnxslim = pytest.importorskip("onnxslim", reason="onnxslim comes with the bench extra")
    raw = _build(name)
    m = onnx.ModelProto()
    m.CopyFrom(raw)
    assert len(optimize(raw).model.graph.node) < len(onnxslim.slim(m).graph.node)


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v1", "preact_resnet18"])
def test_tvm_compiles_the_optimized_graph(name):
    # optimizes, compiles for this host and compares with onnxruntime on the raw graph
    assert_tvm_matches_ort(_build(name))
