"""Recipes: ShuffleNet V2 (torchvision) and V1 (paper), Xception, SqueezeNet bypass variants, flattened CNN."""

from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphgen.registry import build_recipe, get
from graphgen.testing import onnx_full_check, run_recipe_on_ort

# torchvision 0.29 num_params (/work/shared/reference/model_facts.tsv)
SHUFFLENET_V2_PARAMS = {
    "shufflenet_v2_x0_5": 1366792,
    "shufflenet_v2_x1_0": 2278604,
    "shufflenet_v2_x1_5": 3503624,
    "shufflenet_v2_x2_0": 7393996,
}
# megvii-model/ShuffleNet-Series ShuffleNetV1/README.md: (groups, scale) -> (#params in M, FLOPs in M), both
# printed rounded (params to 0.1M). Their "FLOPs" are multiply-adds of convs and the classifier at 224.
MEGVII_V1 = {
    (3, 0.5): (0.7, 38), (8, 0.5): (1.0, 40),
    (3, 1.0): (1.9, 138), (8, 1.0): (2.4, 138),
    (3, 1.5): (3.4, 292), (8, 1.5): (4.3, 290),
    (3, 2.0): (5.4, 524), (8, 2.0): (6.5, 522),
}
# Paper Table 1, complexity of the 1x networks (MFLOPs = multiply-adds) by groups
PAPER_V1_COMPLEXITY = {1: 143, 2: 140, 3: 137, 4: 133, 8: 137}
XCEPTION_PARAMS = 22_855_952  # Xception paper Table 3 (= Keras Xception trainable parameters)
SQUEEZENET1_0_PARAMS = 1_248_424  # torchvision squeezenet1_0


@lru_cache(maxsize=None)
def small(name, **options):
    """The recipe built at its small test input size (cached: several tests read the same graph)."""
    return build_recipe(name, input_size=get(name).test_input_size, **options)


def macs(model: onnx.ModelProto) -> int:
    """Multiply-adds of Conv and Gemm nodes, from the inferred output shapes."""
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            total += int(np.prod(shapes[n.output[0]])) * int(np.prod(weights[n.input[1]][1:]))
    return total


def shuffle_patterns(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """Every Reshape(5-D) -> Transpose(0, 2, 1, 3, 4) -> Reshape(4-D) chain, as exporters emit a channel shuffle."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = []
    for t in model.graph.node:
        if t.op_type != "Transpose" or list(t.attribute[0].ints) != [0, 2, 1, 3, 4]:
            continue
        before = producer.get(t.input[0])
        after = consumers.get(t.output[0], [])
        if (before is not None and before.op_type == "Reshape" and len(inits[before.input[1]]) == 5
                and len(after) == 1 and after[0].op_type == "Reshape" and len(inits[after[0].input[1]]) == 4):
            found.append((before, t, after[0]))
    return found


def shuffle_groups(model: onnx.ModelProto) -> list[int]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [int(inits[first.input[1]][1]) for first, _, _ in shuffle_patterns(model)]


def check_runs(g, num_classes):
    onnx_full_check(g.model)
    (out,) = run_recipe_on_ort(g.model)
    assert out.shape == (1, num_classes)


# ------------------------------------------------------------------------------------------------ ShuffleNet V2
@pytest.mark.parametrize("name", sorted(SHUFFLENET_V2_PARAMS))
def test_shufflenet_v2_params_keys_and_runs(name):
    g = small(name)
    assert g.parameter_count == SHUFFLENET_V2_PARAMS[name]
    check_runs(g, 1000)
    keys = set(g.state_dict)
    for k in ("conv1.0.weight", "conv1.1.running_var", "conv1.1.num_batches_tracked",
              "stage2.0.branch1.0.weight", "stage2.0.branch1.2.weight", "stage2.0.branch1.3.bias",
              "stage2.1.branch2.0.weight", "stage2.1.branch2.3.weight", "stage3.7.branch2.6.running_mean",
              "stage4.3.branch2.5.weight", "conv5.0.weight", "conv5.1.weight", "fc.weight", "fc.bias"):
        assert k in keys, k
    assert "stage2.1.branch1.0.weight" not in keys  # stride-1 units have an empty branch1
    # 3 stage-opening units x 5 BN + 13 stride-1 units x 3 BN + conv1 + conv5, 5 state_dict entries each
    assert sum(k.endswith("running_mean") for k in keys) == 3 * 5 + 13 * 3 + 2


def test_shufflenet_v2_depthwise_and_torch_layout():
    sd = small("shufflenet_v2_x1_0").state_dict
    assert sd["stage2.0.branch1.0.weight"].shape == (24, 1, 3, 3)  # depthwise on the stage input
    assert sd["stage2.0.branch2.0.weight"].shape == (58, 24, 1, 1)
    assert sd["stage3.1.branch2.0.weight"].shape == (116, 116, 1, 1)  # stride 1: on one half
    assert sd["stage3.1.branch2.3.weight"].shape == (116, 1, 3, 3)
    assert sd["fc.weight"].shape == (1000, 1024)


@pytest.mark.parametrize("name", sorted(SHUFFLENET_V2_PARAMS))
def test_shufflenet_v2_shuffle_pattern_and_split_chain(name):
    model = small(name).model
    patterns = shuffle_patterns(model)
    assert len(patterns) == 16  # one shuffle per unit (4 + 8 + 4), with 2 groups
    assert shuffle_groups(model) == [2] * 16
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert len(splits) == 13  # x.chunk(2, dim=1) in every stride-1 unit
    for split in splits:
        # Concat -> Reshape -> Transpose -> Reshape -> Split: the chain the optimizer fuses
        last = producer[split.input[0]]
        transpose = producer[last.input[0]]
        first = producer[transpose.input[0]]
        concat = producer[first.input[0]]
        assert [last.op_type, transpose.op_type, first.op_type, concat.op_type] == \
            ["Reshape", "Transpose", "Reshape", "Concat"]
        assert len(split.output) == 2
        halves = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == split.input[1]))
        assert halves[0] == halves[1]
        # the left half goes straight into the unit's Concat
        assert [c.op_type for c in consumers[split.output[0]]] == ["Concat"]


def test_shufflenet_v2_flops_match_torchvision():
    # torchvision's _ops for x1_0: 0.145 GFLOPS (multiply-adds) at 224
    assert macs(build_recipe("shufflenet_v2_x1_0").model) / 1e9 == pytest.approx(0.145, rel=0.01)


# TVM x86 vs onnxruntime for every recipe at its test size: tests/test_zoo.py


# ------------------------------------------------------------------------------------------------ ShuffleNet V1
def test_shufflenet_v1_params_and_macs():
    g = build_recipe("shufflenet_v1")  # 224: the MAC count needs the real size
    # 1,864,728 parameters. megvii's README prints 1.9M (to 0.1M); mmpretrain's 1.87M is this network
    # plus a classifier bias (1,865,728). Strictly "within 1% of 1.9M" would need >= 1,881,000: the
    # architecture of Table 1 gives 1.86M, so the check is: rounds to 1.9M and within 1% of 1.87M.
    assert round(g.parameter_count / 1e6, 1) == 1.9
    assert g.parameter_count + 1000 == pytest.approx(1.87e6, rel=0.01)
    # 137,460,672 multiply-adds at 224: paper Table 1 gives 137M for g=3, megvii's README 138M.
    assert macs(g.model) / 1e6 == pytest.approx(137, rel=0.01)


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8])
def test_shufflenet_v1_table1_complexity(groups):
    name = "shufflenet_v1" if groups == 3 else f"shufflenet_v1_g{groups}"
    assert macs(build_recipe(name).model) / 1e6 == pytest.approx(PAPER_V1_COMPLEXITY[groups], rel=0.015)


@pytest.mark.parametrize("groups,scale", sorted(MEGVII_V1))
def test_shufflenet_v1_matches_megvii_table(groups, scale):
    name = "shufflenet_v1" if groups == 3 else f"shufflenet_v1_g{groups}"
    g = build_recipe(name, scale_factor=scale)
    params_m, flops_m = MEGVII_V1[groups, scale]
    assert round(g.parameter_count / 1e6, 1) == params_m
    assert macs(g.model) / 1e6 == pytest.approx(flops_m, abs=1.0)  # printed to 1M


@pytest.mark.parametrize("name", ["shufflenet_v1", "shufflenet_v1_g1", "shufflenet_v1_g2", "shufflenet_v1_g4",
                                  "shufflenet_v1_g8"])
def test_shufflenet_v1_structure_and_runs(name):
    groups = 3 if name == "shufflenet_v1" else int(name[-1])
    g = small(name)
    check_runs(g, 1000)
    sd = g.state_dict
    # the very first 1x1 of stage 2 is not grouped (24 input channels), later ones are
    assert sd["features.0.branch_main_1.0.weight"].shape[1] == 24
    mid = sd["features.1.branch_main_1.0.weight"].shape[0]
    assert sd["features.1.branch_main_1.0.weight"].shape[1] == 4 * mid // groups
    assert sd["features.1.branch_main_1.3.weight"].shape == (mid, 1, 3, 3)  # depthwise
    assert sd["features.1.branch_main_2.0.weight"].shape[1] == mid // groups
    assert "classifier.0.weight" in sd and "classifier.0.bias" not in sd
    assert "first_conv.1.num_batches_tracked" in sd and "features.15.branch_main_2.1.running_var" in sd
    ops = [n.op_type for n in g.model.graph.node]
    assert ops.count("AveragePool") == 3  # the stride-2 shortcut of each stage
    if groups == 1:
        assert shuffle_patterns(g.model) == []
    else:
        assert shuffle_groups(g.model) == [groups] * 16
        # paper order: the shuffle sits between the first 1x1 (BN, ReLU) and the depthwise conv
        producer = {o: n for n in g.model.graph.node for o in n.output}
        consumers = {}
        for n in g.model.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for first, _, last in shuffle_patterns(g.model):
            assert producer[first.input[0]].op_type == "Relu"
            (dw,) = consumers[last.output[0]]
            assert dw.op_type == "Conv" and dw.name.endswith("branch_main_1.3")


def test_shufflenet_v1_megvii_shuffle_option():
    g = build_recipe("shufflenet_v1", input_size=(32, 32), megvii_shuffle=True)
    check_runs(g, 1000)
    assert g.parameter_count == small("shufflenet_v1").parameter_count
    # megvii reshapes to (n, g): a shuffle with mid/g groups, after the depthwise BN
    mids = [60] * 4 + [120] * 8 + [240] * 4
    assert shuffle_groups(g.model) == [m // 3 for m in mids]
    producer = {o: n for n in g.model.graph.node for o in n.output}
    for first, _, _ in shuffle_patterns(g.model):
        assert producer[first.input[0]].op_type == "BatchNormalization"


@pytest.mark.parametrize("scale", [0.25, 0.5, 1.5, 2.0])
def test_shufflenet_v1_scale_factors_run(scale):
    for name in ("shufflenet_v1", "shufflenet_v1_g8"):
        check_runs(build_recipe(name, input_size=(32, 32), scale_factor=scale), 1000)


def test_shufflenet_v1_rejects_unknown_scale():
    from graphgen.errors import UserError

    with pytest.raises(UserError):
        build_recipe("shufflenet_v1", input_size=(32, 32), scale_factor=0.75)


# TVM x86 vs onnxruntime for every recipe at its test size: tests/test_zoo.py


# ------------------------------------------------------------------------------------------------ Xception
def test_xception_params_keys_and_runs():
    g = small("xception")
    assert get("xception").input_size == (299, 299)
    assert g.parameter_count == XCEPTION_PARAMS
    check_runs(g, 1000)
    sd = g.state_dict
    assert sd["conv1.weight"].shape == (32, 3, 3, 3) and sd["conv2.weight"].shape == (64, 32, 3, 3)
    assert sd["block1.rep.0.conv1.weight"].shape == (64, 1, 3, 3)  # depthwise
    assert sd["block1.rep.0.pointwise.weight"].shape == (128, 64, 1, 1)
    assert sd["block1.skip.weight"].shape == (128, 64, 1, 1) and "block1.skipbn.running_mean" in sd
    assert sd["block4.rep.7.pointwise.weight"].shape == (728, 728, 1, 1)  # middle flow: 3 separable convs
    assert "block4.skip.weight" not in sd and "block11.rep.8.weight" in sd and "block12.rep.4.pointwise.weight" in sd
    assert sd["block12.rep.4.pointwise.weight"].shape == (1024, 728, 1, 1)  # exit flow grows last
    assert sd["conv4.pointwise.weight"].shape == (2048, 1536, 1, 1) and sd["fc.weight"].shape == (1000, 2048)
    assert not any(k.endswith("conv1.bias") or k.endswith("pointwise.bias") for k in sd)
    # separable conv = depthwise directly followed by pointwise, then BN (no activation in between)
    convs = {n.name: n for n in g.model.graph.node}
    producer = {o: n for n in g.model.graph.node for o in n.output}
    assert producer[convs["block5.rep.1.pointwise"].input[0]].name == "block5.rep.1.conv1"


def test_xception_padding_and_shapes_at_299():
    m = build_recipe("xception", check=False).model
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    pools = {n.name: list(next(a for a in n.attribute if a.name == "pads").ints)
             for n in m.graph.node if n.op_type == "MaxPool"}
    assert shapes["conv2"][2:] == [147, 147]
    # TensorFlow SAME: odd 147 pads both sides, even 74 only bottom/right
    assert pools["block1.rep.5"] == [1, 1, 1, 1]
    assert pools["block2.rep.6"] == [0, 0, 1, 1]
    assert shapes["block3.add"] == [1, 728, 19, 19] and shapes["block11.add"] == [1, 728, 19, 19]
    assert shapes["block12.add"] == [1, 1024, 10, 10] and shapes["relu4"] == [1, 2048, 10, 10]


# TVM x86 vs onnxruntime for every recipe at its test size: tests/test_zoo.py


# ------------------------------------------------------------------------------------------------ SqueezeNet bypass
def _bypass_param_count():
    # one 1x1 conv (+ bias) per complex bypass: fire2 96->128, fire4 128->256, fire6 256->384, fire8 384->512
    return sum(cin * cout + cout for cin, cout in [(96, 128), (128, 256), (256, 384), (384, 512)])


def test_squeezenet_simple_bypass():
    g = small("squeezenet1_0_simple_bypass")
    assert g.parameter_count == SQUEEZENET1_0_PARAMS
    assert set(g.state_dict) == set(small("squeezenet1_0").state_dict)
    check_runs(g, 1000)
    adds = [n for n in g.model.graph.node if n.op_type == "Add"]
    # identity around fire3, fire5, fire7, fire9 = features.4, .7, .9, .12; input is the previous layer
    assert [(a.name, a.input[1]) for a in adds] == [
        ("features.4.bypass_add", "features.3.concat"), ("features.7.bypass_add", "features.6.maxpool"),
        ("features.9.bypass_add", "features.8.concat"), ("features.12.bypass_add", "features.11.maxpool")]


def test_squeezenet_complex_bypass():
    g = small("squeezenet1_0_complex_bypass")
    assert g.parameter_count == SQUEEZENET1_0_PARAMS + _bypass_param_count() == 1_589_672
    check_runs(g, 1000)
    sd = g.state_dict
    for index, (cin, cout) in zip((3, 5, 8, 10), [(96, 128), (128, 256), (256, 384), (384, 512)]):
        assert sd[f"features.{index}.bypass.weight"].shape == (cout, cin, 1, 1)
        assert sd[f"features.{index}.bypass.bias"].shape == (cout,)
    assert sum(n.op_type == "Add" for n in g.model.graph.node) == 8
    assert {k for k in sd if "bypass" not in k} == set(small("squeezenet1_0").state_dict)


# TVM x86 vs onnxruntime for every recipe at its test size: tests/test_zoo.py


# ------------------------------------------------------------------------------------------------ flattened
def test_flattened_params_and_layers():
    g = small("flattened")
    assert get("flattened").input_size == (32, 32) and get("flattened").num_classes == 10
    check_runs(g, 10)

    def flat(cin, f, k=3, stages=2):  # per stage: lateral cin*f + f, vertical/horizontal k*f + f each
        return sum((c * f + f) + 2 * (k * f + f) for c in [cin] + [f] * (stages - 1))

    expected = (3 * 64 * 9 + 64) + flat(64, 64) + flat(64, 128) + flat(128, 128) + flat(128, 256) \
        + flat(256, 256) + (256 * 10 + 10)
    assert g.parameter_count == expected == 314_250
    sd = g.state_dict
    assert sd["features.1.lateral0.weight"].shape == (64, 64, 1, 1)
    assert sd["features.1.vertical0.weight"].shape == (64, 1, 3, 1)
    assert sd["features.1.horizontal1.weight"].shape == (64, 1, 1, 3)
    assert sd["features.3.lateral0.weight"].shape == (128, 64, 1, 1)
    # no non-linearity inside a flattened layer: L -> V -> H -> L -> V -> H -> ReLU
    producer = {o: n for n in g.model.graph.node for o in n.output}
    relu = next(n for n in g.model.graph.node if n.name == "features.1.relu")
    chain, t = [], relu.input[0]
    while len(chain) < 6:
        n = producer[t]
        chain.append(n.name)
        t = n.input[0]
    assert chain == [f"features.1.{k}" for k in
                     ("horizontal1", "vertical1", "lateral1", "horizontal0", "vertical0", "lateral0")]


def test_flattened_options():
    g = build_recipe("flattened", input_size=(8, 8), kernel_size=5, lvh_stages=1)
    check_runs(g, 10)
    assert g.state_dict["features.1.vertical0.weight"].shape == (64, 1, 5, 1)
    assert "features.1.lateral1.weight" not in g.state_dict


# TVM x86 vs onnxruntime for every recipe at its test size: tests/test_zoo.py
