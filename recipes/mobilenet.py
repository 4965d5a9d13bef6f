"""MobileNet V1, V2 and V3, and the block vocabulary the other mobile families share.

* ``mobilenet_v1``: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for
  Mobile Vision Applications", 2017 (arXiv 1704.04861), Table 1 (body), Section 3.3 (width
  multiplier alpha; the resolution multiplier rho is the input size: 224, 192, 160, 128).
  1.0-224: 4.24M parameters, 569M mult-adds (Table 8).
* ``mobilenet_v2``: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
  CVPR 2018 (arXiv 1801.04381), Table 2, as torchvision defines it.
* ``mobilenet_v3_large`` / ``mobilenet_v3_small``: Howard et al., "Searching for MobileNetV3",
  ICCV 2019 (arXiv 1905.02244), Tables 1 and 2, as torchvision defines them (BN eps 1e-3,
  hard-swish, SE gated by hard-sigmoid with squeeze width make_divisible(expanded / 4, 8)).

Block stacks are data: timm-like arch strings decoded by :func:`decode_block`, which
:mod:`recipes.efficientnet` and :mod:`recipes.mnasnet` use too. Layer indices equal
torchvision's ``nn.Sequential`` positions, so initializer names are its state_dict keys
(``features.1.block.1.fc1.weight``).

:func:`mobilenet_v3_features` is the backbone the segmentation (DeepLabV3, LR-ASPP) and
detection (SSDlite) recipes import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

# --------------------------------------------------------------------------- arch strings

#: activation tokens of an arch string -> the activation they select
ACTIVATIONS = {"re": "relu", "re6": "relu6", "hs": "hardswish", "sw": "silu"}


@dataclass(frozen=True)
class BlockArgs:
    """One row of a network table, decoded from a timm-like string.

    ``<kind>_r<repeats>_k<kernel>_s<stride>_e<ratio>_x<expanded>_c<out>_d<dilation>[_se][_<act>]``
    where kind is ``ir`` (inverted residual / MBConv), ``ds`` (depthwise separable) or ``cn``
    (conv-BN-activation); ``e`` is an expansion *ratio* (V2, EfficientNet, MNASNet) and ``x`` an
    explicit expanded *width* (MobileNetV3's tables list widths); ``se`` adds squeeze-and-excitation;
    the activation token is one of :data:`ACTIVATIONS`. Omitted fields take the defaults below.
    """

    kind: str
    repeats: int = 1
    kernel: int = 3
    stride: int = 1
    expand_ratio: float = 1.0
    expanded: int | None = None
    out: int = 0
    dilation: int = 1
    se: bool = False
    act: str | None = None


_FIELD_BY_KEY = {"r": ("repeats", int), "k": ("kernel", int), "s": ("stride", int), "e": ("expand_ratio", float),
                 "x": ("expanded", int), "c": ("out", int), "d": ("dilation", int)}


def decode_block(spec: str, default_act: str = "relu") -> BlockArgs:
    """Decode one arch string such as ``'ir_r2_k3_s2_e6_c24'`` (see :class:`BlockArgs`)."""
    kind, *tokens = spec.split("_")
    if kind not in ("ir", "ds", "cn"):
        raise ValueError(f"{spec!r}: block kind must be ir, ds or cn")
    fields: dict = {"act": default_act}
    for tok in tokens:
        if tok in ACTIVATIONS:
            fields["act"] = ACTIVATIONS[tok]
        elif tok == "se":
            fields["se"] = True
        else:
            m = re.fullmatch(r"([a-z])(\d+(?:\.\d+)?)", tok)
            if not m or m.group(1) not in _FIELD_BY_KEY:
                raise ValueError(f"{spec!r}: cannot read {tok!r}")
            field, conv = _FIELD_BY_KEY[m.group(1)]
            fields[field] = conv(m.group(2))
    if fields.get("out", 0) < 1:
        raise ValueError(f"{spec!r}: needs an output width c<N>")
    return BlockArgs(kind, **fields)


def decode_arch(specs, default_act: str = "relu") -> list[BlockArgs]:
    """Decode a list of stage strings."""
    return [decode_block(s, default_act) for s in specs]


def expand_repeats(stages: list[BlockArgs]) -> list[BlockArgs]:
    """One entry per block: only the first block of a stage keeps the stage's stride."""
    blocks = []
    for st in stages:
        for i in range(st.repeats):
            blocks.append(replace(st, repeats=1, stride=st.stride if i == 0 else 1))
    return blocks


# --------------------------------------------------------------------------- width rounding

def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a width to a multiple of ``divisor`` (TF's rule, as torchvision): to the nearest
    multiple, at least ``min_value``, and never more than 10% below ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# --------------------------------------------------------------------------- shared layers

def activation(b: GraphBuilder, x: Tensor, kind: str | None, name: str | None = None) -> Tensor:
    if kind is None:
        return x
    if kind == "relu":
        return b.relu(x, name)
    if kind == "relu6":
        return b.relu6(x, name)
    if kind == "hardswish":
        return b.hardswish(x, name)
    if kind == "hardsigmoid":
        return b.hardsigmoid(x, name)
    if kind == "silu":
        return b.silu(x, name)
    if kind == "sigmoid":
        return b.sigmoid(x, name)
    raise ValueError(f"unknown activation {kind!r}")


def conv_norm_act(b: GraphBuilder, x: Tensor, out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                  dilation: int = 1, act: str | None = "relu", eps: float = 1e-5, name=None,
                  residual_end: bool = False) -> Tensor:
    """torchvision's Conv2dNormActivation: ``<name>.0`` bias-free conv with 'same'-style padding
    (k-1)/2*dilation, ``<name>.1`` BatchNorm, ``<name>.2`` activation (None: none)."""
    pad = (kernel - 1) // 2 * dilation
    with b.scope(name):
        x = b.conv(x, out, kernel, stride, pad, dilation, groups, bias=False, name="0")
        x = b.batch_norm(x, name="1", eps=eps, residual_end=residual_end)
        return activation(b, x, act, name="2")


def squeeze_excitation(b: GraphBuilder, x: Tensor, squeeze: int, act: str = "relu", gate: str = "sigmoid",
                       name=None) -> Tensor:
    """torchvision's SqueezeExcitation: global pool, 1x1 conv ``fc1``, act, 1x1 conv ``fc2``, gate,
    then ``scale * input``."""
    with b.scope(name):
        s = b.global_avg_pool(x, name="avgpool")
        s = b.conv(s, squeeze, 1, name="fc1")
        s = activation(b, s, act, name="activation")
        s = b.conv(s, x.channels, 1, name="fc2")
        s = activation(b, s, gate, name="scale_activation")
        return b.mul(s, x, name="scale")


@dataclass(frozen=True)
class MBConvConfig:
    """One inverted residual with resolved widths (MobileNetV3 and EfficientNet blocks)."""

    in_channels: int
    expanded: int
    out_channels: int
    kernel: int
    stride: int
    dilation: int = 1
    act: str = "relu"
    #: squeeze width of the SE layer, 0 for none
    se_channels: int = 0
    se_act: str = "relu"
    se_gate: str = "hardsigmoid"

    @property
    def use_residual(self) -> bool:
        # the configured stride decides, even when dilation turns the conv stride to 1 (torchvision)
        return self.stride == 1 and self.in_channels == self.out_channels


def inverted_residual(b: GraphBuilder, x: Tensor, cnf: MBConvConfig, eps: float = 1e-5, scope: str | None = "block",
                      part: slice = slice(None)) -> Tensor:
    """MobileNetV3 / EfficientNet MBConv: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 linear project,
    plus the identity shortcut when stride 1 and widths match. Sub-layers are ``<scope>.<i>``.

    ``part`` emits only a slice of the sub-layers under their original indices (torchvision's
    ``block[1:]`` keeps its keys), as SSDlite splits the C4 block after its expansion; the shortcut
    is added only when the whole block is emitted.
    """
    layers = []
    if cnf.expanded != cnf.in_channels:
        layers.append(lambda t, i: conv_norm_act(b, t, cnf.expanded, 1, act=cnf.act, eps=eps, name=i))
    # a dilated block keeps its resolution: the dilation replaces the stride (DeepLab's output stride)
    dw_stride = 1 if cnf.dilation > 1 else cnf.stride
    layers.append(lambda t, i: conv_norm_act(b, t, cnf.expanded, cnf.kernel, dw_stride, groups=cnf.expanded,
                                             dilation=cnf.dilation, act=cnf.act, eps=eps, name=i))
    if cnf.se_channels:
        layers.append(lambda t, i: squeeze_excitation(b, t, cnf.se_channels, cnf.se_act, cnf.se_gate, name=i))
    layers.append(lambda t, i: conv_norm_act(b, t, cnf.out_channels, 1, act=None, eps=eps, name=i,
                                             residual_end=cnf.use_residual))
    inp = x
    with b.scope(scope):
        for i in range(len(layers))[part]:
            x = layers[i](x, i)
    if cnf.use_residual and part == slice(None):
        # stochastic depth (EfficientNet) is the identity at inference
        x = b.add(x, inp, name="add")
    return x


def classifier_pool(b: GraphBuilder, x: Tensor) -> Tensor:
    """AdaptiveAvgPool2d(1) + flatten, as the mobile classifiers' forward does."""
    return b.flatten(b.global_avg_pool(x, name="avgpool"), 1, name="flatten")


# --------------------------------------------------------------------------- MobileNet V1

#: Howard et al. 2017, Table 1. The table's last depthwise row says s2, but its output stays 7x7:
#: every implementation (and the paper's own 569M mult-adds) uses stride 1 there.
MOBILENET_V1 = [
    "cn_k3_s2_c32",
    "ds_k3_s1_c64",
    "ds_k3_s2_c128", "ds_k3_s1_c128",
    "ds_k3_s2_c256", "ds_k3_s1_c256",
    "ds_k3_s2_c512", "ds_r5_k3_s1_c512",
    "ds_k3_s2_c1024", "ds_k3_s1_c1024",
]


def depthwise_separable(b: GraphBuilder, x: Tensor, out: int, stride: int, act: str, eps: float) -> Tensor:
    """Figure 3 (right): 3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU."""
    x = conv_norm_act(b, x, x.channels, 3, stride, groups=x.channels, act=act, eps=eps, name="depthwise")
    return conv_norm_act(b, x, out, 1, act=act, eps=eps, name="pointwise")


@register("mobilenet_v1", family="mobilenet", source="paper: Howard et al. 2017, MobileNets, Table 1",
          test_input_size=(32, 32))
def mobilenet_v1(b: GraphBuilder, x: Tensor, num_classes: int = 1000, width_mult: float = 1.0,
                 dropout: float = 0.001) -> Tensor:
    """MobileNet V1 (Table 1): a 3x3 conv and 13 depthwise separable convs, average pool, FC.

    ``width_mult`` is the paper's alpha (1.0, 0.75, 0.5, 0.25; widths int(alpha*c), at least 8, as
    the reference TF-slim code); the resolution multiplier is the input size (224, 192, 160, 128).
    ReLU as in the paper's Figure 3; BN eps 1e-3 as TF-slim. The dropout default is TF-slim's
    keep_prob 0.999. Names: ``features.0.{0,1}`` stem conv/BN, ``features.<i>.depthwise.{0,1}``
    and ``features.<i>.pointwise.{0,1}``, ``classifier.1`` the FC.
    """
    eps = 1e-3

    def width(c: int) -> int:
        return max(int(c * width_mult), 8)

    with b.scope("features"):
        i = 0
        for blk in expand_repeats(decode_arch(MOBILENET_V1)):
            with b.scope(i):
                if blk.kind == "cn":
                    x = conv_norm_act(b, x, width(blk.out), blk.kernel, blk.stride, act=blk.act, eps=eps)
                else:
                    x = depthwise_separable(b, x, width(blk.out), blk.stride, blk.act, eps)
            i += 1
    x = classifier_pool(b, x)
    with b.scope("classifier"):
        x = b.dropout(x, dropout, name="0")
        return b.linear(x, num_classes, name="1")


# --------------------------------------------------------------------------- MobileNet V2

#: Sandler et al. 2018, Table 2 (t, c, n, s) rows after the stem conv.
MOBILENET_V2 = [
    "ir_r1_k3_s1_e1_c16",
    "ir_r2_k3_s2_e6_c24",
    "ir_r3_k3_s2_e6_c32",
    "ir_r4_k3_s2_e6_c64",
    "ir_r3_k3_s1_e6_c96",
    "ir_r3_k3_s2_e6_c160",
    "ir_r1_k3_s1_e6_c320",
]


def inverted_residual_v2(b: GraphBuilder, x: Tensor, out: int, stride: int, expand_ratio: float) -> Tensor:
    """V2 bottleneck (Table 1): [1x1 expand ReLU6] -> 3x3 depthwise ReLU6 -> 1x1 linear, as
    torchvision's ``conv`` Sequential (the last conv and BN are bare modules, not a block)."""
    inp = x
    hidden = int(round(x.channels * expand_ratio))
    i = 0
    with b.scope("conv"):
        if expand_ratio != 1:
            x = conv_norm_act(b, x, hidden, 1, act="relu6", name=i)
            i += 1
        x = conv_norm_act(b, x, hidden, 3, stride, groups=hidden, act="relu6", name=i)
        x = b.conv(x, out, 1, bias=False, name=str(i + 1))
        x = b.batch_norm(x, name=str(i + 2), residual_end=stride == 1 and inp.channels == out)
    if stride == 1 and inp.channels == out:
        x = b.add(inp, x, name="add")
    return x


@register("mobilenet_v2", family="mobilenet", test_input_size=(32, 32))
def mobilenet_v2(b: GraphBuilder, x: Tensor, num_classes: int = 1000, width_mult: float = 1.0,
                 round_nearest: int = 8, dropout: float = 0.2) -> Tensor:
    """MobileNet V2 (Table 2): inverted residuals with linear bottlenecks."""
    input_channel = make_divisible(32 * width_mult, round_nearest)
    last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
    with b.scope("features"):
        with b.scope(0):
            x = conv_norm_act(b, x, input_channel, 3, 2, act="relu6")
        i = 1
        for blk in expand_repeats(decode_arch(MOBILENET_V2, "relu6")):
            with b.scope(i):
                x = inverted_residual_v2(b, x, make_divisible(blk.out * width_mult, round_nearest), blk.stride,
                                         blk.expand_ratio)
            i += 1
        with b.scope(i):
            x = conv_norm_act(b, x, last_channel, 1, act="relu6")
    x = classifier_pool(b, x)
    with b.scope("classifier"):
        x = b.dropout(x, dropout, name="0")
        return b.linear(x, num_classes, name="1")


# --------------------------------------------------------------------------- MobileNet V3

#: Howard et al. 2019, Table 1 (Large). Input width of the first block = stem width (16).
#: The last three rows are the C4 stage that ``reduced_tail`` narrows and ``dilated`` dilates.
MOBILENET_V3_LARGE = [
    "ir_k3_x16_c16_re",
    "ir_k3_s2_x64_c24_re",  # C1
    "ir_k3_x72_c24_re",
    "ir_k5_s2_x72_c40_se_re",  # C2
    "ir_r2_k5_x120_c40_se_re",
    "ir_k3_s2_x240_c80_hs",  # C3
    "ir_k3_x200_c80_hs",
    "ir_r2_k3_x184_c80_hs",
    "ir_k3_x480_c112_se_hs",
    "ir_k3_x672_c112_se_hs",
    "ir_k5_s2_x672_c160_se_hs",  # C4
    "ir_r2_k5_x960_c160_se_hs",
]
#: Howard et al. 2019, Table 2 (Small).
MOBILENET_V3_SMALL = [
    "ir_k3_s2_x16_c16_se_re",  # C1
    "ir_k3_s2_x72_c24_re",  # C2
    "ir_k3_x88_c24_re",
    "ir_k5_s2_x96_c40_se_hs",  # C3
    "ir_r2_k5_x240_c40_se_hs",
    "ir_k5_x120_c48_se_hs",
    "ir_k5_x144_c48_se_hs",
    "ir_k5_s2_x288_c96_se_hs",  # C4
    "ir_r2_k5_x576_c96_se_hs",
]
_V3_ARCHS = {"large": (MOBILENET_V3_LARGE, 1280), "small": (MOBILENET_V3_SMALL, 1024)}
_V3_STEM = 16
_V3_TAIL = 3  # blocks in the C4 stage
_V3_EPS = 1e-3


def mobilenet_v3_config(arch: str = "large", width_mult: float = 1.0, reduced_tail: bool = False,
                        dilated: bool = False) -> tuple[int, list[MBConvConfig], int]:
    """(stem width, one :class:`MBConvConfig` per block, classifier hidden width) as torchvision's
    ``_mobilenet_v3_conf``: ``reduced_tail`` halves the C4 stage's widths (its first block keeps
    its expansion, which the untouched C3 output feeds) and the classifier width; ``dilated``
    gives the C4 blocks dilation 2 (the first one's stride becomes 1)."""
    key = arch.removeprefix("mobilenet_v3_")
    if key not in _V3_ARCHS:
        raise ValueError(f"unsupported MobileNetV3 arch {arch!r}: large or small")
    specs, last = _V3_ARCHS[key]
    reduce_divider = 2 if reduced_tail else 1
    dilation = 2 if dilated else 1

    def adjust(c: float) -> int:
        return make_divisible(c * width_mult, 8)

    blocks = expand_repeats(decode_arch(specs))
    tail_start = len(blocks) - _V3_TAIL
    configs = []
    in_raw = _V3_STEM
    for i, blk in enumerate(blocks):
        out_raw, exp_raw, dil = blk.out, blk.expanded, 1
        if i >= tail_start:
            out_raw //= reduce_divider
            if i > tail_start:
                exp_raw //= reduce_divider
            dil = dilation
        expanded = adjust(exp_raw)
        configs.append(MBConvConfig(adjust(in_raw), expanded, adjust(out_raw), blk.kernel, blk.stride, dil, blk.act,
                                    make_divisible(expanded // 4, 8) if blk.se else 0, "relu", "hardsigmoid"))
        in_raw = out_raw
    return adjust(_V3_STEM), configs, adjust(last // reduce_divider)


def mobilenet_v3_features(b: GraphBuilder, x: Tensor, arch: str = "large", width_mult: float = 1.0,
                          reduced_tail: bool = False, dilated: bool = False) -> list[Tensor]:
    """torchvision's MobileNetV3 ``features`` Sequential, emitted under the *current* scope.

    Layers are named ``<scope>.<i>...`` without a ``features`` scope of its own: the classifier
    wraps the call in ``with b.scope("features")``, DeepLabV3 / LR-ASPP in ``b.scope("backbone")``.
    Returns the output of every layer: ``outs[i]`` is layer i's, ``outs[0]`` the stem (3x3/2
    conv-BN-hardswish), ``outs[1..n]`` the inverted residual blocks, ``outs[-1]`` the last 1x1
    conv-BN-hardswish to 6x the last block's width.

    ``arch``: "large" or "small" (or "mobilenet_v3_large"/"_small"). ``width_mult`` scales every
    width (rounded to multiples of 8). ``reduced_tail`` and ``dilated`` mean exactly what they mean
    in torchvision's ``_mobilenet_v3_conf``: reduced_tail halves the widths of the last stage (C4:
    the last 3 blocks; the first of them keeps its expansion width) as in the paper's Table 6 for
    detection/segmentation; dilated gives those 3 blocks dilation 2, their first block's depthwise
    stride becomes 1 (output stride 16 instead of 32), and the shortcut rule still uses the
    configured stride. BN eps is 1e-3.
    """
    stem, configs, _ = mobilenet_v3_config(arch, width_mult, reduced_tail, dilated)
    outs = []
    with b.scope(0):
        x = conv_norm_act(b, x, stem, 3, 2, act="hardswish", eps=_V3_EPS)
    outs.append(x)
    for i, cnf in enumerate(configs, start=1):
        with b.scope(i):
            x = inverted_residual(b, x, cnf, eps=_V3_EPS)
        outs.append(x)
    with b.scope(len(configs) + 1):
        x = conv_norm_act(b, x, 6 * configs[-1].out_channels, 1, act="hardswish", eps=_V3_EPS)
    outs.append(x)
    return outs


def _mobilenet_v3(b: GraphBuilder, x: Tensor, arch: str, num_classes: int, width_mult: float, reduced_tail: bool,
                  dilated: bool, dropout: float) -> Tensor:
    _, _, last_channel = mobilenet_v3_config(arch, width_mult, reduced_tail, dilated)
    with b.scope("features"):
        x = mobilenet_v3_features(b, x, arch, width_mult, reduced_tail, dilated)[-1]
    x = classifier_pool(b, x)
    with b.scope("classifier"):
        x = b.linear(x, last_channel, name="0")
        x = b.hardswish(x, name="1")
        x = b.dropout(x, dropout, name="2")
        return b.linear(x, num_classes, name="3")


@register("mobilenet_v3_large", family="mobilenet", test_input_size=(32, 32))
def mobilenet_v3_large(b: GraphBuilder, x: Tensor, num_classes: int = 1000, width_mult: float = 1.0,
                       reduced_tail: bool = False, dilated: bool = False, dropout: float = 0.2) -> Tensor:
    """MobileNetV3-Large (Table 1): SE and hard-swish inverted residuals found by NAS + NetAdapt."""
    return _mobilenet_v3(b, x, "large", num_classes, width_mult, reduced_tail, dilated, dropout)


@register("mobilenet_v3_small", family="mobilenet", test_input_size=(32, 32))
def mobilenet_v3_small(b: GraphBuilder, x: Tensor, num_classes: int = 1000, width_mult: float = 1.0,
                       reduced_tail: bool = False, dilated: bool = False, dropout: float = 0.2) -> Tensor:
    """MobileNetV3-Small (Table 2): the low-resource variant."""
    return _mobilenet_v3(b, x, "small", num_classes, width_mult, reduced_tail, dilated, dropout)
