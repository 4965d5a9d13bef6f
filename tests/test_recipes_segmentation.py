"""Segmentation recipes (FCN, U-Net, SegNet, DeepLab v1/v2/v3/v3+, PSPNet, LR-ASPP) and the
MaxPool-Indices/MaxUnpool rewrite TVM needs.

Parameter counts are checked against torchvision's published ``num_params`` (which include the
auxiliary head its COCO weights were trained with) and, for paper recipes, against sums written out
layer by layer here from the papers' tables, anchored on torchvision's VGG16/ResNet counts.
Outputs of the torchvision recipes were also compared offline with torch 2.13 + torchvision 0.28 on
the same state_dicts (relative L2 <= 2e-6, identical key sets); the key counts below are theirs.

TVM compiles are slow on the 2-core CI machine, so TVM runs on one representative per backbone kind
at a small input: VGG (deeplab_v1, segnet), U-Net, ResNet (pspnet), Xception (deeplab_v3plus) and
MobileNetV3 (lraspp), plus a small graph of FCN's own head ops (its pad-100 VGG makes even a 1x1
input a 200x200 map, about a minute in untuned TVM).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphgen.builder import GraphBuilder
from graphgen.compile.fix_maxunpool import rewrite_maxunpool_for_tvm
from graphgen.registry import build_recipe, get
from graphgen.testing import assert_tvm_matches_ort, onnx_full_check, run_recipe_on_ort
from graphgen.verify import compare, random_inputs, run_onnxruntime

NC = 21

# --------------------------------------------------------------------- reference parameter counts

# torchvision 0.29 weights metadata num_params (model_facts.tsv; the ResNet-101 ones from
# torchvision/models/segmentation/*.py): these models *with* the auxiliary FCNHead on layer3/C2.
TORCHVISION_WITH_AUX = {
    "fcn_resnet50": 35322218,
    "fcn_resnet101": 54314346,
    "deeplabv3_resnet50": 42004074,
    "deeplabv3_resnet101": 60996202,
    "deeplabv3_mobilenet_v3_large": 11029328,
}
TORCHVISION_NO_AUX = {"lraspp_mobilenet_v3_large": 3221538}
AUX_IN_CHANNELS = {"fcn_resnet50": 1024, "fcn_resnet101": 1024, "deeplabv3_resnet50": 1024,
                   "deeplabv3_resnet101": 1024, "deeplabv3_mobilenet_v3_large": 40}
# len(state_dict()) of torchvision's modules (aux off / aux on)
TORCHVISION_KEYS = {
    "fcn_resnet50": (326, 334), "fcn_resnet101": (632, 640), "deeplabv3_resnet50": (362, 370),
    "deeplabv3_resnet101": (668, 676), "deeplabv3_mobilenet_v3_large": (352, 360),
    "lraspp_mobilenet_v3_large": (319, None),
}

# torchvision num_params of the classifiers whose trunks the paper recipes reuse
VGG16, VGG16_BN, RESNET50, RESNET101 = 138357544, 138365992, 25557032, 44549160
VGG16_CLASSIFIER = (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
VGG16_FEATURES = VGG16 - VGG16_CLASSIFIER
VGG16_BN_FEATURES = VGG16_BN - VGG16_CLASSIFIER
RESNET50_TRUNK = RESNET50 - (2048 * 1000 + 1000)
RESNET101_TRUNK = RESNET101 - (2048 * 1000 + 1000)


def conv(cin, cout, k=1, bias=True, groups=1):
    return cin // groups * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def fcn_head(c, nc=NC):
    return conv(c, c // 4, 3, bias=False) + bn(c // 4) + conv(c // 4, nc)


def separable(cin, cout):  # depthwise 3x3 + BN, pointwise 1x1 + BN
    return conv(cin, cin, 3, bias=False, groups=cin) + bn(cin) + conv(cin, cout, bias=False) + bn(cout)


def aspp(cin, rates=3, sep=True):
    c = 256
    branch = separable(cin, c) if sep else conv(cin, c, 3, bias=False) + bn(c)
    return (2 * (conv(cin, c, bias=False) + bn(c)) + rates * branch
            + conv((rates + 2) * c, c, bias=False) + bn(c))


def xception65():
    def block(cin, widths, shortcut):
        ins = (cin,) + tuple(widths[:-1])
        n = sum(separable(i, o) for i, o in zip(ins, widths))
        return n + (conv(cin, widths[-1], bias=False) + bn(widths[-1]) if shortcut else 0)

    n = conv(3, 32, 3, bias=False) + bn(32) + conv(32, 64, 3, bias=False) + bn(64)
    n += block(64, [128] * 3, True) + block(128, [256] * 3, True) + block(256, [728] * 3, True)
    n += 16 * block(728, [728] * 3, False)
    n += block(728, [728, 1024, 1024], True) + block(1024, [1536, 1536, 2048], False)
    return n


def v3plus_decoder(low_channels):
    return (conv(low_channels, 48, bias=False) + bn(48) + separable(256 + 48, 256) + separable(256, 256)
            + conv(256, NC))


def fcn_vgg(stride, fc=4096):
    """VGG16 with fc6/fc7 convolutionalized (same sizes as torchvision's classifier.0/.3 at fc=4096)
    instead of the classifier, plus FCN's score and up-sampling layers."""
    n = VGG16_FEATURES + conv(512, fc, 7) + conv(fc, fc) + conv(fc, NC)
    assert fc != 4096 or n == VGG16_FEATURES + VGG16_CLASSIFIER - (4096 * 1000 + 1000) + conv(4096, NC)
    up = {32: [64], 16: [4, 32], 8: [4, 4, 16]}[stride]
    n += sum(NC * NC * k * k for k in up)
    n += conv(512, NC) * (stride <= 16) + conv(256, NC) * (stride == 8)
    return n


def unet_params(base=64, bilinear=False, nc=NC):
    widths = [base * m for m in (1, 2, 4, 8, 16)]
    n, cin = 0, 3
    for w in widths:
        n += conv(cin, w, 3) + conv(w, w, 3)
        cin = w
    for w in reversed(widths[:-1]):
        n += conv(2 * w, w, 1) if bilinear else 2 * w * w * 4 + w  # up-conv 2x2 halving channels
        n += conv(2 * w, w, 3) + conv(w, w, 3)
    return n + conv(base, nc)


SEGNET_DECODER = [(512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 256), (256, 256),
                  (256, 256), (256, 128), (128, 128), (128, 64), (64, 64)]

PAPER_PARAMS = {
    "unet": unet_params(),
    "segnet": VGG16_BN_FEATURES + sum(conv(i, o, 3) + bn(o) for i, o in SEGNET_DECODER) + conv(64, NC, 3),
    "deeplab_v1": VGG16_FEATURES + conv(512, 1024, 3) + conv(1024, 1024) + conv(1024, NC),
    "deeplab_v2": RESNET101_TRUNK + 4 * conv(2048, NC, 3),
    "deeplab_v3plus": xception65() + aspp(2048) + v3plus_decoder(256),
    "pspnet": RESNET50_TRUNK + 4 * (conv(2048, 512, bias=False) + bn(512)) + conv(4096, 512, 3, bias=False)
    + bn(512) + conv(512, NC),
}
# published totals: SegNet 29.46M (SegNet paper, Table 6), DeepLab-LargeFOV 20.5M (DeepLab v1, Table 2)
PUBLISHED = {"segnet": 29.46e6, "deeplab_v1": 20.5e6}

ALL = sorted(list(TORCHVISION_WITH_AUX) + list(TORCHVISION_NO_AUX) + list(PAPER_PARAMS))  # FCN-VGG: own tests


@functools.lru_cache(maxsize=None)
def built(name: str, size=None, **options):
    return build_recipe(name, input_size=size or get(name).test_input_size, **options)


def _outputs_are_input_sized(g, n_outputs=1):
    outs = run_recipe_on_ort(g.model)
    assert len(outs) == n_outputs
    for o in outs:
        assert o.shape == (1, g.num_classes, *g.input_size)
    return outs


# --------------------------------------------------------------------------------- every recipe


@pytest.mark.parametrize("name", ALL)
def test_builds_checks_and_runs_at_input_size(name):
    r = get(name)
    assert r.num_classes == NC and r.family and r.test_input_size
    g = built(name)
    onnx_full_check(g.model)
    _outputs_are_input_sized(g)


@pytest.mark.parametrize("name", sorted(TORCHVISION_WITH_AUX))
def test_torchvision_parameter_counts_with_and_without_aux(name):
    assert get(name).is_torchvision
    with_aux = build_recipe(name, input_size=(32, 32), aux_loss=True)
    assert with_aux.parameter_count == TORCHVISION_WITH_AUX[name]
    assert built(name).parameter_count == TORCHVISION_WITH_AUX[name] - fcn_head(AUX_IN_CHANNELS[name])
    keys_plain, keys_aux = TORCHVISION_KEYS[name]
    assert len(built(name).state_dict) == keys_plain and len(with_aux.state_dict) == keys_aux
    assert {o.name for o in with_aux.model.graph.output} == {"out", "aux"}
    _outputs_are_input_sized(with_aux, 2)
    for k in ["aux_classifier.0.weight", "aux_classifier.1.running_var", "aux_classifier.4.bias"]:
        assert k in with_aux.state_dict and k not in built(name).state_dict


def test_lraspp_parameter_count():
    g = built("lraspp_mobilenet_v3_large")
    assert g.parameter_count == TORCHVISION_NO_AUX["lraspp_mobilenet_v3_large"]
    assert len(g.state_dict) == TORCHVISION_KEYS["lraspp_mobilenet_v3_large"][0]


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    assert not get(name).is_torchvision
    assert built(name).parameter_count == PAPER_PARAMS[name]
    if name in PUBLISHED:
        assert abs(built(name).parameter_count - PUBLISHED[name]) / PUBLISHED[name] < 0.005


# FCN-VGG16 weighs 540 MB (fc6 alone is 103M parameters): built once at full width, not cached;
# FCN-32s/16s are checked at narrower fc6/fc7 (``fc_channels``) against the same layer-by-layer sums.


@pytest.mark.large_memory
def test_fcn8s_full_width():
    g = build_recipe("fcn8s", input_size=(32, 32))
    onnx_full_check(g.model)
    _outputs_are_input_sized(g)
    assert g.parameter_count == fcn_vgg(8)
    # FCN paper Table 1: FCN-VGG16 has 134M parameters (the fixed bilinear filters and skips are ~0.1%)
    assert abs(g.parameter_count - 134e6) / 134e6 < 0.005
    sd = g.state_dict
    assert sd["features.28.weight"].shape == (512, 512, 3, 3)  # torchvision vgg16 index
    assert sd["fc6.weight"].shape == (4096, 512, 7, 7) and sd["fc7.weight"].shape == (4096, 4096, 1, 1)
    assert sd["upscore8.weight"].shape == (NC, NC, 16, 16)
    w = sd["upscore2.weight"]
    assert np.allclose(w[0, 0], np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25]))
    assert not w[0, 1].any()  # one bilinear filter per class, no mixing
    assert [_attr(n, "strides") for n in _nodes(g, "ConvTranspose")] == [[2, 2], [2, 2], [8, 8]]
    assert _attr(_nodes(g, "Conv")[0], "pads") == [100, 100, 100, 100]
    assert len(_nodes(g, "Slice")) == 3  # score_pool4c, score_pool3c, final crop


@pytest.mark.parametrize("name, stride, size", [("fcn32s", 32, (32, 32)), ("fcn16s", 16, (1, 1)),
                                                ("fcn16s", 16, (45, 67))])
def test_fcn_variants_any_input_size(name, stride, size):
    # pad 100 + ceil pooling: even a 1x1 image survives fc6's 7x7 window
    r = get(name)
    assert r.num_classes == NC and not r.is_torchvision
    g = build_recipe(name, input_size=size, fc_channels=256)
    assert g.parameter_count == fcn_vgg(stride, fc=256)
    assert len(_nodes(g, "ConvTranspose")) == {32: 1, 16: 2}[stride]
    onnx_full_check(g.model)
    _outputs_are_input_sized(g)


# ------------------------------------------------------------------------------- state_dict names

TORCHVISION_NAMES = {
    "fcn_resnet50": ["backbone.conv1.weight", "backbone.bn1.running_mean", "backbone.layer1.0.conv1.weight",
                     "backbone.layer4.2.bn3.num_batches_tracked", "backbone.layer3.0.downsample.0.weight",
                     "classifier.0.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias"],
    "deeplabv3_resnet101": ["backbone.layer3.22.conv3.weight", "classifier.0.convs.0.0.weight",
                            "classifier.0.convs.3.1.running_var", "classifier.0.convs.4.1.weight",
                            "classifier.0.convs.4.2.bias", "classifier.0.project.0.weight",
                            "classifier.0.project.1.weight", "classifier.1.weight", "classifier.2.running_mean",
                            "classifier.4.bias"],
    "deeplabv3_mobilenet_v3_large": ["backbone.0.0.weight", "backbone.0.1.running_var",
                                     "backbone.4.block.2.fc1.weight", "backbone.16.0.weight",
                                     "classifier.0.convs.4.1.weight", "classifier.4.weight"],
    "lraspp_mobilenet_v3_large": ["backbone.16.1.weight", "classifier.cbr.0.weight", "classifier.cbr.1.running_mean",
                                  "classifier.scale.1.weight", "classifier.low_classifier.weight",
                                  "classifier.low_classifier.bias", "classifier.high_classifier.weight"],
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_NAMES))
def test_torchvision_state_dict_names(name):
    sd = built(name).state_dict
    missing = [k for k in TORCHVISION_NAMES[name] if k not in sd]
    assert not missing
    assert "classifier.0.bias" not in sd or name == "lraspp_mobilenet_v3_large"  # bias-free head convs
    assert sd["classifier.4.weight" if "lraspp" not in name else "classifier.low_classifier.weight"].shape[0] == NC


def test_torchvision_backbones_stop_where_torchvision_does():
    # IntermediateLayerGetter drops ResNet's avgpool/fc; MobileNetV3 keeps all 17 feature layers
    assert not any(k.startswith("backbone.fc") for k in built("fcn_resnet50").state_dict)
    sd = built("lraspp_mobilenet_v3_large").state_dict
    assert "backbone.16.0.weight" in sd and not any(k.startswith("backbone.17") for k in sd)
    assert sd["classifier.low_classifier.weight"].shape == (NC, 40, 1, 1)  # C2 = features[4]
    assert sd["classifier.cbr.0.weight"].shape == (128, 960, 1, 1)  # C5 = features[16]


def test_paper_recipe_names():
    assert "features.41.running_var" in built("segnet").state_dict  # vgg16_bn's last BN
    assert built("deeplab_v1").state_dict["fc6.weight"].shape == (1024, 512, 3, 3)
    assert built("deeplab_v2").state_dict["aspp.3.weight"].shape == (NC, 2048, 3, 3)
    assert built("pspnet").state_dict["ppm.features.3.1.weight"].shape == (512, 2048, 1, 1)
    sd = built("deeplab_v3plus").state_dict
    assert sd["backbone.middle_flow.15.sepconv3.depthwise.weight"].shape == (728, 1, 3, 3)
    assert sd["decoder.low_level.0.weight"].shape == (48, 256, 1, 1)


# ------------------------------------------------------------------------------ architecture facts


def _nodes(g, op):
    return [n for n in g.model.graph.node if n.op_type == op]


def _attr(node, name):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_deeplab_dilations():
    g = built("deeplab_v1")
    dil = sorted({tuple(_attr(n, "dilations")) for n in _nodes(g, "Conv")})
    assert dil == [(1, 1), (2, 2), (12, 12)]
    g = built("deeplab_v2")
    aspp_dil = [_attr(n, "dilations")[0] for n in _nodes(g, "Conv") if n.name.startswith("aspp")]
    assert aspp_dil == [6, 12, 18, 24]
    g = built("deeplab_v3plus")
    assert max(_attr(n, "dilations")[0] for n in _nodes(g, "Conv")) == 18


@pytest.mark.parametrize("options, params", [
    (dict(backbone="resnet50"), RESNET50_TRUNK + aspp(2048) + v3plus_decoder(256)),
    (dict(output_stride=8, separable=False),
     xception65() + aspp(2048, sep=False) + conv(304, 256, 3, bias=False) + bn(256)
     + conv(256, 256, 3, bias=False) + bn(256) + conv(256, 48, bias=False) + bn(48) + conv(256, NC)),
])
def test_deeplab_v3plus_options(options, params):
    g = built("deeplab_v3plus", **options)
    assert g.parameter_count == params
    _outputs_are_input_sized(g)


@pytest.mark.parametrize("options, size", [(dict(bilinear=True), (37, 53)), (dict(batch_norm=True), (40, 40)),
                                           (dict(base_width=8), (33, 70))])
def test_unet_options_and_odd_sizes(options, size):
    g = built("unet", size, **options)
    expected = unet_params(base=options.get("base_width", 64), bilinear=options.get("bilinear", False))
    if options.get("batch_norm"):
        expected += sum(2 * bn(w) - 2 * w for w in (64, 128, 256, 512, 1024, 512, 256, 128, 64))
    assert g.parameter_count == expected
    _outputs_are_input_sized(g)


def test_pspnet_pyramid_uses_exact_adaptive_pooling():
    # at 64x64 the 8x8 map does not divide into 3 or 6 bins: PyTorch's overlapping bins via slices
    g = built("pspnet")
    assert len(_nodes(g, "ReduceMean")) == 9 + 36
    assert len(_nodes(g, "GlobalAveragePool")) == 1 and len(_nodes(g, "AveragePool")) == 1


def test_segnet_emits_real_maxpool_indices_and_maxunpool():
    g = built("segnet")  # 48x40: 3 and 5 are odd, so two unpools need an explicit output_shape
    pools = [n for n in _nodes(g, "MaxPool") if len(n.output) == 2]
    unpools = _nodes(g, "MaxUnpool")
    assert len(pools) == 5 and len(unpools) == 5
    assert {n.input[1] for n in unpools} == {n.output[1] for n in pools}
    assert sum(len(n.input) == 3 for n in unpools) == 2


# ------------------------------------------------------------------------------ MaxUnpool rewrite


def _pool_unpool_model(shape, kernel=2, stride=2, output_shape=True):
    """x -> MaxPool(values, indices); values*2+1 -> MaxUnpool(indices[, output_shape = x's shape])."""
    n, c, h, w = shape
    ph, pw = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p", "i"], kernel_shape=[kernel] * 2, strides=[stride] * 2),
        helper.make_node("Mul", ["p", "two"], ["z0"]),
        helper.make_node("Add", ["z0", "one"], ["z"]),
        helper.make_node("MaxUnpool", ["z", "i"] + (["shape"] if output_shape else []), ["y"],
                         kernel_shape=[kernel] * 2, strides=[stride] * 2),
    ]
    out_hw = (h, w) if output_shape else ((ph - 1) * stride + kernel, (pw - 1) * stride + kernel)
    inits = [numpy_helper.from_array(np.float32(2), "two"), numpy_helper.from_array(np.float32(1), "one")]
    if output_shape:
        inits.append(numpy_helper.from_array(np.asarray(shape, np.int64), "shape"))
    graph = helper.make_graph(nodes, "unpool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c, *out_hw]),
                               helper.make_tensor_value_info("p", TensorProto.FLOAT, [n, c, ph, pw])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _tie_input(shape, seed=0):
    """Values from {0, 1, 2}: most 2x2 windows hold their max more than once; plus all-equal windows."""
    x = np.random.default_rng(seed).integers(0, 3, shape).astype(np.float32)
    x[..., :2, :2] = 1.0
    x[..., 2:4, 2:4] = -1.0
    return x


def _assert_rewrite_exact(model, x):
    rewritten = rewrite_maxunpool_for_tvm(model)
    assert not any(n.op_type == "MaxUnpool" or (n.op_type == "MaxPool" and len(n.output) > 1)
                   for n in rewritten.graph.node)
    ref = run_onnxruntime(model, {"x": x})
    got = run_onnxruntime(rewritten, {"x": x})
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    return rewritten


@pytest.mark.parametrize("shape, output_shape", [((2, 3, 8, 10), False), ((1, 4, 9, 7), True),
                                                 ((1, 2, 6, 6), True)])
def test_rewrite_matches_onnxruntime_on_random_inputs(shape, output_shape):
    model = _pool_unpool_model(shape, output_shape=output_shape)
    for seed in range(3):
        _assert_rewrite_exact(model, np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 4, 9, 7)])
def test_rewrite_keeps_the_first_maximum_on_ties(shape):
    model = _pool_unpool_model(shape)
    x = _tie_input(shape)
    ref_y = run_onnxruntime(model, {"x": x})[0]
    # the constructed ties really are ties, and onnxruntime keeps exactly one position per window
    assert (x[..., :2, :2] == 1).all() and np.count_nonzero(ref_y[..., :2, :2]) == np.prod(shape[:2])
    assert (ref_y[..., 0, 0] != 0).all()  # row-major first position of the all-equal window
    _assert_rewrite_exact(model, x)


def test_rewrite_of_segnet_matches_onnxruntime():
    g = built("segnet")
    rewritten = rewrite_maxunpool_for_tvm(g.model)
    ops = {n.op_type for n in rewritten.graph.node}
    assert "MaxUnpool" not in ops and all(len(n.output) == 1 for n in rewritten.graph.node)
    inputs = random_inputs(g.model)
    for a, b in zip(run_onnxruntime(rewritten, inputs), run_onnxruntime(g.model, inputs)):
        np.testing.assert_array_equal(a, b)


def test_rewrite_refuses_what_it_cannot_express():
    overlapping = _pool_unpool_model((1, 1, 9, 9), kernel=3, stride=2, output_shape=False)
    with pytest.raises(NotImplementedError, match="stride"):
        rewrite_maxunpool_for_tvm(overlapping)
    m = _pool_unpool_model((1, 1, 8, 8))
    m.graph.output.append(helper.make_tensor_value_info("i", TensorProto.INT64, [1, 1, 4, 4]))
    with pytest.raises(NotImplementedError, match="Indices"):
        rewrite_maxunpool_for_tvm(m)


def test_rewrite_leaves_other_models_alone():
    m = built("deeplab_v1").model
    assert rewrite_maxunpool_for_tvm(m).SerializeToString() == m.SerializeToString()


# ------------------------------------------------------------------------------------------ TVM


def _tvm_matches_ort_on_original(original, inputs=None, tolerance=1e-5):
    """Compile the REWRITTEN (then optimized) model with TVM; compare with onnxruntime on the ORIGINAL."""
    from graphgen.compile import compile_model, resolve_target, run_library
    from graphgen.optimize import optimize

    rewritten = rewrite_maxunpool_for_tvm(original)
    compiled = optimize(rewritten).model
    inputs = inputs if inputs is not None else random_inputs(original)
    expected = run_onnxruntime(original, inputs)
    spec = resolve_target("x86")
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "model.so"
        compile_model(compiled, spec, lib)
        got = run_library(lib, spec, compiled, inputs)
    c = compare(got, expected, [o.name for o in original.graph.output], tolerance)
    assert c.ok, c.summary()


def test_tvm_segnet_rewritten():
    _tvm_matches_ort_on_original(built("segnet").model)


def test_tvm_maxunpool_rewrite_on_ties():
    shape = (1, 4, 9, 7)
    _tvm_matches_ort_on_original(_pool_unpool_model(shape), {"x": _tie_input(shape)}, tolerance=0.0)


# TVM x86 vs onnxruntime for every recipe at its test size: tests/test_zoo.py


def test_tvm_pspnet():
    # 40x40: the 5x5 map splits into 2/3/6 uneven bins (the slice form of adaptive pooling)
    assert_tvm_matches_ort(built("pspnet", (40, 40)).model)


def test_tvm_fcn_head_ops():
    """FCN-8s's head on a small map: bilinear ConvTranspose x2 / x8, Caffe crops, skip fusion."""
    from recipes.fcn import crop, upsample_bilinear_init

    b = GraphBuilder("fcn_head")
    score = b.input("score", (1, NC, 3, 3))
    pool4 = b.input("pool4", (1, NC, 17, 17))
    h = upsample_bilinear_init(b, score, 2, "upscore2")
    h = b.add(h, crop(b, pool4, 5, h.spatial, "score_pool4c"), name="fuse_pool4")
    h = upsample_bilinear_init(b, h, 8, "upscore8")
    b.output(crop(b, h, 31, (20, 20), "score"), "output")
    assert_tvm_matches_ort(b.build())
