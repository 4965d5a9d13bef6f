"""SSD and SSDlite single-shot detectors, as torchvision defines them.

* ``ssd300_vgg16``: Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016
  (arXiv 1512.02325), Fig. 2 (SSD300: VGG-16 through conv5_3 with pool5 made 3x3/1,
  fc6/fc7 turned into a dilated 3x3 and a 1x1 conv, extra layers conv8_2..conv11_2),
  Section 2.2 (default boxes: scales and aspect ratios) and Section 3 "Base network"
  (conv4_3 L2-normalised, ParseNet-style, with a learned per-channel scale starting at 20).
* ``ssdlite320_mobilenet_v3_large``: SSDlite of Sandler et al., "MobileNetV2", CVPR 2018
  (arXiv 1801.04381) Section 6.2 (every 3x3 conv of the heads and extra layers made
  depthwise separable), on the MobileNetV3-Large backbone of Howard et al., "Searching for
  MobileNetV3", ICCV 2019 (arXiv 1905.02244) Section 6.3 (first feature map at the C4
  block's expansion layer; Table 6's reduced tail).

What the graph contains: the backbone, the extra feature layers and the two heads. Its input
is the already resized and normalised image (torchvision's ``GeneralizedRCNNTransform`` is not
part of it: 300x300 with per-channel mean subtracted for SSD300, 320x320 scaled to [-1, 1] for
SSDlite). Its outputs are the heads' raw predictions over all default boxes, in torchvision's
order (feature map, then row, column, anchor): ``bbox_regression`` [N, num_anchors, 4] and
``cls_logits`` [N, num_anchors, num_classes].

With ``postprocess=True`` the graph also decodes the boxes against the default boxes (computed
here in numpy as a constant, :func:`default_boxes`), clips them to the image, applies softmax and
torchvision's per-class score threshold / top-k / NMS, and outputs a fixed number of detections:
``boxes`` [N, D, 4] (x1, y1, x2, y2 in input pixels), ``scores`` [N, D] and ``labels`` [N, D]
(int64), sorted by score; D is ``detections_per_img`` and unused rows have score 0, label 0
(background) and a zero box. See docs/detection.md for how TVM handles that graph.

Initializer names are torchvision's state_dict keys (``backbone.features.0.weight``,
``backbone.extra.0.7.1.weight``, ``backbone.scale_weight``,
``head.classification_head.module_list.0.weight``, ...).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.mobilenet import conv_norm_act, inverted_residual, mobilenet_v3_config
from recipes.vgg import VGG_CONFIGS, make_layers

# --------------------------------------------------------------------------- configuration

#: torchvision's BoxCoder weights for SSD (wx, wy, ww, wh) and its clamp on dw, dh before exp().
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

#: SSD300's extra layers conv8_2 .. conv11_2 (Fig. 2): (1x1 width, 3x3 width, 3x3 stride, 3x3 padding).
SSD300_EXTRAS = [(256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0)]
#: SSD300's default boxes: aspect ratios per feature map, scales s_k (+ the extra s_{m+1}), and the
#: steps (input pixels per cell) that tile them (torchvision's DefaultBoxGenerator arguments).
SSD300_ANCHORS = dict(aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                      scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300])
#: SSDlite's default boxes: ratios 2 and 3 everywhere, scales spread linearly from 0.2 to 0.95.
SSDLITE_ANCHORS = dict(aspect_ratios=[[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)
#: SSDlite's extra layers after the backbone (widths before torchvision's max(16, int(d * width_mult))).
SSDLITE_EXTRAS = [512, 256, 256, 128]
#: torchvision builds SSDlite with partial(nn.BatchNorm2d, eps=0.001, momentum=0.03).
SSDLITE_BN_EPS, SSDLITE_BN_MOMENTUM = 1e-3, 0.03
#: torchvision initialises SSDlite's convs (backbone too, when not pretrained) as N(0, 0.03).
SSDLITE_INIT_STD = 0.03

# torchvision's SSD(...) postprocessing defaults for each model.
SSD300_POSTPROCESS = dict(score_thresh=0.01, nms_thresh=0.45, detections_per_img=200, topk_candidates=400)
SSDLITE_POSTPROCESS = dict(score_thresh=0.001, nms_thresh=0.55, detections_per_img=300, topk_candidates=300)


# --------------------------------------------------------------------------- default boxes (numpy)

def anchors_per_location(aspect_ratios) -> list[int]:
    """Two square boxes (s_k and sqrt(s_k s_k+1)) plus two per aspect ratio (r and 1/r)."""
    return [2 + 2 * len(r) for r in aspect_ratios]


def default_boxes(feature_sizes, image_size, aspect_ratios, scales=None, steps=None, min_ratio: float = 0.15,
                  max_ratio: float = 0.9, clip: bool = True) -> np.ndarray:
    """torchvision's DefaultBoxGenerator for one image: [num_anchors, 4] float32 (x1, y1, x2, y2) in pixels.

    ``feature_sizes`` are the (h, w) of the feature maps, ``image_size`` the input (h, w). Without
    ``scales`` they are min_ratio + (max_ratio - min_ratio) k / (m - 1), then 1.0 (paper eq. 4).
    Without ``steps`` the cell size is image / feature map. Computed in float32 in torchvision's
    order so the constants equal its anchors.
    """
    m = len(aspect_ratios)
    if scales is None:
        if m > 1:
            scales = [min_ratio + (max_ratio - min_ratio) * k / (m - 1.0) for k in range(m)] + [1.0]
        else:
            scales = [min_ratio, max_ratio]
    if steps is not None and len(steps) != m:
        raise ValueError("aspect_ratios and steps should have the same length")
    if len(feature_sizes) != m:
        raise ValueError(f"{len(feature_sizes)} feature maps but {m} aspect-ratio lists")
    img_h, img_w = image_size
    per_map = []
    for k, (fh, fw) in enumerate(feature_sizes):
        s_k, s_prime = scales[k], math.sqrt(scales[k] * scales[k + 1])
        wh = [[s_k, s_k], [s_prime, s_prime]]
        for ar in aspect_ratios[k]:
            r = math.sqrt(ar)
            wh += [[s_k * r, s_k / r], [s_k / r, s_k * r]]
        wh = np.asarray(wh, np.float32)
        if clip:  # torchvision clips the (w, h) of the normalised boxes to [0, 1]
            wh = np.clip(wh, 0.0, 1.0)
        cells_x, cells_y = (img_w / steps[k], img_h / steps[k]) if steps is not None else (fw, fh)
        shift_x = ((np.arange(fw) + 0.5).astype(np.float32) / np.float32(cells_x)).astype(np.float32)
        shift_y = ((np.arange(fh) + 0.5).astype(np.float32) / np.float32(cells_y)).astype(np.float32)
        cy, cx = np.meshgrid(shift_y, shift_x, indexing="ij")
        # location-major, box-minor: the heads' [H, W, A] layout
        centers = np.repeat(np.stack([cx.reshape(-1), cy.reshape(-1)], axis=1), len(wh), axis=0)
        sizes = np.tile(wh, (fh * fw, 1))
        per_map.append(np.concatenate([centers, sizes], axis=1))
    boxes = np.concatenate(per_map, axis=0).astype(np.float32)
    scale = np.asarray([img_w, img_h], np.float32)
    xyxy = np.concatenate([(boxes[:, :2] - np.float32(0.5) * boxes[:, 2:]) * scale,
                           (boxes[:, :2] + np.float32(0.5) * boxes[:, 2:]) * scale], axis=1)
    return xyxy.astype(np.float32)


# --------------------------------------------------------------------------- ops the builder lacks

def _reduce_l2(b: GraphBuilder, x: Tensor, axis: int, name: str) -> Tensor:
    shape = tuple(1 if i == axis else s for i, s in enumerate(x.shape))
    return b._emit("ReduceL2", [x.name], name, shape, axes=[axis], keepdims=1)


def _elementwise(b: GraphBuilder, op: str, a: Tensor, other, name: str, dtype=np.float32) -> Tensor:
    """A broadcasting binary op (Max, Min, Greater) against a tensor or a float32 constant."""
    on = other.name if isinstance(other, Tensor) else b.const(np.asarray(other, np.float32), op.lower())
    osh = other.shape if isinstance(other, Tensor) else np.shape(other)
    return b._emit(op, [a.name, on], name, tuple(np.broadcast_shapes(a.shape, osh)), dtype=dtype)


@contextlib.contextmanager
def _bn_momentum(b: GraphBuilder, momentum: float):
    """Record torchvision's BatchNorm momentum on the BatchNormalization nodes emitted inside.

    The shared MobileNet blocks take no momentum argument; momentum only matters in training,
    but the exported attribute should say what torchvision's module says (ONNX's momentum is 1 - torch's).
    """
    start = len(b.nodes)
    yield
    for node in b.nodes[start:]:
        if node.op_type == "BatchNormalization":
            for attr in node.attribute:
                if attr.name == "momentum":
                    attr.f = 1.0 - momentum


@contextlib.contextmanager
def _normal_init(b: GraphBuilder, std: float):
    """torchvision's SSDlite ``_normal_init``: every conv weight created inside starts as N(0, std)
    (unless a checkpoint supplies it). It also keeps the seeded graph well conditioned: with the
    builder's default He init the backbone's activations grow to ~1e3, and ReLU6's clipping then
    amplifies fp32 rounding past the 1e-5 comparison tolerance."""
    start = len(b.parameter_names)
    yield
    given = b._weights or {}
    for name in b.parameter_names[start:]:
        value = b.initializers[name]
        if value.ndim == 4 and name not in given:
            b.initializers[name] = b._initial_value(name, value.shape, "normal", None, std)


# --------------------------------------------------------------------------- SSD300 backbone

def _vgg_layers(b: GraphBuilder, x: Tensor, layers, ceil_pools=()) -> Tensor:
    """VGG ``features`` entries as an nn.Sequential under the current scope: 3x3/1 conv + ReLU,
    2x2/2 max pool (ceil mode at the Sequential positions in ``ceil_pools``)."""
    for i, layer in enumerate(layers):
        with b.scope(i):
            if layer[0] == "conv":
                x = b.conv(x, layer[1], 3, padding=1, name="")
            elif layer[0] == "relu":
                x = b.relu(x, name="relu")
            else:
                x = b.max_pool(x, 2, 2, ceil_mode=i in ceil_pools, name="maxpool")
    return x


def l2_norm_rescale(b: GraphBuilder, x: Tensor, init_scale: float = 20.0) -> Tensor:
    """``scale_weight * F.normalize(x)``: L2-normalise each location's channel vector (eps 1e-12,
    as F.normalize) and multiply by a learned per-channel scale, initialised to 20 (Section 3 "Base
    network": conv4_3's features have a different scale from the later layers')."""
    w = b.param("scale_weight", (x.channels,), np.full(x.channels, init_scale, np.float32))
    norm = _elementwise(b, "Max", _reduce_l2(b, x, 1, "l2norm"), np.float32(1e-12), "l2norm_eps")
    scale = b.reshape(Tensor(w, (x.channels,)), [1, -1, 1, 1], name="scale_weight_view")
    return b.mul(scale, b.div(x, norm, name="l2normalize"), name="rescale")


def vgg_fc6_fc7(b: GraphBuilder, x: Tensor) -> Tensor:
    """SSD's replacement of VGG's pool5 and fully connected layers (Section 3 "Base network"):
    pool5 as a 3x3/1 pad-1 max pool (``.0``), fc6 as a 3x3 conv with dilation 6 and 1024 filters
    (``.1``), fc7 as a 1x1 conv (``.3``), each conv followed by ReLU."""
    x = b.max_pool(x, 3, 1, padding=1, name="0")
    x = b.relu(b.conv(x, 1024, 3, padding=6, dilation=6, name="1"), name="2")
    return b.relu(b.conv(x, 1024, 1, name="3"), name="4")


def ssd300_extra_layer(b: GraphBuilder, x: Tensor, mid: int, out: int, stride: int, padding: int) -> Tensor:
    """One of conv8_2 .. conv11_2: 1x1 conv + ReLU (``.0``), 3x3 conv + ReLU (``.2``)."""
    x = b.relu(b.conv(x, mid, 1, name="0"), name="1")
    return b.relu(b.conv(x, out, 3, stride=stride, padding=padding, name="2"), name="3")


def vgg16_ssd_backbone(b: GraphBuilder, x: Tensor) -> list[Tensor]:
    """torchvision's SSDFeatureExtractorVGG: six feature maps (38, 19, 10, 5, 3, 1 at 300x300).

    ``features`` is VGG-16 (config D) up to conv4_3 (Sequential positions 0-22) with pool3 in ceil
    mode (75 -> 38); ``extra.0`` continues with pool4 and conv5_1..conv5_3 (positions 0-6) and
    :func:`vgg_fc6_fc7` at position 7; ``extra.1``-``extra.4`` are conv8_2..conv11_2. The first
    map is conv4_3 through :func:`l2_norm_rescale`.
    """
    layers = make_layers(VGG_CONFIGS["D"], batch_norm=False)
    pools = [i for i, layer in enumerate(layers) if layer[0] == "pool"]
    pool3, pool4, pool5 = pools[2], pools[3], pools[4]
    with b.scope("backbone"):
        with b.scope("features"):
            conv4_3 = _vgg_layers(b, x, layers[:pool4], ceil_pools=(pool3,))
        outputs = [l2_norm_rescale(b, conv4_3)]
        with b.scope("extra", 0):
            x = _vgg_layers(b, conv4_3, layers[pool4:pool5])  # pool4, conv5_x; VGG's pool5 is replaced
            with b.scope(pool5 - pool4):
                x = vgg_fc6_fc7(b, x)
        outputs.append(x)
        for i, cfg in enumerate(SSD300_EXTRAS, start=1):
            with b.scope("extra", i):
                x = ssd300_extra_layer(b, x, *cfg)
            outputs.append(x)
    return outputs


# --------------------------------------------------------------------------- SSDlite backbone

def ssdlite_extra_block(b: GraphBuilder, x: Tensor, out: int) -> Tensor:
    """Section 6.2's separable replacement of a 1x1 + 3x3/2 extra layer: 1x1 to out/2, 3x3/2
    depthwise, 1x1 to out, each conv-BN-ReLU6 (torchvision's ``_extra_block``)."""
    mid = out // 2
    x = conv_norm_act(b, x, mid, 1, act="relu6", eps=SSDLITE_BN_EPS, name=0)
    x = conv_norm_act(b, x, mid, 3, 2, groups=mid, act="relu6", eps=SSDLITE_BN_EPS, name=1)
    return conv_norm_act(b, x, out, 1, act="relu6", eps=SSDLITE_BN_EPS, name=2)


def mobilenet_v3_ssdlite_backbone(b: GraphBuilder, x: Tensor, width_mult: float = 1.0, reduced_tail: bool = True,
                                  min_depth: int = 16) -> list[Tensor]:
    """torchvision's SSDLiteFeatureExtractorMobileNet over MobileNetV3-Large: six feature maps
    (20, 10, 5, 3, 2, 1 at 320x320).

    The MobileNet ``features`` are cut inside the C4 block (the last strided one, position 13):
    ``features.0`` holds positions 0-12 and, at position 13, that block's 1x1 expansion alone (the
    first feature map, stride 16); ``features.1`` holds at position 0 the rest of that block under
    its original sub-layer indices (``features.1.0.1`` depthwise, ``.2`` SE, ``.3`` projection),
    then the remaining blocks and the last 1x1 conv (the second map, stride 32). Four
    :func:`ssdlite_extra_block` follow.
    """
    stem, configs, _ = mobilenet_v3_config("large", width_mult, reduced_tail, dilated=False)
    c4 = [i for i, cnf in enumerate(configs, start=1) if cnf.stride > 1][-1]
    c4_cnf = configs[c4 - 1]
    if c4_cnf.use_residual or c4_cnf.expanded == c4_cnf.in_channels:
        raise ValueError("the C4 block must be strided and have an expansion layer")
    outputs = []
    with b.scope("backbone"):
        with b.scope("features", 0):
            x = conv_norm_act(b, x, stem, 3, 2, act="hardswish", eps=SSDLITE_BN_EPS, name=0)
            for i, cnf in enumerate(configs[:c4 - 1], start=1):
                with b.scope(i):
                    x = inverted_residual(b, x, cnf, eps=SSDLITE_BN_EPS)
            x = conv_norm_act(b, x, c4_cnf.expanded, 1, act=c4_cnf.act, eps=SSDLITE_BN_EPS, name=c4)
        outputs.append(x)
        with b.scope("features", 1):
            with b.scope(0):
                x = inverted_residual(b, x, c4_cnf, eps=SSDLITE_BN_EPS, scope=None, part=slice(1, None))
            for i, cnf in enumerate(configs[c4:], start=1):
                with b.scope(i):
                    x = inverted_residual(b, x, cnf, eps=SSDLITE_BN_EPS)
            x = conv_norm_act(b, x, 6 * configs[-1].out_channels, 1, act="hardswish", eps=SSDLITE_BN_EPS,
                              name=len(configs) - c4 + 1)
        outputs.append(x)
        for i, width in enumerate(SSDLITE_EXTRAS):
            with b.scope("extra", i):
                x = ssdlite_extra_block(b, x, max(min_depth, int(width * width_mult)))
            outputs.append(x)
    return outputs


# --------------------------------------------------------------------------- heads

def scoring_head(b: GraphBuilder, features: list[Tensor], num_columns: int, predictor) -> Tensor:
    """torchvision's SSDScoringHead: ``module_list.<i>`` (``predictor(i, map)``) predicts
    [N, A*K, H, W] on feature map i; it is viewed as [N, A, K, H, W], permuted to [N, H, W, A, K]
    and flattened to [N, HWA, K]; the maps are concatenated along the anchors."""
    results = []
    with b.scope("module_list"):
        for i, f in enumerate(features):
            with b.scope(i):
                y = predictor(i, f)
                n, ak, h, w = y.shape
                y = b.reshape(y, [n, ak // num_columns, num_columns, h, w], name="view")
                y = b.transpose(y, [0, 3, 4, 1, 2], name="permute")
                results.append(b.reshape(y, [n, -1, num_columns], name="flatten"))
    return b.concat(results, axis=1, name="concat")


def _two_heads(b: GraphBuilder, features: list[Tensor], num_classes: int, predictor) -> dict[str, Tensor]:
    """``head.regression_head`` (4 columns) and ``head.classification_head`` (num_classes columns);
    ``predictor(i, map, columns)`` emits module_list.<i>."""
    out = {}
    with b.scope("head"):
        for head, key, columns in (("regression_head", "bbox_regression", 4),
                                   ("classification_head", "cls_logits", num_classes)):
            with b.scope(head):
                out[key] = scoring_head(b, features, columns, lambda i, f, c=columns: predictor(i, f, c))
    return out


def ssd_head(b: GraphBuilder, features: list[Tensor], num_anchors: list[int], num_classes: int) -> dict[str, Tensor]:
    """SSDHead: one 3x3 conv (padding 1, with bias) per feature map and head."""
    return _two_heads(b, features, num_classes,
                      lambda i, f, columns: b.conv(f, columns * num_anchors[i], 3, padding=1, name=""))


def ssdlite_head(b: GraphBuilder, features: list[Tensor], num_anchors: list[int], num_classes: int
                 ) -> dict[str, Tensor]:
    """SSDLiteHead: per feature map and head, a 3x3 depthwise conv-BN-ReLU6 (``.0``) then a 1x1
    conv with bias (``.1``): Section 6.2's separable replacement of SSD's 3x3 prediction conv."""
    def predict(i: int, f: Tensor, columns: int) -> Tensor:
        y = conv_norm_act(b, f, f.channels, 3, groups=f.channels, act="relu6", eps=SSDLITE_BN_EPS, name=0)
        return b.conv(y, columns * num_anchors[i], 1, name="1")

    return _two_heads(b, features, num_classes, predict)


# --------------------------------------------------------------------------- postprocessing

def decode_boxes(b: GraphBuilder, rel_codes: Tensor, anchors: np.ndarray, weights=BOX_CODER_WEIGHTS,
                 image_size=None) -> Tensor:
    """BoxCoder.decode_single in the graph: [N, A, 4] offsets (dx, dy, dw, dh) against constant
    default boxes [A, 4] (x1, y1, x2, y2) -> [N, A, 4] boxes (x1, y1, x2, y2); dw, dh clamped at
    log(1000/16) before exp. With ``image_size`` (h, w), boxes are clipped to the image as
    torchvision's clip_boxes_to_image."""
    anchors = np.asarray(anchors, np.float32)
    wh = anchors[:, 2:] - anchors[:, :2]
    ctr = anchors[:, :2] + np.float32(0.5) * wh
    n, a, _ = rel_codes.shape
    with b.scope("decode"):
        d_xy = b.div(b.slice(rel_codes, [0], [2], [2], name="dxy"), np.asarray(weights[:2], np.float32), name="dxy_w")
        d_wh = b.div(b.slice(rel_codes, [2], [4], [2], name="dwh"), np.asarray(weights[2:], np.float32), name="dwh_w")
        d_wh = _elementwise(b, "Min", d_wh, np.float32(BBOX_XFORM_CLIP), "dwh_clamp")
        pred_ctr = b.add(b.mul(d_xy, wh, name="ctr_offset"), ctr, name="ctr")
        pred_wh = b.mul(b._emit("Exp", [d_wh.name], "exp", d_wh.shape), wh, name="wh")
        half = b.mul(pred_wh, np.float32(0.5), name="half_wh")
        boxes = b.concat([b.sub(pred_ctr, half, name="x1y1"), b.add(pred_ctr, half, name="x2y2")], axis=2,
                         name="boxes")
        if image_size is not None:
            h, w = image_size
            boxes = _elementwise(b, "Max", boxes, np.float32(0.0), "clip_min")
            boxes = _elementwise(b, "Min", boxes, np.asarray([w, h, w, h], np.float32), "clip_max")
    return boxes


def _int_op(b: GraphBuilder, op: str, inputs, name: str, shape, **attrs) -> Tensor:
    """An op with an int64 result; constant operands are given as Python ints / lists."""
    names = [t.name if isinstance(t, Tensor) else b.const(np.asarray(t, np.int64), name + "_arg") for t in inputs]
    return b._emit(op, names, name, tuple(shape), dtype=np.int64, **attrs)


def _topk(b: GraphBuilder, x: Tensor, k: int, axis: int, name: str) -> tuple[Tensor, Tensor]:
    """ONNX TopK (largest, sorted; equal values keep the lower index first): (values, int64 indices)."""
    shape = list(x.shape)
    shape[axis] = k
    values, indices = b._emit("TopK", [x.name, b.const(np.asarray([k], np.int64), "k")], name, None, n_outputs=2,
                              shapes=[tuple(shape)] * 2, axis=axis)
    return values, Tensor(indices.name, indices.shape, np.dtype(np.int64))


def _nms_survivors(b: GraphBuilder, boxes: Tensor, candidates: Tensor, max_per_class: int, nms_thresh: float,
                   score_thresh: float) -> Tensor:
    """Per-class NonMaxSuppression over ``candidates`` [N, C', A] (boxes [N, A, 4]); returns a map of
    the same shape holding each survivor's score and 0 elsewhere."""
    n, classes, a = candidates.shape
    # (image, class, box) rows; their count is dynamic (the 1 of the static shape is a placeholder)
    selected = b._emit("NonMaxSuppression",
                       [boxes.name, candidates.name, b.const(np.asarray([max_per_class], np.int64), "max_per_class"),
                        b.const(np.asarray([nms_thresh], np.float32), "iou_threshold"),
                        b.const(np.asarray([score_thresh], np.float32), "score_threshold")],
                       "nms", (1, 3), dtype=np.int64)
    # The flat index n*C'*A + c*A + a of each survivor, summed from its columns taken one by one
    # with a scalar Gather. TVM 0.27 knows the NMS output only as (s, s_1): broadcasting it against
    # a 3-vector (Mul by [C'*A, A, 1], or GatherND's / ScatterND's negative-index handling) or
    # adding column Slices of it (extents min(j+1, s_1) - min(j, s_1)) leaves shapes it cannot
    # prove equal, and legalization fails; scalar Gathers all give (s,).
    flat = None
    for j, stride in enumerate((classes * a, a, 1)):
        col = _int_op(b, "Gather", [selected, j], "selected_col", (1,), axis=1)
        col = _int_op(b, "Mul", [col, stride], "selected_offset", (1,)) if stride != 1 else col
        flat = col if flat is None else _int_op(b, "Add", [flat, col], "selected_flat", (1,))
    scores = b.reshape(candidates, [-1], name="candidates_flat")
    kept = b._emit("Gather", [scores.name, flat.name], "kept_scores", (1,), axis=0)
    survivors = b._emit("ScatterElements", [b.const(np.zeros(scores.shape, np.float32), "suppressed"), flat.name,
                                            kept.name], "survivor_scores", scores.shape, axis=0)
    return b.reshape(survivors, [n, classes, a], name="survivors")


def postprocess_detections(b: GraphBuilder, bbox_regression: Tensor, cls_logits: Tensor, anchors: np.ndarray,
                           image_size, score_thresh: float, nms_thresh: float, detections_per_img: int,
                           topk_candidates: int) -> dict[str, Tensor]:
    """SSD.postprocess_detections as a fixed-size ONNX graph.

    torchvision, per image: decode and clip the boxes, softmax the logits; for each foreground class
    keep the scores above ``score_thresh``, then its ``topk_candidates`` best; NMS per class at
    ``nms_thresh``; keep the ``detections_per_img`` best survivors over all classes. Here: TopK per
    class over the anchors (the top k, then thresholded, are the same boxes), every other score set
    to -1; NonMaxSuppression per class (score_threshold = score_thresh, max_output_boxes_per_class =
    detections_per_img: no class can place more than that in the final list); the survivors'
    scores, scattered into a zero [N, classes * anchors] map, whose TopK gives the detections.
    Rows past the number of survivors have score 0, label 0 and a zero box.
    """
    n, a, c = cls_logits.shape
    k = min(topk_candidates, a)
    d = min(detections_per_img, (c - 1) * a)
    with b.scope("postprocess"):
        boxes = decode_boxes(b, bbox_regression, anchors, image_size=image_size)
        scores = b.softmax(cls_logits, axis=-1, name="softmax")
        fg = b.transpose(b.slice(scores, [1], [c], [2], name="foreground"), [0, 2, 1], name="class_major")
        top_scores, top_idx = _topk(b, fg, k, 2, "topk_candidates")
        candidates = b._emit("ScatterElements", [b.const(np.full(fg.shape, -1.0, np.float32), "not_candidate"),
                                                 top_idx.name, top_scores.name], "candidates", fg.shape, axis=2)
        survivors = _nms_survivors(b, boxes, candidates, d, nms_thresh, score_thresh)
        det_scores, det_idx = _topk(b, b.reshape(survivors, [n, (c - 1) * a], name="survivors_flat"), d, 1,
                                    "detections")
        valid = _elementwise(b, "Greater", det_scores, np.float32(0.0), "valid", dtype=np.bool_)
        labels = _int_op(b, "Add", [_int_op(b, "Div", [det_idx, a], "class_index", (n, d)), 1], "label", (n, d))
        box_idx = _int_op(b, "Mod", [det_idx, a], "box_index", (n, d))
        box_idx = _int_op(b, "Reshape", [box_idx, [n, d, 1]], "box_index_nd", (n, d, 1))
        det_boxes = b._emit("GatherND", [boxes.name, box_idx.name], "gather_boxes", (n, d, 4), batch_dims=1)
        valid_box = b._emit("Unsqueeze", [valid.name, b.const(np.asarray([2], np.int64), "axes")], "valid_box",
                            (n, d, 1), dtype=np.bool_)
        zero = b.const(np.float32(0.0), "zero")
        return {
            "boxes": b._emit("Where", [valid_box.name, det_boxes.name, zero], "boxes", (n, d, 4)),
            "scores": b._emit("Where", [valid.name, det_scores.name, zero], "scores", (n, d)),
            "labels": _int_op(b, "Where", [valid, labels, 0], "labels", (n, d)),
        }


def _detector_outputs(b: GraphBuilder, x: Tensor, features: list[Tensor], head: dict[str, Tensor], anchor_cfg: dict,
                      postprocess: bool, **post) -> dict[str, Tensor]:
    if not postprocess:
        return head
    image_size = x.shape[2:]
    anchors = default_boxes([f.shape[2:] for f in features], image_size, **anchor_cfg)
    if anchors.shape[0] != head["cls_logits"].shape[1]:
        raise ValueError(f"{anchors.shape[0]} default boxes but the heads predict {head['cls_logits'].shape[1]}")
    return postprocess_detections(b, head["bbox_regression"], head["cls_logits"], anchors, image_size, **post)


# --------------------------------------------------------------------------- models

@register("ssd300_vgg16", family="ssd", input_size=(300, 300), test_input_size=(268, 268), num_classes=91)
def ssd300_vgg16(b: GraphBuilder, x: Tensor, num_classes: int = 91, postprocess: bool = False,
                 score_thresh: float = 0.01, nms_thresh: float = 0.45, detections_per_img: int = 200,
                 topk_candidates: int = 400) -> dict[str, Tensor]:
    """SSD300 (Fig. 2): VGG-16 + extra layers, 8732 default boxes over six maps; outputs the raw head predictions.

    Input: the 300x300 image as torchvision's transform leaves it (RGB in 0-255 minus the mean
    (123.0, 117.0, 104.0)). Smaller inputs fail: conv10_2 and conv11_2 are unpadded 3x3 convs that
    need 3x3 maps (268x268 at least). ``num_classes`` counts the background (91 for COCO).
    ``postprocess``: add box decoding, per-class NMS and a fixed list of ``detections_per_img``
    detections (outputs boxes, scores, labels) with torchvision's thresholds; TVM 0.27 compiles
    that graph (docs/detection.md).
    """
    features = vgg16_ssd_backbone(b, x)
    head = ssd_head(b, features, anchors_per_location(SSD300_ANCHORS["aspect_ratios"]), num_classes)
    return _detector_outputs(b, x, features, head, SSD300_ANCHORS, postprocess, score_thresh=score_thresh,
                             nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                             topk_candidates=topk_candidates)


@register("ssdlite320_mobilenet_v3_large", family="ssd", input_size=(320, 320), test_input_size=(64, 64),
          num_classes=91, aliases=("ssdlite",))
def ssdlite320_mobilenet_v3_large(b: GraphBuilder, x: Tensor, num_classes: int = 91, reduced_tail: bool = True,
                                  width_mult: float = 1.0, postprocess: bool = False, score_thresh: float = 0.001,
                                  nms_thresh: float = 0.55, detections_per_img: int = 300,
                                  topk_candidates: int = 300) -> dict[str, Tensor]:
    """SSDlite320 (MobileNetV2 Sec. 6.2, MobileNetV3 Sec. 6.3): separable heads on MobileNetV3-Large; raw head outputs.

    Input: the 320x320 image scaled to [-1, 1]. ``reduced_tail`` (default True, as torchvision's
    COCO checkpoint, 3,440,060 parameters) halves the backbone's C4 stage (MobileNetV3 Table 6);
    torchvision's constructor turns it off only when it loads ImageNet backbone weights.
    ``postprocess``: as for ssd300_vgg16 (boxes, scores, labels with torchvision's SSDlite
    thresholds); TVM 0.27 compiles that graph (docs/detection.md).
    """
    with _bn_momentum(b, SSDLITE_BN_MOMENTUM), _normal_init(b, SSDLITE_INIT_STD):
        features = mobilenet_v3_ssdlite_backbone(b, x, width_mult, reduced_tail)
        head = ssdlite_head(b, features, anchors_per_location(SSDLITE_ANCHORS["aspect_ratios"]), num_classes)
    return _detector_outputs(b, x, features, head, SSDLITE_ANCHORS, postprocess, score_thresh=score_thresh,
                             nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                             topk_candidates=topk_candidates)
