"""Recipes: SSD300-VGG16 and SSDlite320-MobileNetV3-Large (torchvision-exact) and their optional
in-graph postprocessing (box decoding against the default boxes, per-class NMS)."""

import math
from functools import lru_cache

import numpy as np
import pytest

from graphgen.builder import GraphBuilder
from graphgen.errors import UserError
from graphgen.registry import build_recipe, get
from graphgen.testing import assert_tvm_matches_ort, onnx_full_check, run_recipe_on_ort
from graphgen.verify import random_inputs, run_onnxruntime
from recipes import ssd

# torchvision 0.29 num_params (/work/shared/reference/model_facts.tsv)
PARAMS = {"ssd300_vgg16": 35_641_826, "ssdlite320_mobilenet_v3_large": 3_440_060}
# len(model.state_dict()) of torchvision's modules (SSDlite: 70 of them are BN num_batches_tracked)
STATE_DICT_LEN = {"ssd300_vgg16": 71, "ssdlite320_mobilenet_v3_large": 476}
# torchvision's SSDlite modules built with reduced_tail=False (what its constructor does with an ImageNet backbone)
SSDLITE_FULL_TAIL_PARAMS = 5_198_540

# Representative state_dict keys and shapes (num_classes 91): (key, shape)
KEYS = {
    "ssd300_vgg16": [
        ("backbone.scale_weight", (512,)),
        ("backbone.features.0.weight", (64, 3, 3, 3)),
        ("backbone.features.21.weight", (512, 512, 3, 3)),  # conv4_3
        ("backbone.extra.0.1.weight", (512, 512, 3, 3)),  # conv5_1 (after pool4 at position 0)
        ("backbone.extra.0.5.bias", (512,)),  # conv5_3
        ("backbone.extra.0.7.1.weight", (1024, 512, 3, 3)),  # fc6, dilated
        ("backbone.extra.0.7.3.weight", (1024, 1024, 1, 1)),  # fc7
        ("backbone.extra.1.2.weight", (512, 256, 3, 3)),  # conv8_2
        ("backbone.extra.4.2.weight", (256, 128, 3, 3)),  # conv11_2
        ("head.classification_head.module_list.0.weight", (4 * 91, 512, 3, 3)),
        ("head.classification_head.module_list.5.bias", (4 * 91,)),
        ("head.regression_head.module_list.1.weight", (6 * 4, 1024, 3, 3)),
    ],
    "ssdlite320_mobilenet_v3_large": [
        ("backbone.features.0.0.0.weight", (16, 3, 3, 3)),
        ("backbone.features.0.1.block.0.0.weight", (16, 1, 3, 3)),
        ("backbone.features.0.12.block.2.fc1.weight", (168, 672, 1, 1)),
        ("backbone.features.0.13.0.weight", (672, 112, 1, 1)),  # C4 expansion, split off its block
        ("backbone.features.0.13.1.running_var", (672,)),
        ("backbone.features.1.0.1.0.weight", (672, 1, 5, 5)),  # C4 depthwise keeps its index 1
        ("backbone.features.1.0.2.fc2.weight", (672, 168, 1, 1)),
        ("backbone.features.1.0.3.0.weight", (80, 672, 1, 1)),  # reduced tail: 160 / 2
        ("backbone.features.1.2.block.0.0.weight", (480, 80, 1, 1)),  # 960 / 2
        ("backbone.features.1.3.0.weight", (480, 80, 1, 1)),
        ("backbone.extra.0.0.0.weight", (256, 480, 1, 1)),
        ("backbone.extra.0.1.0.weight", (256, 1, 3, 3)),
        ("backbone.extra.3.2.1.bias", (128,)),
        ("head.classification_head.module_list.0.0.0.weight", (672, 1, 3, 3)),
        ("head.classification_head.module_list.0.1.weight", (6 * 91, 672, 1, 1)),
        ("head.regression_head.module_list.5.1.bias", (6 * 4,)),
        ("head.regression_head.module_list.1.0.1.running_mean", (480,)),
    ],
}
# feature-map sizes at the test input sizes (SSD300 at 268, SSDlite at 64) and anchors per location
FEATURE_SIZES = {"ssd300_vgg16": [34, 17, 9, 5, 3, 1], "ssdlite320_mobilenet_v3_large": [4, 2, 1, 1, 1, 1]}
ANCHORS_PER_LOCATION = {"ssd300_vgg16": [4, 6, 6, 6, 4, 4], "ssdlite320_mobilenet_v3_large": [6] * 6}


@lru_cache(maxsize=None)
def small(name, **options):
    """The recipe built at its test input size (cached: several tests read the same graph)."""
    return build_recipe(name, input_size=get(name).test_input_size, **options)


@lru_cache(maxsize=None)
def heads_on_ort(name):
    g = small(name)
    return run_recipe_on_ort(g.model)


# ----------------------------------------------------------------------------- numpy references

def np_decode(rel_codes, anchors, weights=(10.0, 10.0, 5.0, 5.0), clip=math.log(1000.0 / 16)):
    """torchvision's BoxCoder.decode_single, line by line, in float32: [A, 4] codes, [A, 4] boxes."""
    rel = rel_codes.astype(np.float32)
    boxes = anchors.astype(np.float32)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + np.float32(0.5) * widths
    ctr_y = boxes[:, 1] + np.float32(0.5) * heights
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    dx, dy = rel[:, 0::4] / wx, rel[:, 1::4] / wy
    dw = np.minimum(rel[:, 2::4] / ww, np.float32(clip))
    dh = np.minimum(rel[:, 3::4] / wh, np.float32(clip))
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = np.exp(dw) * widths[:, None]
    pred_h = np.exp(dh) * heights[:, None]
    c_to_c_w, c_to_c_h = np.float32(0.5) * pred_w, np.float32(0.5) * pred_h
    out = np.stack((pred_ctr_x - c_to_c_w, pred_ctr_y - c_to_c_h, pred_ctr_x + c_to_c_w, pred_ctr_y + c_to_c_h), 2)
    return out.reshape(rel.shape[0], -1)


def np_nms(boxes, scores, iou_threshold):
    """Greedy NMS (torchvision.ops.nms): highest score first, drop boxes with IoU > threshold."""
    b = boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep, dropped = [], np.zeros(len(b), bool)
    for i in np.argsort(-scores, kind="stable"):
        if dropped[i]:
            continue
        keep.append(i)
        iw = np.clip(np.minimum(b[i, 2], b[:, 2]) - np.maximum(b[i, 0], b[:, 0]), 0, None)
        ih = np.clip(np.minimum(b[i, 3], b[:, 3]) - np.maximum(b[i, 1], b[:, 1]), 0, None)
        inter = iw * ih
        with np.errstate(invalid="ignore", divide="ignore"):
            dropped |= inter / (area[i] + area - inter) > iou_threshold
    return np.asarray(keep, np.int64)


def np_postprocess(rel_codes, logits, anchors, image_size, score_thresh, nms_thresh, detections_per_img,
                   topk_candidates):
    """SSD.postprocess_detections for one image: (boxes, scores, labels) sorted by score."""
    h, w = image_size
    boxes = np_decode(rel_codes, anchors)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    scores = e / e.sum(-1, keepdims=True)
    cand_boxes, cand_scores, cand_labels = [], [], []
    for label in range(1, scores.shape[1]):
        s = scores[:, label]
        above = s > score_thresh
        order = np.argsort(-s[above], kind="stable")[:topk_candidates]
        cand_boxes.append(boxes[above][order])
        cand_scores.append(s[above][order])
        cand_labels.append(np.full(len(order), label))
    bx, sc, lb = (np.concatenate(v) for v in (cand_boxes, cand_scores, cand_labels))
    keep = np.concatenate([np.nonzero(lb == c)[0][np_nms(bx[lb == c], sc[lb == c], nms_thresh)]
                           for c in np.unique(lb)])
    keep = keep[np.argsort(-sc[keep], kind="stable")][:detections_per_img]
    return bx[keep], sc[keep], lb[keep]


def assert_detections_match(got, rel_codes, logits, anchors, image_size, params):
    """Graph outputs (boxes, scores, labels) of a batch against np_postprocess image by image.

    Scores that differ by an ulp (onnxruntime's softmax against numpy's) may swap places, so each
    detection is matched to a reference detection of the same label and box among the rows whose
    score is within 1e-6."""
    boxes, scores, labels = got
    assert labels.dtype == np.int64
    for i in range(len(rel_codes)):
        rb, rs, rl = np_postprocess(rel_codes[i], logits[i], anchors, image_size, **params)
        n = len(rs)
        assert n > 0
        assert int((scores[i] > 0).sum()) == n
        np.testing.assert_allclose(scores[i, :n], rs, rtol=1e-5, atol=1e-7)
        unmatched = set(range(n))
        for j in range(n):
            near = [r for r in unmatched if abs(rs[r] - scores[i, j]) <= 1e-6 and rl[r] == labels[i, j]
                    and np.allclose(rb[r], boxes[i, j], rtol=1e-5, atol=1e-4)]
            assert near, f"image {i} detection {j}: label {labels[i, j]} score {scores[i, j]} box {boxes[i, j]}"
            unmatched.remove(min(near, key=lambda r: abs(r - j)))
        # padding rows: score 0, background label, zero box
        assert not scores[i, n:].any() and not labels[i, n:].any() and not boxes[i, n:].any()


def postprocess_graph(anchors, num_classes, image_size, batch=1, **params):
    """The postprocessing alone, on [batch, A, 4] codes and [batch, A, num_classes] logits inputs."""
    b = GraphBuilder("ssd_postprocess")
    a = len(anchors)
    reg = b.input("bbox_regression", (batch, a, 4))
    cls = b.input("cls_logits", (batch, a, num_classes))
    for k, v in ssd.postprocess_detections(b, reg, cls, anchors, image_size, **params).items():
        b.output(v, k)
    return b.build()


# ----------------------------------------------------------------------------- architecture

@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_and_state_dict_keys_equal_torchvision(name):
    g = small(name)
    assert g.parameter_count == PARAMS[name]
    assert len(g.state_dict) == STATE_DICT_LEN[name]
    for key, shape in KEYS[name]:
        assert g.state_dict[key].shape == shape, key
    init_names = {i.name for i in g.model.graph.initializer}
    assert {k for k in g.state_dict if not k.endswith("num_batches_tracked")} <= init_names


def test_ssd300_scale_weight_starts_at_20_and_ssdlite_bn_is_torchvisions_partial():
    assert np.all(small("ssd300_vgg16").state_dict["backbone.scale_weight"] == 20.0)
    bns = [n for n in small("ssdlite320_mobilenet_v3_large").model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 70
    for n in bns:
        attrs = {a.name: a.f for a in n.attribute}
        assert attrs["epsilon"] == pytest.approx(1e-3)
        assert attrs["momentum"] == pytest.approx(0.97)  # torch momentum 0.03


def test_ssdlite_full_tail_option():
    g = build_recipe("ssdlite320_mobilenet_v3_large", input_size=(64, 64), reduced_tail=False)
    assert g.parameter_count == SSDLITE_FULL_TAIL_PARAMS
    assert g.state_dict["backbone.features.1.3.0.weight"].shape == (960, 160, 1, 1)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_heads_run_on_onnxruntime(name):
    g = small(name)
    onnx_full_check(g.model)
    assert [o.name for o in g.model.graph.output] == ["bbox_regression", "cls_logits"]
    num_anchors = sum(a * s * s for a, s in zip(ANCHORS_PER_LOCATION[name], FEATURE_SIZES[name]))
    reg, cls = heads_on_ort(name)
    assert reg.shape == (1, num_anchors, 4)
    assert cls.shape == (1, num_anchors, 91)


def test_ssd300_input_size_limits_and_default_boxes_at_300():
    with pytest.raises(UserError, match="267x267"):
        build_recipe("ssd300_vgg16", input_size=(267, 267), num_classes=2, check=False)
    g = build_recipe("ssd300_vgg16", num_classes=2, check=False)  # 300x300
    shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in g.model.graph.output]
    assert shapes == [[1, 8732, 4], [1, 8732, 2]]  # the paper's 8732 default boxes


def test_ssdlite_small_num_classes_and_batch():
    g = build_recipe("ssdlite320_mobilenet_v3_large", input_size=(96, 64), num_classes=4, batch=2)
    reg, cls = run_recipe_on_ort(g.model)
    num_anchors = 6 * (6 * 4 + 3 * 2 + 2 * 1 + 1 + 1 + 1)
    assert reg.shape == (2, num_anchors, 4) and cls.shape == (2, num_anchors, 4)
    # 87 fewer classes: each map's 1x1 classifier loses 6 x 87 output channels (weights + bias)
    in_channels = [672, 480, 512, 256, 256, 128]
    assert g.parameter_count == PARAMS["ssdlite320_mobilenet_v3_large"] - 87 * 6 * sum(c + 1 for c in in_channels)


# ----------------------------------------------------------------------------- default boxes and decoding

def test_default_boxes_follow_the_ssd_formulas():
    sizes = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    boxes = ssd.default_boxes(sizes, (300, 300), **ssd.SSD300_ANCHORS)
    assert boxes.shape == (8732, 4)
    # first cell of conv4_3 (step 8): center 4 px; s_k = 0.07, s'_k = sqrt(0.07 * 0.15), ratio 2
    c, s, s_prime = 4.0, 0.07 * 300, math.sqrt(0.07 * 0.15) * 300
    w2, h2 = 0.07 * math.sqrt(2) * 300, 0.07 / math.sqrt(2) * 300
    expected = [[c - s / 2, c - s / 2, c + s / 2, c + s / 2],
                [c - s_prime / 2, c - s_prime / 2, c + s_prime / 2, c + s_prime / 2],
                [c - w2 / 2, c - h2 / 2, c + w2 / 2, c + h2 / 2],
                [c - h2 / 2, c - w2 / 2, c + h2 / 2, c + w2 / 2]]
    np.testing.assert_allclose(boxes[:4], expected, rtol=1e-5)
    # the last map (1x1, step 300), s_6 = 0.87: the ratio-2 box is 0.87 * sqrt(2) wide, clipped to the image width
    half_h = 0.87 / math.sqrt(2) * 150
    np.testing.assert_allclose(boxes[-2], [0, 150 - half_h, 300, 150 + half_h], rtol=1e-5)
    # SSDlite: scales spread from 0.2 to 0.95; on a 1x1 map the first box is the centred s_k square
    lite = ssd.default_boxes([(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], (320, 320),
                             **ssd.SSDLITE_ANCHORS)
    assert lite.shape == (3234, 4)
    np.testing.assert_allclose(lite[-6], [160 - 0.95 * 160, 160 - 0.95 * 160, 160 + 0.95 * 160, 160 + 0.95 * 160],
                               rtol=1e-5)


def test_decode_matches_torchvision_box_coder():
    anchors = ssd.default_boxes([(4, 6), (2, 3), (1, 2), (1, 1), (1, 1), (1, 1)], (64, 96), **ssd.SSDLITE_ANCHORS)
    a = len(anchors)
    rng = np.random.default_rng(1)
    rel = (rng.standard_normal((2, a, 4)) * 4).astype(np.float32)
    rel[:, :5, 2:] = 40.0  # dw, dh past log(1000/16) * 5: the clamp must act
    for image_size in (None, (64, 96)):
        b = GraphBuilder("decode")
        x = b.input("rel_codes", (2, a, 4))
        b.output(ssd.decode_boxes(b, x, anchors, image_size=image_size), "boxes")
        got = run_onnxruntime(b.build(), {"rel_codes": rel})[0]
        for i in range(2):
            want = np_decode(rel[i], anchors)
            if image_size is not None:
                want[:, 0::2] = np.clip(want[:, 0::2], 0, 96)
                want[:, 1::2] = np.clip(want[:, 1::2], 0, 64)
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-4)
        assert np.all(np.isfinite(got))


# ----------------------------------------------------------------------------- postprocessing

LITE_320_ANCHORS = ssd.default_boxes([(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], (320, 320),
                                     **ssd.SSDLITE_ANCHORS)


def test_postprocess_graph_matches_numpy_reference():
    # random logits (no ties) for 4 foreground classes over SSDlite's 3234 anchors, two images
    model = postprocess_graph(LITE_320_ANCHORS, 5, (320, 320), batch=2, **ssd.SSDLITE_POSTPROCESS)
    onnx_full_check(model)
    inputs = random_inputs(model, seed=3)
    inputs["bbox_regression"] *= 2.0
    inputs["cls_logits"] *= 2.0
    got = run_onnxruntime(model, inputs)
    assert [o.shape for o in got] == [(2, 300, 4), (2, 300), (2, 300)]
    assert_detections_match(got, inputs["bbox_regression"], inputs["cls_logits"], LITE_320_ANCHORS, (320, 320),
                            ssd.SSDLITE_POSTPROCESS)


def test_postprocess_graph_with_fewer_survivors_than_slots():
    # SSD300's thresholds on 2 classes and few anchors: many padding rows
    anchors = LITE_320_ANCHORS[-60:]
    params = dict(ssd.SSD300_POSTPROCESS, score_thresh=0.3)
    model = postprocess_graph(anchors, 3, (320, 320), **params)
    inputs = random_inputs(model, seed=4)
    got = run_onnxruntime(model, inputs)
    assert got[1].shape == (1, 120)
    assert 0 < int((got[1] > 0).sum()) < 120
    assert_detections_match(got, inputs["bbox_regression"], inputs["cls_logits"], anchors, (320, 320), params)


def test_postprocess_graph_compiles_with_tvm_and_matches_onnxruntime():
    # TVM 0.27 imports NonMaxSuppression and, with the graph's Reshape-to-(-1, 3), compiles its consumers
    model = postprocess_graph(LITE_320_ANCHORS, 5, (320, 320), **ssd.SSDLITE_POSTPROCESS)
    assert "NonMaxSuppression" in {n.op_type for n in model.graph.node}
    assert_tvm_matches_ort(model)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_recipe_postprocess_option_matches_numpy_on_its_heads(name):
    size = get(name).test_input_size
    options = {"num_classes": 3} if name.startswith("ssdlite") else {}
    g = build_recipe(name, input_size=size, postprocess=True, **options)
    heads = small(name, **options)
    assert [o.name for o in g.model.graph.output] == ["boxes", "scores", "labels"]
    assert g.parameter_count == heads.parameter_count
    inputs = random_inputs(g.model)
    reg, cls = run_onnxruntime(heads.model, inputs)
    got = run_onnxruntime(g.model, inputs)
    features = [(s, s) for s in FEATURE_SIZES[name]]
    cfg = ssd.SSD300_ANCHORS if name == "ssd300_vgg16" else ssd.SSDLITE_ANCHORS
    params = ssd.SSD300_POSTPROCESS if name == "ssd300_vgg16" else ssd.SSDLITE_POSTPROCESS
    anchors = ssd.default_boxes(features, size, **cfg)
    assert_detections_match(got, reg, cls, anchors, size, params)


# ----------------------------------------------------------------------------- TVM

# TVM x86 vs onnxruntime for every recipe at its test size: tests/test_zoo.py


def test_ssd300_layers_tvm_matches_onnxruntime():
    # The whole SSD300 compiles and matches on TVM (checked by hand: ~195 s to compile and run on the
    # 2-core CI machine, too slow here); its layers not shared with the VGG recipe are checked on a
    # small graph: ceil-mode pool, L2Norm + scale, pool5 3x3/1, dilated fc6, fc7, an unpadded extra
    # layer and the head's view/permute/flatten/concat.
    b = GraphBuilder("ssd300_layers")
    x = b.input("input", (1, 64, 11, 11))
    with b.scope("features"):
        x = ssd._vgg_layers(b, x, [("conv", 64), ("relu",), ("pool",)], ceil_pools=(2,))  # 11 -> 6
    first = ssd.l2_norm_rescale(b, x)
    with b.scope("fc"):
        y = ssd.vgg_fc6_fc7(b, x)
    with b.scope("extra"):
        z = ssd.ssd300_extra_layer(b, y, 128, 256, 1, 0)  # 6 -> 4
    head = ssd.ssd_head(b, [first, y, z], [4, 6, 4], num_classes=3)
    for k, v in head.items():
        b.output(v, k)
    model = b.build()
    assert run_onnxruntime(model, random_inputs(model))[1].shape == (1, 4 * 36 + 6 * 36 + 4 * 16, 3)
    assert_tvm_matches_ort(model)
