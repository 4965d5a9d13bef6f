"""NASNet-A Mobile (Zoph, Vasudevan, Shlens & Le, "Learning Transferable Architectures for Scalable
Image Recognition", CVPR 2018, arXiv 1707.07012).

NASNet-A (4 @ 1056) of Table 3 (mobile setting, < 1.5B mult-adds): N = 4 normal cells per stage,
1056 filters in the penultimate layer (44 per cell branch in the first stage), a 3x3/2 stem conv
with 32 filters and two reduction "stem" cells (ImageNet stem, Figure 2 right). ~5.3M parameters, 564M mult-adds at 224.
The normal and reduction cells of Figure 4 are the data :data:`NASNET_A_NORMAL` and
:data:`NASNET_A_REDUCTION`.

Cell wiring follows the authors' TF-slim release (``research/slim/nets/nasnet/nasnet.py`` and
``nasnet_utils.py``: ``NasNetANormalCell`` / ``NasNetAReductionCell``, their ``operations``,
``hiddenstate_indices`` and ``used_hiddenstates`` lists): each cell first projects its input
(ReLU, 1x1 conv, BN) and brings the previous cell's output to the same shape (a factorized
reduction when the resolution differs, else ReLU-1x1-BN when the width differs); every
separable op is two stacked ReLU-separable-BN layers (the first one strided); pools and convs
pad like TF's 'SAME' (asymmetric at stride 2, pools exclude padding); drop-path is the identity
at inference. Module names are those of Cadene's PyTorch port of that release
(``pretrainedmodels/models/nasnet_mobile.py``, which loads the converted TF checkpoint): ``conv0``,
``cell_stem_0``, ``cell_stem_1``, ``cell_0``..``cell_3``, ``reduction_cell_0``, ``cell_6``..``cell_9``,
``reduction_cell_1``, ``cell_12``..``cell_15``, ``last_linear``; inside cells ``conv_1x1``,
``conv_prev_1x1``, ``path_1``/``path_2``/``final_path_bn`` and ``comb_iter_<i>_<left|right>``.
At 224x224 that port computes the same function (its ZeroPad2d-and-crop tricks reproduce TF's
asymmetric padding); at other sizes this recipe keeps TF's rule. The head is global average
pooling (the port's fixed 7x7 pool at 224), dropout 0.5, Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

_BN_EPS = 1e-3


@dataclass(frozen=True)
class Cell:
    """A NASNet cell as data. ``combos[i] = ((left_op, left_input), (right_op, right_input))``;
    inputs index the hidden states ``[h0, h1, combo0, combo1, ...]`` where h0 is this cell's
    projected input and h1 the projected output of the cell before. Ops: ``sep3/5/7`` (two stacked
    separable convs), ``avg3``/``max3`` (3x3 pools), ``id``. In a reduction cell, ops reading h0 or
    h1 stride 2. ``concat`` lists the hidden states concatenated as the cell output."""

    combos: tuple
    concat: tuple
    reduction: bool


#: Figure 4 left (TF-slim NasNetANormalCell).
NASNET_A_NORMAL = Cell(
    combos=((("sep5", 0), ("sep3", 1)),
            (("sep5", 1), ("sep3", 1)),
            (("avg3", 0), ("id", 1)),
            (("avg3", 1), ("avg3", 1)),
            (("sep3", 0), ("id", 0))),
    concat=(1, 2, 3, 4, 5, 6),
    reduction=False,
)
#: Figure 4 right (TF-slim NasNetAReductionCell).
NASNET_A_REDUCTION = Cell(
    combos=((("sep5", 0), ("sep7", 1)),
            (("max3", 0), ("sep7", 1)),
            (("avg3", 0), ("sep5", 1)),
            (("id", 3), ("avg3", 2)),
            (("sep3", 2), ("max3", 0))),
    concat=(3, 4, 5, 6),
    reduction=True,
)


def same_pads(x: Tensor, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TF 'SAME' padding (top, left, bottom, right): output ceil(n / stride), the odd pixel of
    padding goes bottom/right."""
    pads = []
    for n in x.spatial:
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads.append((total // 2, total - total // 2))
    (t, bt), (l, r) = pads
    return (t, l, bt, r)


def relu_conv_bn(b: GraphBuilder, x: Tensor, out: int, name: str) -> Tensor:
    """The 1x1 projections: ``<name>.conv`` and ``<name>.bn`` after a ReLU."""
    with b.scope(name):
        x = b.relu(x, name="relu")
        x = b.conv(x, out, 1, bias=False, name="conv")
        return b.batch_norm(x, name="bn", eps=_BN_EPS)


def factorized_reduction(b: GraphBuilder, x: Tensor, out: int) -> Tensor:
    """Halve the resolution without losing pixels: two 1x1 convs of out/2 filters on the even
    pixels (path_1) and the odd ones (path_2: shift by one, zero-pad the far edge), concat, BN.

    TF writes each path as a 1x1/2 average pool then a 1x1 conv; a 1x1 pool only subsamples, so a
    1x1 stride-2 conv is the same function."""
    x = b.relu(x, name="relu")
    with b.scope("path_1"):
        p1 = b.conv(x, out // 2, 1, 2, bias=False, name="conv")
    with b.scope("path_2"):
        h, w = x.spatial
        shifted = b.slice(x, [1, 1], [h, w], [2, 3], name="shift")
        # the shift loses the last row/column; TF pads it back with zeros before subsampling
        p2 = b.conv(shifted, out // 2, 1, 2, padding=(0, 0, 1, 1), bias=False, name="conv")
    x = b.concat([p1, p2], axis=1, name="path_concat")
    return b.batch_norm(x, name="final_path_bn", eps=_BN_EPS)


def separable_conv(b: GraphBuilder, x: Tensor, out: int, kernel: int, stride: int, name: str) -> Tensor:
    """Depthwise kxk (TF 'SAME') then pointwise 1x1, no biases."""
    with b.scope(name):
        x = b.conv(x, x.channels, kernel, stride, same_pads(x, kernel, stride), groups=x.channels, bias=False,
                   name="depthwise_conv2d")
        return b.conv(x, out, 1, bias=False, name="pointwise_conv2d")


def branch_separables(b: GraphBuilder, x: Tensor, out: int, kernel: int, stride: int) -> Tensor:
    """Two stacked ReLU-separable-BN layers; only the first strides."""
    x = b.relu(x, name="relu")
    x = separable_conv(b, x, out, kernel, stride, "separable_1")
    x = b.batch_norm(x, name="bn_sep_1", eps=_BN_EPS)
    x = b.relu(x, name="relu1")
    x = separable_conv(b, x, out, kernel, 1, "separable_2")
    return b.batch_norm(x, name="bn_sep_2", eps=_BN_EPS)


def apply_op(b: GraphBuilder, x: Tensor, op: str, filters: int, stride: int, name: str) -> Tensor:
    if op.startswith("sep"):
        with b.scope(name):
            return branch_separables(b, x, filters, int(op[3:]), stride)
    if x.channels != filters:
        raise ValueError(f"{b.qualify(name)}: {op} on {x.channels} channels, cell width {filters}")
    if op == "avg3":
        return b.avg_pool(x, 3, stride, same_pads(x, 3, stride), count_include_pad=False, name=name)
    if op == "max3":
        return b.max_pool(x, 3, stride, same_pads(x, 3, stride), name=name)
    if op == "id":
        if stride != 1:
            raise ValueError(f"{b.qualify(name)}: strided identity is not part of NASNet-A")
        return x
    raise ValueError(f"unknown NASNet op {op!r}")


def cell(b: GraphBuilder, cell_def: Cell, x: Tensor, prev: Tensor | None, filters: int,
         cur_proj: str = "conv_1x1") -> Tensor:
    """One cell: project the inputs, run the five combinations, concatenate the listed states."""
    h0 = relu_conv_bn(b, x, filters, cur_proj)
    if prev is None:
        # the first stem cell has no previous cell: its raw input stands in (TF: prev_layer = net)
        h1 = x
    elif prev.spatial != x.spatial:
        h1 = factorized_reduction(b, prev, filters)
    elif prev.channels != filters:
        h1 = relu_conv_bn(b, prev, filters, "conv_prev_1x1")
    else:
        h1 = prev
    states = [h0, h1]
    for i, ((lop, li), (rop, ri)) in enumerate(cell_def.combos):
        stride = 2 if cell_def.reduction else 1
        left = apply_op(b, states[li], lop, filters, stride if li < 2 else 1, f"comb_iter_{i}_left")
        right = apply_op(b, states[ri], rop, filters, stride if ri < 2 else 1, f"comb_iter_{i}_right")
        states.append(b.add(left, right, name=f"comb_iter_{i}"))
    return b.concat([states[i] for i in cell_def.concat], axis=1, name="cat")


def nasnet_a(b: GraphBuilder, x: Tensor, num_classes: int, num_cells: int = 4, penultimate_filters: int = 1056,
             stem_filters: int = 32, filter_multiplier: int = 2, dropout: float = 0.5) -> Tensor:
    """NASNet-A for ImageNet: conv0, two reduction stem cells, then 3 stages of ``num_cells``
    normal cells separated by reduction cells; the width doubles at each reduction."""
    filters = penultimate_filters // 24  # a normal cell outputs 6 branches; the last stage is 4x wider
    with b.scope("conv0"):
        x = b.conv(x, stem_filters, 3, 2, 0, bias=False, name="conv")
        conv0 = b.batch_norm(x, name="bn", eps=_BN_EPS)
    with b.scope("cell_stem_0"):
        stem0 = cell(b, NASNET_A_REDUCTION, conv0, None, filters // filter_multiplier ** 2)
    with b.scope("cell_stem_1"):
        stem1 = cell(b, NASNET_A_REDUCTION, stem0, conv0, filters // filter_multiplier)
    prev, cur = stem0, stem1
    index = 0
    for stage in range(3):
        if stage > 0:
            with b.scope(f"reduction_cell_{stage - 1}"):
                prev, cur = cur, cell(b, NASNET_A_REDUCTION, cur, prev, filters)
            index += 2  # the reference numbers cells as if each reduction took two slots
        for _ in range(num_cells):
            with b.scope(f"cell_{index}"):
                prev, cur = cur, cell(b, NASNET_A_NORMAL, cur, prev, filters)
            index += 1
        filters *= filter_multiplier
    x = b.relu(cur, name="relu")
    x = b.flatten(b.global_avg_pool(x, name="avg_pool"), 1, name="flatten")
    x = b.dropout(x, dropout, name="dropout")
    return b.linear(x, num_classes, name="last_linear")


@register("nasnet_a_mobile", family="nasnet", source="paper: Zoph et al. 2018, NASNet-A (4 @ 1056), Table 3",
          test_input_size=(32, 32), aliases=("nasnetamobile",))
def nasnet_a_mobile(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """NASNet-A Mobile (4 @ 1056): searched normal and reduction cells, ~5.3M params, 564M mult-adds."""
    return nasnet_a(b, x, num_classes, num_cells=4, penultimate_filters=1056, dropout=dropout)
