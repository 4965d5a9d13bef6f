"""graphgen.analysis: parameters, MACs and memory access cost.

Hand-built graphs check each formula against numbers worked out by hand (the
arithmetic is in the comments); recipes check the totals against torchvision's
published parameter counts and "GFLOPS" (multiply-adds) in the reference table.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphgen.analysis import LayerInfo, format_table, human_count, layer_table, totals
from graphgen.builder import GraphBuilder, Tensor
from graphgen.errors import UserError
from graphgen.registry import build_recipe, names

# shared/ sits beside the checkout (CI clones main next to it)
REFERENCE = next((p for p in (Path(__file__).resolve().parents[2] / "shared/reference/model_facts.tsv",
                              Path("/work/shared/reference/model_facts.tsv")) if p.is_file()),
                 Path(__file__).resolve().parents[2] / "shared/reference/model_facts.tsv")
REPO = Path(__file__).resolve().parents[1]


def _reference() -> dict[str, tuple[int, float, int]]:
    """torchvision rows of the reference table: name -> (params, GMACs, input side)."""
    facts = {}
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        cols = line.split("\t")
        m = re.match(r"([\d.]+) GFLOPS @ (\d+)", cols[2])
        if cols[3].startswith("torchvision") and cols[1].isdigit() and m:
            facts[cols[0]] = (int(cols[1]), float(m.group(1)), int(m.group(2)))
    return facts


def _build(fn, shape, name="tiny") -> tuple[onnx.ModelProto, GraphBuilder]:
    b = GraphBuilder(name)
    x = b.input("input", shape)
    b.output(fn(b, x), "output")
    return b.build(), b


def _row(rows: list[LayerInfo], op: str) -> LayerInfo:
    found = [r for r in rows if r.op == op]
    assert len(found) == 1, [r.op for r in rows]
    return found[0]


# ----------------------------------------------------------- hand-built graphs
def test_pointwise_conv_matches_shufflenet_v2_g1_formula():
    # ShuffleNet V2 G1 (seed 000, section 5.2): a bias-free 1x1 conv, c1 -> c2 on h x w,
    # has FLOPs B = hw*c1*c2 and MAC = hw(c1 + c2) + c1*c2.
    h, w, c1, c2 = 5, 7, 8, 12
    model, _ = _build(lambda b, x: b.conv(x, c2, 1, bias=False, name="pw"), (1, c1, h, w))
    conv = _row(layer_table(model), "Conv")
    assert conv.mac_cost == h * w * (c1 + c2) + c1 * c2 == 796  # 35*20 + 96
    assert conv.macs == h * w * c1 * c2 == 3360
    assert conv.params == c1 * c2 == 96
    assert conv.output_shape == (1, c2, h, w)


def test_grouped_pointwise_conv_matches_g2_formula():
    # G2: a 1x1 conv with g groups has B = hw*c1*c2/g and MAC = hw(c1 + c2) + c1*c2/g.
    h = w = 6
    c1 = c2 = 16
    g = 4
    model, _ = _build(lambda b, x: b.conv(x, c2, 1, groups=g, bias=False, name="gpw"), (1, c1, h, w))
    conv = _row(layer_table(model), "Conv")
    assert conv.macs == h * w * c1 * c2 // g == 2304
    assert conv.mac_cost == h * w * (c1 + c2) + c1 * c2 // g == 1216  # 36*32 + 64


def test_grouped_strided_conv_with_bias():
    # input 2x8x10x10, 16 outputs, 3x3 stride 2 pad 1, groups 4 -> output 2x16x5x5 (800 elements)
    # weight 16x2x3x3 = 288, bias 16: params 304
    # MACs = 800 outputs * (8/4 in-channels * 9 taps) = 14,400
    # MAC cost = input 1,600 + weight 288 + bias 16 + output 800 = 2,704
    model, _ = _build(lambda b, x: b.conv(x, 16, 3, stride=2, padding=1, groups=4, name="gconv"), (2, 8, 10, 10))
    conv = _row(layer_table(model), "Conv")
    assert conv.output_shape == (2, 16, 5, 5)
    assert (conv.params, conv.macs, conv.mac_cost) == (304, 14_400, 2_704)


def test_depthwise_conv():
    # depthwise 3x3 on 1x32x8x8, pad 1: each output element takes 1 channel * 9 taps
    model, _ = _build(lambda b, x: b.conv(x, 32, 3, padding=1, groups=32, bias=False, name="dw"), (1, 32, 8, 8))
    conv = _row(layer_table(model), "Conv")
    assert conv.macs == 32 * 8 * 8 * 9 == 18_432
    assert conv.params == 32 * 9
    assert conv.mac_cost == 2048 + 288 + 2048


def test_gemm():
    # Linear 20 -> 10 on a batch of 3: M*N*K = 3*10*20 = 600 MACs, params 200 + 10,
    # MAC cost = input 60 + weight 200 + bias 10 + output 30 = 300
    model, _ = _build(lambda b, x: b.linear(x, 10, name="fc"), (3, 20))
    gemm = _row(layer_table(model), "Gemm")
    assert (gemm.params, gemm.macs, gemm.mac_cost) == (210, 600, 300)
    assert gemm.output_shape == (3, 10)


def test_conv_transpose_counts_per_input_element():
    # input 1x4x3x3 (36 elements), 6 outputs, 4x4 kernel, stride 2, pad 1, groups 2 -> 1x6x6x6
    # weight [C_in=4, C_out/g=3, 4, 4] = 192, bias 6
    # MACs = each of the 36 input elements scattered to 3 channels * 16 taps = 1,728
    #        (torch's rule: in_h*in_w * N * w[0] * w[1] * kh*kw = 9*1*4*3*16)
    # MAC cost = 36 + 192 + 6 + 216 = 450
    model, _ = _build(lambda b, x: b.conv_transpose(x, 6, 4, stride=2, padding=1, groups=2, name="up"),
                      (1, 4, 3, 3))
    ct = _row(layer_table(model), "ConvTranspose")
    assert ct.output_shape == (1, 6, 6, 6)
    assert (ct.params, ct.macs, ct.mac_cost) == (198, 1_728, 450)


def _linear_as_matmul_add(b: GraphBuilder, x: Tensor) -> Tensor:
    w = Tensor(b.param("w", (5, 6)), (5, 6))
    bias = Tensor(b.param("bias", (6,), "bias"), (6,))
    return b.add(b.matmul(x, w, name="mm"), bias, name="add_bias")


def test_matmul_and_linear_bias_heuristic():
    # (2,3,4,5) @ (5,6) -> (2,3,4,6): 144 outputs * K=5 = 720 MACs
    model, _ = _build(_linear_as_matmul_add, (2, 3, 4, 5))
    rows = layer_table(model)
    mm, add = _row(rows, "MatMul"), _row(rows, "Add")
    assert (mm.params, mm.macs, mm.mac_cost) == (30, 720, 120 + 30 + 144)
    # Add of a constant onto a MatMul-with-weight output is the Linear's bias
    assert (add.params, add.macs, add.mac_cost) == (6, 0, 144 + 6 + 144)


def test_elementwise_and_constant_inputs():
    def net(b, x):
        y = b.relu6(x, name="clip")          # Clip bounds are constants, not parameters
        y = b.mul(y, y, name="square")       # one tensor into both slots is read once
        y = b.add(y, x, name="residual")
        return b.reshape(y, [1, -1], name="flatten")  # the shape constant is not a parameter

    n = 2 * 3 * 4
    model, _ = _build(net, (1, 2, 3, 4))
    rows = {r.op: r for r in layer_table(model)}
    assert all(r.params == 0 and r.macs == 0 for r in rows.values())
    assert rows["Clip"].mac_cost == n + 1 + 1 + n
    assert rows["Mul"].mac_cost == n + n
    assert rows["Add"].mac_cost == n + n + n
    assert rows["Reshape"].mac_cost == n + 2 + n
    assert rows["Reshape"].output_shape == (1, n)


def test_batch_norm_running_stats_are_buffers():
    model, b = _build(lambda b, x: b.batch_norm(x, name="bn"), (1, 8, 4, 4))
    names_all = set(b.parameter_names) | set(b.buffer_names)
    for given in (None, names_all, set(b.parameter_names)):
        bn = _row(layer_table(model, given), "BatchNormalization")
        assert bn.params == 2 * 8, given
        assert bn.mac_cost == 128 + 4 * 8 + 128
        assert bn.macs == 0


def test_shared_initializer_counted_once_and_parameter_names_filter():
    def net(b, x):
        w = b.param("shared.weight", (4, 4, 1, 1))
        y = b._emit("Conv", [x.name, w], "first", x.shape)
        z = b._emit("Conv", [y.name, w], "second", x.shape)
        return b.conv(z, 4, 1, name="third")

    model, b = _build(net, (1, 4, 3, 3))
    rows = layer_table(model)
    assert [r.params for r in rows if r.op == "Conv"] == [16, 0, 20]
    # the weight is still read by both convs
    assert [r.mac_cost for r in rows if r.op == "Conv"] == [36 + 16 + 36, 36 + 16 + 36, 36 + 20 + 36]
    # only the names given count
    only = layer_table(model, {"third.weight"})
    assert [r.params for r in only if r.op == "Conv"] == [0, 0, 16]
    assert totals(rows) == {"params": 36, "macs": 3 * 9 * 16, "mac_cost": sum(r.mac_cost for r in rows)}


def test_symbolic_batch_is_taken_as_one_and_other_unknown_dims_fail():
    model, _ = _build(lambda b, x: b.conv(x, 6, 3, padding=1, name="c"), (1, 3, 8, 8))
    expected = layer_table(model)

    def symbolic(m, axis, label):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        for v in list(m.graph.input) + list(m.graph.output):
            d = v.type.tensor_type.shape.dim[axis]
            d.Clear()
            d.dim_param = label
        del m.graph.value_info[:]
        return m

    assert layer_table(symbolic(model, 0, "N")) == expected
    with pytest.raises(UserError, match="static"):
        layer_table(symbolic(model, 2, "H"))


# --------------------------------------------------------------- formatting
def test_format_table_rows_totals_and_units():
    model, _ = _build(lambda b, x: b.linear(b.flatten(b.global_avg_pool(b.conv(x, 64, 3, name="c"))), 1000,
                                            name="fc"), (1, 3, 34, 34))
    rows = layer_table(model)
    t = totals(rows)
    text = format_table(rows, t)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["layer", "op"]
    for r in rows:
        assert any(line.startswith(r.name + " ") and f"{r.macs:,}" in line for line in lines), r.name
    total_line = next(line for line in lines if line.startswith("total"))
    for key in ("params", "macs", "mac_cost"):
        assert f"{t[key]:,}" in total_line
    assert "," in f"{t['macs']:,}"  # the check above really tests separators
    # numbers are right-aligned: every row's MAC-cost column ends at the same place
    table = [line for line in lines[2:] if line and not line.startswith("-")][:-1]
    assert len({len(line) for line in table}) == 1
    assert human_count(t["macs"], "MACs") in lines[-1]
    assert format_table(rows) == text


def test_human_count():
    assert human_count(819_000_000, "MACs") == "0.819 GMACs"
    assert human_count(1_814_000_000) == "1.81 G"
    assert human_count(52_300_000) == "52.3 M"
    assert human_count(1_248_424) == "1.25 M"
    assert human_count(40) == "40"


# ------------------------------------------------------------------ recipes
def _check_against_reference(name: str) -> None:
    params, gmacs, side = _reference()[name]
    rg = build_recipe(name, input_size=(side, side))
    t = totals(layer_table(rg.model, set(rg.state_dict)))
    assert t["params"] == rg.parameter_count == params
    assert t["macs"] == pytest.approx(gmacs * 1e9, rel=0.01), t["macs"]
    # without the builder's names, the op-slot heuristic finds the same parameters
    assert totals(layer_table(rg.model))["params"] == params


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_squeezenet_matches_torchvision(name):
    _check_against_reference(name)


@pytest.mark.parametrize("module,name", [
    ("resnet", "resnet18"),
    ("mobilenet", "mobilenet_v2"),
    ("shufflenet", "shufflenet_v2_x1_0"),
])
def test_other_families_match_torchvision(module, name):
    if not (REPO / "recipes" / f"{module}.py").exists():
        pytest.skip(f"recipes/{module}.py does not exist yet")
    assert name in names(), f"recipes/{module}.py exists but does not register {name}"
    _check_against_reference(name)


def test_conv_macs_scale_with_area():
    # squeezenet1_1 is fully convolutional up to the global pool. With sides 65 and 130
    # every map doubles exactly (the stride-2 3x3 conv gives 32 and 64; each ceil-mode
    # 3/2 pool then halves 32->16->8->4 and 64->32->16->8), so each conv's MACs and the
    # total must be exactly 4x; parameters do not change.
    small = build_recipe("squeezenet1_1", input_size=(65, 65))
    large = build_recipe("squeezenet1_1", input_size=(130, 130))
    rs, rl = layer_table(small.model), layer_table(large.model)
    assert [r.name for r in rs] == [r.name for r in rl]
    convs = [(a, b) for a, b in zip(rs, rl) if a.op == "Conv"]
    assert len(convs) == 26
    for a, b in convs:
        assert b.macs == 4 * a.macs, a.name
    assert totals(rl)["macs"] == 4 * totals(rs)["macs"]
    assert totals(rl)["params"] == totals(rs)["params"]
    # a conv's MAC cost is feature maps (4x) plus its weight and bias read once (its params, 1x)
    for a, b in convs:
        assert b.mac_cost - b.params == 4 * (a.mac_cost - a.params), a.name


def test_layer_table_has_every_node():
    rg = build_recipe("squeezenet1_1", input_size=(64, 64))
    rows = layer_table(rg.model)
    assert [r.op for r in rows] == [n.op_type for n in rg.model.graph.node]
    assert rows[-1].output_shape == (1, 1000)
    assert np.all([r.mac_cost > 0 for r in rows])


def test_segnet_with_odd_sizes_is_analysed():
    # at its default 360x480 the odd feature maps give MaxUnpool an output_shape input, which ONNX
    # shape inference does not follow; the per-pixel cost must still scale with the area
    from graphgen.registry import build_recipe

    big = build_recipe("segnet", shape_only=True)
    small = build_recipe("segnet", input_size=(64, 64), shape_only=True)
    t_big = totals(layer_table(big.model, set(big.parameter_names)))
    t_small = totals(layer_table(small.model, set(small.parameter_names)))
    assert t_big["params"] == t_small["params"] == 29455125
    assert t_big["macs"] / t_small["macs"] == pytest.approx(360 * 480 / 64 ** 2, rel=0.02)
