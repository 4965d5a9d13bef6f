"""Recipes: AlexNet, VGG, GoogLeNet, Inception v3 (torchvision-exact), LeNet-5, NIN, SPP-net (papers)."""

from functools import lru_cache

import numpy as np
import onnx
import pytest

from graphgen.builder import GraphBuilder
from graphgen.errors import UserError
from graphgen.registry import build_recipe, get
from graphgen.testing import onnx_full_check, run_recipe_on_ort
from graphgen.verify import random_inputs, run_onnxruntime

# torchvision 0.29 num_params (/work/shared/reference/model_facts.tsv; vgg13/vgg13_bn from
# torchvision/models/vgg.py weights metadata, the table lacks them). inception_v3 without its
# auxiliary head (the table's note: 27,161,264 with it).
TORCHVISION_PARAMS = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
    "googlenet": 6_624_904,
    "inception_v3": 23_834_568,
}
PAPER_PARAMS = {
    "lenet5": 60_000,  # the paper's trainable count (Section II.B); the RBF centres are a buffer
    "lenet5_simplified": 61_706,  # the common textbook variant
    "nin": 7_595_176,  # authors' nin_imagenet: its 29 MiB of fp32 weights
    "sppnet": 46_628_968,  # ZF-5 + {1, 2, 4} pyramid; the paper gives no count
}
ALL = sorted(TORCHVISION_PARAMS) + sorted(PAPER_PARAMS)
VGG = [n for n in ALL if n.startswith("vgg")]
# Building a VGG means drawing 133M-144M seeded random weights and exporting 500+ MB (~30 s on
# the 2-core CI machine): one variant runs end to end (the BN code path, which includes the
# plain one); every variant's structure (count, names, shapes) is checked with zero weights.
VGG_RUN = ["vgg11_bn"]


@lru_cache(maxsize=3)  # a few: VGG graphs are over 500 MB each
def small(name, input_size=None, **options):
    """The recipe built at its small test input size (cached: several tests read the same graph)."""
    return build_recipe(name, input_size=input_size or get(name).test_input_size, **options)


class ZeroWeightsBuilder(GraphBuilder):
    """Zero-filled weights: names and shapes of a 100M-parameter graph without the cost of drawing them."""

    def _initial_value(self, full, shape, init, fan_in, std):
        return np.zeros(shape, np.float32)


@lru_cache(maxsize=None)
def structure(name, **options) -> GraphBuilder:
    """Run a recipe at its test input size on a ZeroWeightsBuilder (no ONNX export)."""
    r = get(name)
    b = ZeroWeightsBuilder(name)
    r.fn(b, b.input("input", (1, r.in_channels, *r.test_input_size)), **{"num_classes": r.num_classes, **options})
    return b


def param_shape(name, key):
    return structure(name).initializers[key].shape


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", ALL)
def test_parameter_count_equals_reference(name):
    expected = {**TORCHVISION_PARAMS, **PAPER_PARAMS}[name]
    assert structure(name).parameter_count() == expected


def test_inception_v3_parameter_count_without_aux_head():
    assert structure("inception_v3").parameter_count() == 23_834_568
    assert get("inception_v3").input_size == (299, 299)
    assert not any(k.startswith("AuxLogits") for k in structure("inception_v3").state_dict_names)


def test_recipes_are_registered_with_their_sources():
    for name in TORCHVISION_PARAMS:
        assert get(name).is_torchvision, name
    for name in PAPER_PARAMS:
        assert get(name).source.startswith("paper:"), name
    assert {get(n).family for n in VGG} == {"vgg"}
    assert get("lenet5").in_channels == 1 and get("lenet5").num_classes == 10


# ----------------------------------------------------------------------------- state_dict keys
# torchvision's vgg16 `features` Sequential: conv positions (a ReLU after each, "M" pools at 4, 9, 16, 23, 30)
VGG16_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def test_vgg16_state_dict_keys_equal_torchvision():
    expected = {f"features.{i}.{p}" for i in VGG16_CONV_INDICES for p in ("weight", "bias")}
    expected |= {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    assert set(structure("vgg16").state_dict()) == expected
    assert len(expected) == 32
    assert param_shape("vgg16", "classifier.0.weight") == (4096, 512 * 7 * 7)
    assert param_shape("vgg16", "features.28.weight") == (512, 512, 3, 3)


def test_vgg_bn_state_dict_keys_shift_by_the_batchnorm():
    keys = set(structure("vgg16_bn").state_dict())
    # conv, BN, ReLU per Table 1 entry, plus 5 pools: the last conv is features.40, its BN features.41
    for k in ("features.0.weight", "features.1.running_mean", "features.40.bias", "features.41.running_var",
              "features.41.num_batches_tracked", "classifier.6.bias"):
        assert k in keys, k
    assert "features.2.weight" not in keys  # a ReLU
    convs = [k for k in keys if k.endswith(".weight") and len(param_shape("vgg16_bn", k)) == 4]
    assert len(convs) == 13


@pytest.mark.parametrize("name,convs", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)])
def test_vgg_depths_follow_table_1(name, convs):
    for variant in (name, name + "_bn"):
        sd = structure(variant).state_dict()
        conv_weights = [k for k, v in sd.items() if k.startswith("features") and v.ndim == 4]
        assert len(conv_weights) == convs, variant
        assert sum(k.endswith("running_mean") for k in sd) == (convs if variant.endswith("_bn") else 0)


def test_alexnet_state_dict_keys_equal_torchvision():
    expected = {f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")}
    expected |= {f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")}
    assert set(structure("alexnet").state_dict()) == expected
    assert param_shape("alexnet", "features.0.weight") == (64, 3, 11, 11)
    assert param_shape("alexnet", "classifier.1.weight") == (4096, 256 * 6 * 6)


def test_googlenet_state_dict_follows_torchvision():
    sd = structure("googlenet").state_dict()
    for k in ("conv1.conv.weight", "conv1.bn.running_var", "conv3.bn.num_batches_tracked",
              "inception3a.branch1.conv.weight", "inception3a.branch2.1.bn.bias",
              "inception4e.branch4.1.conv.weight", "inception5b.branch3.0.bn.running_mean", "fc.weight", "fc.bias"):
        assert k in sd, k
    assert not any(k.endswith("conv.bias") for k in sd)  # BasicConv2d convs have no bias
    assert not any(k.startswith("aux") for k in sd)
    # torchvision's "5x5" branch is a 3x3 convolution
    assert sd["inception3a.branch3.1.conv.weight"].shape == (32, 16, 3, 3)
    # 57 BasicConv2d (3 stem + 9 modules x 6): conv weight + 4 BN tensors + num_batches_tracked each
    assert len(sd) == 57 * 6 + 2


def test_googlenet_batchnorm_eps_is_torchvision_0_001():
    eps = {a.f for n in small("googlenet").model.graph.node if n.op_type == "BatchNormalization"
           for a in n.attribute if a.name == "epsilon"}
    assert len(eps) == 1 and eps.pop() == pytest.approx(0.001)


def test_inception_v3_state_dict_follows_torchvision():
    sd = structure("inception_v3").state_dict()
    for k in ("Conv2d_1a_3x3.conv.weight", "Conv2d_4a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
              "Mixed_5b.branch_pool.bn.weight", "Mixed_6a.branch3x3dbl_3.conv.weight",
              "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7a.branch7x7x3_4.conv.weight",
              "Mixed_7c.branch3x3dbl_3b.bn.running_mean", "fc.weight"):
        assert k in sd, k
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert sd["Mixed_6b.branch7x7_3.conv.weight"].shape == (192, 128, 7, 1)
    assert sd["fc.weight"].shape == (1000, 2048)
    # 94 BasicConv2d, 6 tensors each, plus the fc
    assert len(sd) == 94 * 6 + 2


def test_nin_uses_flat_features_names_and_a_class_map_head():
    sd = structure("nin").state_dict()
    convs = sorted(int(k.split(".")[1]) for k in sd if k.endswith("weight"))
    # three convs per mlpconv (ReLU between), a max pool after the first three, dropout after the third pool
    assert convs == [0, 2, 4, 7, 9, 11, 14, 16, 18, 22, 24, 26]
    assert sd["features.0.weight"].shape == (96, 3, 11, 11)
    assert sd["features.26.weight"].shape == (1000, 1024, 1, 1)  # one map per class
    assert not any(v.ndim == 2 for v in sd.values())  # no fully connected layer
    assert structure("nin", num_classes=10).state_dict()["features.26.bias"].shape == (10,)


def test_lenet5_layers_and_paper_parameter_count():
    sd = structure("lenet5").state_dict()
    shapes = {k: v.shape for k, v in sd.items()}
    assert shapes == {
        "c1.weight": (6, 1, 5, 5), "c1.bias": (6,),
        "s2.weight": (6, 1, 1, 1), "s2.bias": (6,),
        "c3.in3.weight": (6, 3, 5, 5), "c3.in3.bias": (6,),
        "c3.in4.weight": (6, 4, 5, 5), "c3.in4.bias": (6,),
        "c3.in4_skip.weight": (3, 4, 5, 5), "c3.in4_skip.bias": (3,),
        "c3.in6.weight": (1, 6, 5, 5), "c3.in6.bias": (1,),
        "s4.weight": (16, 1, 1, 1), "s4.bias": (16,),
        "c5.weight": (120, 16, 5, 5), "c5.bias": (120,),
        "f6.weight": (84, 120), "f6.bias": (84,),
        "output.centers": (10, 84),
    }
    b = structure("lenet5")
    per_layer = {}
    for k in b.parameter_names:
        layer = k.split(".")[0]
        per_layer[layer] = per_layer.get(layer, 0) + sd[k].size
    # Section II.B's counts, layer by layer; the RBF output's fixed vectors are not trainable
    assert per_layer == {"c1": 156, "s2": 12, "c3": 1_516, "s4": 32, "c5": 48_120, "f6": 10_164}
    assert b.buffer_names == ["output.centers"]
    assert set(np.unique(small("lenet5").state_dict["output.centers"])) == {-1.0, 1.0}


def test_lenet5_simplified_layers():
    shapes = {k: v.shape for k, v in structure("lenet5_simplified").state_dict().items()}
    assert shapes == {
        "c1.weight": (6, 1, 5, 5), "c1.bias": (6,),
        "c3.weight": (16, 6, 5, 5), "c3.bias": (16,),
        "c5.weight": (120, 16, 5, 5), "c5.bias": (120,),
        "f6.weight": (84, 120), "f6.bias": (84,),
        "output.weight": (10, 84), "output.bias": (10,),
    }


# Table I of the paper: X marks which S2 maps (rows) each C3 map (columns) combines
TABLE_I = """
X...XXX..XXXX.XX
XX...XXX..XXXX.X
XXX...XXX..X.XXX
.XXX..XXXX..X.XX
..XXX..XXXX.XX.X
...XXX..XXXX.XXX
"""


def _conv_valid(x, w, bias):
    """numpy reference: x [C, H, W], w [O, C, k, k] -> [O, H-k+1, W-k+1]."""
    k = w.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))  # C, H', W', k, k
    return np.einsum("chwij,ocij->ohw", windows, w) + bias[:, None, None]


def _squash(a):
    return 1.7159 * np.tanh(2.0 / 3.0 * a)


def _subsample(x, coef, bias):
    n, h, w = x.shape
    sums = x.reshape(n, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
    return sums * coef.reshape(-1, 1, 1) + bias[:, None, None]


def test_lenet5_matches_a_numpy_forward_pass_with_table_i():
    """The graph computes the paper's equations: C3 as a dense conv masked by Table I, RBF output."""
    g = small("lenet5")
    sd = {k: v.astype(np.float64) for k, v in g.state_dict.items()}
    mask = np.array([[c == "X" for c in row] for row in TABLE_I.split()], np.float64).T  # [16 C3, 6 S2]
    assert mask.sum() == 60  # 6x3 + 9x4 + 1x6 connections
    c3_dense = np.zeros((16, 6, 5, 5))
    c3_bias = np.zeros(16)
    first = 0
    for group in ("in3", "in4", "in4_skip", "in6"):
        w, bias = sd[f"c3.{group}.weight"], sd[f"c3.{group}.bias"]
        for m in range(w.shape[0]):
            c3_dense[first + m][mask[first + m] > 0] = w[m]  # a map's inputs in ascending S2 order
            c3_bias[first + m] = bias[m]
        first += w.shape[0]
    inputs = random_inputs(g.model, seed=3)
    (x,) = inputs.values()
    a = _squash(_conv_valid(x[0].astype(np.float64), sd["c1.weight"], sd["c1.bias"]))
    a = _squash(_subsample(a, sd["s2.weight"], sd["s2.bias"]))
    a = _squash(_conv_valid(a, c3_dense, c3_bias))
    a = _squash(_subsample(a, sd["s4.weight"], sd["s4.bias"]))
    a = _squash(_conv_valid(a, sd["c5.weight"], sd["c5.bias"])).reshape(-1)
    a = _squash(sd["f6.weight"] @ a + sd["f6.bias"])
    expected = ((a[None, :] - sd["output.centers"]) ** 2).sum(axis=1)
    (out,) = run_onnxruntime(g.model, inputs)
    assert out.shape == (1, 10)
    np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["lenet5", "lenet5_simplified"])
def test_lenet5_takes_only_32x32(name):
    with pytest.raises(UserError):
        build_recipe(name, input_size=(28, 28))
    assert small(name).model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1


# ----------------------------------------------------------------------------- onnxruntime
@pytest.mark.parametrize(
    "name",
    [n for n in ALL if n not in VGG] + [pytest.param(n, marks=pytest.mark.large_memory) for n in VGG_RUN],
)
def test_builds_checks_and_runs_on_onnxruntime(name):
    g = small(name)
    onnx_full_check(g.model)
    assert g.parameter_count == {**TORCHVISION_PARAMS, **PAPER_PARAMS}[name]
    # every parameter and buffer is a graph initializer under its state_dict name
    initializers = {i.name for i in g.model.graph.initializer}
    assert {k for k in g.state_dict if not k.endswith("num_batches_tracked")} <= initializers
    (out,) = run_recipe_on_ort(g.model)  # asserts finite outputs
    assert out.shape == (1, get(name).num_classes)
    assert np.abs(out).max() > 0


def _value_shapes(model):
    return {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in model.graph.value_info}


def test_googlenet_max_pools_use_ceil_mode():
    # at 224 ceil mode gives torchvision's 112 -> 56 -> 28 -> 14 -> 7 (floor mode would give 55, 27, 13, 6)
    g = build_recipe("googlenet", num_classes=10)
    shapes = _value_shapes(g.model)
    assert [shapes[n][2] for n in ("maxpool1", "maxpool2", "maxpool3", "maxpool4")] == [56, 28, 14, 7]


def adaptive_pool_reference(x: np.ndarray, n: int, reduce) -> np.ndarray:
    """PyTorch's adaptive pooling of a (C, H, W) map to n x n: bin i covers [floor(i*H/n), ceil((i+1)*H/n))."""
    c, h, w = x.shape
    out = np.empty((c, n, n), x.dtype)
    for i in range(n):
        for j in range(n):
            window = x[:, (i * h) // n:-(-((i + 1) * h) // n), (j * w) // n:-(-((j + 1) * w) // n)]
            out[:, i, j] = reduce(window, axis=(1, 2))
    return out


def run_with_outputs(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Run on onnxruntime with intermediate tensors exposed as extra outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    outs = run_onnxruntime(probe, random_inputs(probe))
    return {o.name: v for o, v in zip(probe.graph.output, outs)}


def test_alexnet_adaptive_avg_pool_is_exact_at_a_non_divisible_size():
    """At 127x127 the last feature map is 3x3: AdaptiveAvgPool2d((6, 6)) uses overlapping bins."""
    g = small("alexnet", input_size=(127, 127), num_classes=10)
    got = run_with_outputs(g.model, ["features.12.maxpool", "avgpool"])
    features = got["features.12.maxpool"][0]
    assert features.shape == (256, 3, 3)
    np.testing.assert_allclose(got["avgpool"][0], adaptive_pool_reference(features, 6, np.mean), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.large_memory
def test_vgg_adaptive_pool_takes_a_1x1_map_to_7x7():
    g = small("vgg11_bn")
    assert _value_shapes(g.model)["features.28.maxpool"] == (1, 512, 1, 1)
    assert _value_shapes(g.model)["avgpool"] == (1, 512, 7, 7)


def test_sppnet_same_weights_run_at_several_input_sizes():
    a = small("sppnet")  # 100x100
    # the second size loads the first one's weights: any shape difference would be an error
    b = build_recipe("sppnet", input_size=(132, 116), weights=a.state_dict)
    assert a.parameter_count == b.parameter_count
    assert a.state_dict.keys() == b.state_dict.keys()
    conv5 = {g.input_size: _value_shapes(g.model)["relu5"][2:] for g in (a, b)}
    assert conv5 == {(100, 100): (5, 5), (132, 116): (7, 6)}  # different maps, same 21 x 256 vector
    for g in (a, b):
        assert _value_shapes(g.model)["spp"] == (1, 256 * (1 + 4 + 16))
        (out,) = run_recipe_on_ort(g.model)
        assert out.shape == (1, 1000)


def test_sppnet_pyramid_levels_set_the_fc6_width():
    assert structure("sppnet").initializers["fc6.weight"].shape == (4096, 256 * 21)
    b = structure("sppnet", levels=(1, 2, 3, 6))
    assert b.initializers["fc6.weight"].shape == (4096, 256 * (1 + 4 + 9 + 36))


def test_sppnet_pyramid_is_exact_adaptive_max_pooling():
    """Each level against a numpy adaptive max pool on the 5x5 conv5 map (bins 2 and 4 do not divide 5)."""
    got = run_with_outputs(small("sppnet").model, ["relu5", "spp"])
    conv5 = got["relu5"][0]
    assert conv5.shape == (256, 5, 5)
    expected = np.concatenate([adaptive_pool_reference(conv5, n, np.max).reshape(-1) for n in (1, 2, 4)])
    np.testing.assert_array_equal(got["spp"][0], expected)


def test_sppnet_lrn_is_caffe_within_channel():
    """norm1 = x * (1 + alpha * mean over the zero-padded 3x3 window of x^2) ^ -beta."""
    got = run_with_outputs(small("sppnet").model, ["relu1", "norm1"])
    x = got["relu1"][0].astype(np.float64)
    padded = np.pad(x * x, ((0, 0), (1, 1), (1, 1)))
    h, w = x.shape[1:]
    window_mean = sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    np.testing.assert_allclose(got["norm1"][0], x * (1 + 5e-5 * window_mean) ** -0.75, rtol=1e-5, atol=1e-6)


# TVM x86 vs onnxruntime for every recipe at its test size: tests/test_zoo.py
