"""Mobile families: MobileNet V1/V2/V3, EfficientNet B0-B7, MnasNet, NASNet-A Mobile."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphgen.builder import GraphBuilder
from graphgen.registry import build_recipe, get
from graphgen.testing import run_recipe_on_ort
from recipes.mobilenet import (BlockArgs, decode_block, make_divisible, mobilenet_v3_config,
                               mobilenet_v3_features)

# torchvision 0.29 weights metadata ``num_params`` (shared/reference/model_facts.tsv; the mnasnet
# rows the table lacks are torchvision's MNASNet*_Weights meta).
TORCHVISION_PARAMS = {
    "mobilenet_v2": 3504872,
    "mobilenet_v3_small": 2542856,
    "mobilenet_v3_large": 5483032,
    "efficientnet_b0": 5288548,
    "efficientnet_b1": 7794184,
    "efficientnet_b2": 9109994,
    "efficientnet_b3": 12233232,
    "efficientnet_b4": 19341616,
    "efficientnet_b5": 30389784,
    "efficientnet_b6": 43040704,
    "efficientnet_b7": 66347960,
    "mnasnet0_5": 2218512,
    "mnasnet0_75": 3170208,
    "mnasnet1_0": 4383312,
    "mnasnet1_3": 6282256,
}
# Papers: MobileNet V1 1.0-224 Table 1/8 (4.24M, 569M mult-adds); NASNet-A Mobile 4@1056 Table 2
# (5.3M, 564M mult-adds).
PAPER = {
    "mobilenet_v1": (4.24e6, 569e6),
    "nasnet_a_mobile": (5.3e6, 564e6),
}
ALL = list(TORCHVISION_PARAMS) + list(PAPER)


def _small(name: str, **kw):
    return build_recipe(name, input_size=get(name).test_input_size, **kw)


def mult_adds(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of every Conv and Gemm (the papers' "mult-adds")."""
    inits = {i.name: i for i in model.graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            w = inits[node.input[1]]
            total += int(np.prod(shapes[node.output[0]])) * int(np.prod(w.dims[1:]))
    return total


# ------------------------------------------------------------------------------- every recipe

@pytest.mark.parametrize("name", ALL)
def test_builds_and_runs(name):
    r = get(name)
    g = _small(name)
    (out,) = run_recipe_on_ort(g.model)
    assert out.shape == (1, r.num_classes)
    if name in TORCHVISION_PARAMS:
        assert r.is_torchvision
        assert g.parameter_count == TORCHVISION_PARAMS[name]
    else:
        assert not r.is_torchvision
        assert abs(g.parameter_count - PAPER[name][0]) / PAPER[name][0] < 0.01


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_mult_adds_at_224(name):
    g = build_recipe(name)
    assert g.input_size == (224, 224)
    assert abs(mult_adds(g.model) - PAPER[name][1]) / PAPER[name][1] < 0.01


def test_torchvision_mult_adds():
    # torchvision's `_ops` (GMACs) at 224 for two representatives
    assert round(mult_adds(build_recipe("mobilenet_v2").model) / 1e9, 3) == 0.301
    assert round(mult_adds(build_recipe("mnasnet1_0").model) / 1e9, 3) == 0.314


# TVM x86 vs onnxruntime for every recipe at its test size: tests/test_zoo.py


# ------------------------------------------------------------------------------- state_dict names

def test_mobilenet_v2_names():
    sd = _small("mobilenet_v2").state_dict
    assert len(sd) == 314  # torchvision's state_dict length
    for k in ["features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight",
              "features.1.conv.1.weight", "features.1.conv.2.num_batches_tracked", "features.2.conv.0.0.weight",
              "features.2.conv.3.bias", "features.18.0.weight", "classifier.1.weight"]:
        assert k in sd, k
    assert "features.1.conv.3.weight" not in sd  # t=1: no expansion layer
    assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)


def test_mobilenet_v3_names():
    small = _small("mobilenet_v3_small").state_dict
    assert len(small) == 244
    assert small["features.1.block.1.fc1.weight"].shape == (8, 16, 1, 1)
    assert small["features.1.block.1.fc2.bias"].shape == (16,)
    assert "features.12.0.weight" in small and "classifier.3.weight" in small
    large = _small("mobilenet_v3_large").state_dict
    assert len(large) == 312
    assert large["features.4.block.2.fc1.weight"].shape == (24, 72, 1, 1)
    assert large["features.16.0.weight"].shape == (960, 160, 1, 1)
    assert large["classifier.0.weight"].shape == (1280, 960)


def test_efficientnet_names():
    sd = _small("efficientnet_b0").state_dict
    assert len(sd) == 360
    assert sd["features.1.0.block.0.0.weight"].shape == (32, 1, 3, 3)
    assert sd["features.1.0.block.1.fc1.weight"].shape == (8, 32, 1, 1)
    assert sd["features.2.1.block.2.fc1.weight"].shape == (6, 144, 1, 1)  # SE: input width 24 // 4
    assert sd["features.8.0.weight"].shape == (1280, 320, 1, 1)
    assert "features.7.0.block.3.1.running_mean" in sd and "classifier.1.bias" in sd


def test_efficientnet_variants_follow_torchvision():
    sizes = {f"efficientnet_b{i}": s for i, s in enumerate([224, 240, 288, 300, 380, 456, 528, 600])}
    for name, size in sizes.items():
        assert get(name).input_size == (size, size)
    # B5-B7 keep TF's BN epsilon; B0-B4 PyTorch's default
    eps = {n.input[1]: [a.f for a in n.attribute if a.name == "epsilon"][0]
           for n in _small("efficientnet_b5").model.graph.node if n.op_type == "BatchNormalization"}
    assert set(np.round(list(eps.values()), 6)) == {0.001}
    b0 = [a.f for n in _small("efficientnet_b0").model.graph.node if n.op_type == "BatchNormalization"
          for a in n.attribute if a.name == "epsilon"]
    assert set(np.round(b0, 6)) == {1e-5}


def test_mnasnet_names():
    sd = _small("mnasnet0_5").state_dict
    assert len(sd) == 314
    assert sd["layers.0.weight"].shape == (16, 3, 3, 3)
    assert sd["layers.8.0.layers.3.weight"].shape == (24, 1, 3, 3)  # 8 * expansion 3
    assert sd["layers.14.weight"].shape == (1280, 160, 1, 1)
    assert "layers.13.0.layers.7.running_var" in sd and "classifier.1.weight" in sd


def test_paper_model_names():
    v1 = _small("mobilenet_v1").state_dict
    assert v1["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert v1["features.1.depthwise.0.weight"].shape == (32, 1, 3, 3)
    assert v1["features.13.pointwise.0.weight"].shape == (1024, 1024, 1, 1)
    assert v1["classifier.1.weight"].shape == (1000, 1024)
    half = _small("mobilenet_v1", width_mult=0.5).state_dict
    assert half["features.13.pointwise.0.weight"].shape == (512, 512, 1, 1)
    nas = _small("nasnet_a_mobile").state_dict
    for k in ["conv0.conv.weight", "cell_stem_0.comb_iter_0_right.separable_1.depthwise_conv2d.weight",
              "cell_stem_1.path_2.conv.weight", "cell_0.final_path_bn.running_mean",
              "cell_1.conv_prev_1x1.conv.weight", "reduction_cell_0.comb_iter_4_left.bn_sep_2.bias",
              "cell_15.comb_iter_1_right.separable_2.pointwise_conv2d.weight", "last_linear.weight"]:
        assert k in nas, k
    assert nas["cell_stem_0.comb_iter_0_right.separable_1.pointwise_conv2d.weight"].shape == (11, 32, 1, 1)
    assert nas["last_linear.weight"].shape == (1000, 1056)
    assert not any(k.startswith(("cell_4.", "cell_5.", "cell_10.")) for k in nas)


# ------------------------------------------------------------------------------- pieces

def test_decode_block():
    assert decode_block("ir_r2_k3_s2_e6_c24") == BlockArgs("ir", repeats=2, kernel=3, stride=2, expand_ratio=6.0,
                                                           out=24, act="relu")
    b = decode_block("ir_k5_s2_x72_c40_se_hs")
    assert (b.expanded, b.out, b.se, b.act, b.repeats) == (72, 40, True, "hardswish", 1)
    assert decode_block("ir_r1_k3_s1_e1_c16_se_sw").act == "silu"
    for bad in ["xx_c3", "ir_k3", "ir_q4_c8"]:
        with pytest.raises(ValueError):
            decode_block(bad)


def test_make_divisible():
    assert make_divisible(32 * 0.75) == 24
    assert make_divisible(1280 * 1.1) == 1408
    assert make_divisible(10) == 16  # never more than 10% below


def _v3_backbone(scope, **kw):
    b = GraphBuilder("t")
    x = b.input("input", (1, 3, 64, 64))
    with b.scope(scope):
        outs = mobilenet_v3_features(b, x, **kw)
    return b, outs


def test_mobilenet_v3_features_backbone():
    b, outs = _v3_backbone("backbone")
    assert len(outs) == 17  # stem, 15 blocks, last conv: torchvision's features indices 0..16
    assert "backbone.0.0.weight" in b.initializers and "backbone.16.1.running_var" in b.initializers
    assert not any(k.startswith("backbone.features") for k in b.initializers)
    assert [o.shape[2] for o in outs] == [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 4, 4, 4, 2, 2, 2, 2]
    assert outs[-1].channels == 960
    # DeepLabV3 / LR-ASPP: dilated C4 keeps output stride 16; SSDlite: reduced tail halves C4 and the head
    _, dil = _v3_backbone("backbone", dilated=True)
    assert [o.shape[2] for o in dil[12:]] == [4, 4, 4, 4, 4]
    b, red = _v3_backbone(None, reduced_tail=True)
    assert [o.channels for o in red[12:]] == [112, 80, 80, 80, 480]
    assert b.initializers["14.block.0.0.weight"].shape == (480, 80, 1, 1)
    assert b.initializers["13.block.0.0.weight"].shape == (672, 112, 1, 1)  # first tail block keeps 672
    _, small = _v3_backbone(None, arch="small", dilated=True, reduced_tail=True)
    assert len(small) == 13 and small[-1].channels == 288 and small[-1].shape[2] == 4
    assert mobilenet_v3_config("small", reduced_tail=True)[2] == 512
    # the dilated depthwise conv carries dilation 2 and padding 4 (k5)
    conv = next(n for n in b.nodes if n.name == "13.block.1.0")
    attrs = {a.name: list(a.ints) for a in conv.attribute if a.ints}
    assert attrs["dilations"] == [1, 1] and attrs["strides"] == [2, 2]
    bd, _ = _v3_backbone(None, dilated=True)
    conv = next(n for n in bd.nodes if n.name == "13.block.1.0")
    attrs = {a.name: list(a.ints) for a in conv.attribute if a.ints}
    assert attrs["dilations"] == [2, 2] and attrs["strides"] == [1, 1] and attrs["pads"] == [4, 4, 4, 4]


def test_mobilenet_v3_options_match_torchvision_counts():
    # parameter counts measured on torchvision 0.28's modules with the same options
    g = _small("mobilenet_v3_large", width_mult=0.75, reduced_tail=True, dilated=True)
    assert g.parameter_count == 1620728
    g = _small("mobilenet_v3_small", reduced_tail=True, dilated=True)
    assert g.parameter_count == 1099672
    g = _small("mobilenet_v2", width_mult=0.5)
    assert g.parameter_count == 1968680


def test_nasnet_odd_sizes_keep_tf_same_shapes():
    # TF 'SAME': every stride-2 op outputs ceil(n / 2), also on odd maps (conv0 at 224 gives 111)
    g = build_recipe("nasnet_a_mobile", input_size=(67, 67))
    (out,) = run_recipe_on_ort(g.model)
    assert out.shape == (1, 1000)
