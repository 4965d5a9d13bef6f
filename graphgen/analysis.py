"""Per-layer model analysis: parameters, multiply-adds and memory access cost.

Used by ``graphgen info MODEL`` and ``graphgen list``. Works on any static-shaped
ONNX model; for a recipe, pass the builder's parameter names so the count is
exactly torchvision's ``sum(p.numel() for p in model.parameters())``::

    rg = build_recipe("squeezenet1_1")
    rows = layer_table(rg.model, set(rg.state_dict))
    print(format_table(rows, totals(rows)))

One row per ONNX node (top-level graph only), in graph order. Shapes come from
``onnx.shape_inference``; a symbolic *leading* (batch) dimension of a graph input
is taken as 1, any other unknown dimension is an error.

**params** -- elements of the node's initializer inputs that are parameters, each
initializer counted at its first use only (a weight shared by two nodes counts once):

* with ``parameter_names``: the initializers named there;
* without: float initializers in a weight/bias slot -- Conv, ConvTranspose, Gemm
  (A, B, C), MatMul (either operand), BatchNormalization / InstanceNormalization /
  LayerNormalization / GroupNormalization scale and bias, PRelu slope -- plus the
  bias initializer of an ``Add`` on a MatMul output (``nn.Linear`` exported as
  MatMul + Add).

Either way BatchNormalization's running mean and variance (inputs 3 and 4) are
buffers, never parameters, and constant inputs (Reshape shapes, Clip bounds, Slice
starts, Resize scales, Dropout ratios) are not parameters.

**macs** -- multiply-accumulates counted the way torchvision's published "GFLOPS"
(``_ops`` in its weights metadata) are: only Conv, ConvTranspose, Gemm and MatMul
count, bias additions, activations, pooling and elementwise ops are 0:

* Conv: ``output_elements * (C_in / groups) * prod(kernel)``
  (the weight's ``shape[1] * prod(shape[2:])``);
* ConvTranspose: ``input_elements * (C_out / groups) * prod(kernel)`` -- every
  input element is scattered through the kernel (again ``weight.shape[1:]``);
* Gemm: ``M * N * K``;  MatMul: ``output_elements * K``.

**mac_cost** -- memory access cost, ShuffleNet V2's MAC (Ma et al., 2018, section 2,
guideline G1; seed 000 section 5.2). For a bias-free 1x1 convolution with ``c1``
input and ``c2`` output channels on an ``h x w`` map it is ``hw(c1 + c2) + c1*c2``:
the input feature map read, the output written, the kernel read once. Generalised
to every node:

    mac_cost = sum(elements of each distinct input tensor)      # activations, weights, biases, constants
             + sum(elements of each output tensor)

counted in tensor *elements* (multiply by the element size, 4 for float32, for
bytes), assuming every tensor is read or written exactly once (infinite on-chip
reuse inside a layer, none between layers). A tensor that feeds two inputs of the
same node (``Mul(x, x)``) is read once. Elementwise ops therefore cost
inputs + outputs; view-like ops (Reshape, Flatten, Identity, Dropout) are counted
as a copy although a runtime may make them free. ``Constant`` nodes cost 0 (folded
at compile time) and ``Shape``/``Size`` read only metadata (they cost their output).
Batch ``N`` multiplies the feature-map terms, not the weight term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import onnx
from onnx import TensorProto

from graphgen.errors import UserError

__all__ = ["LayerInfo", "layer_table", "totals", "format_table", "human_count", "MAC_OPS"]

#: ops whose multiply-adds count (torchvision's convention); everything else is 0
MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}

#: input slots holding trainable tensors, for models without a parameter list
_PARAM_SLOTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "PRelu": (1,),
}
#: input slots that are buffers whatever the caller says (running statistics)
_BUFFER_SLOTS = {"BatchNormalization": (3, 4)}
#: ops that read only their input's metadata
_METADATA_OPS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class LayerInfo:
    """One ONNX node's analysis. ``output_shape`` is the first output's shape;
    ``output_shapes`` has all of them (Split has several)."""

    name: str
    op: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    mac_cost: int
    output_shapes: tuple[tuple[int, ...], ...] = ()


def _elements(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _static_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs have a symbolic leading dimension fixed to 1."""
    inits = {i.name for i in model.graph.initializer}
    needs = [v for v in model.graph.input if v.name not in inits and v.type.tensor_type.shape.dim
             and not v.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if not needs:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim
        if v.name not in inits and dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    # stale shapes derived from the symbolic batch would conflict with the new ones
    del model.graph.value_info[:]
    return model


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor that has one: graph inputs/outputs, value_info, initializers."""
    model = _static_inputs(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; report them as one user error
        raise UserError(f"shape inference failed on {model.graph.name or 'the model'}: {e}") from e
    shapes: dict[str, tuple[int, ...]] = {}
    g = inferred.graph
    for v in list(g.input) + list(g.value_info) + list(g.output):
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        if all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[v.name] = tuple(int(d.dim_value) for d in t.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    _fill_maxunpool(g, shapes)
    return shapes


def _fill_maxunpool(g: onnx.GraphProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """ONNX shape inference leaves MaxUnpool's output unknown when an ``output_shape`` input is
    given (even a constant one); take it from that constant, else from the kernel formula, and
    propagate through the shape-preserving nodes that follow."""
    from onnx import numpy_helper

    consts = {i.name: i for i in g.initializer}
    for node in g.node:
        if node.op_type == "MaxUnpool" and node.output[0] not in shapes and node.input[0] in shapes:
            if len(node.input) > 2 and node.input[2] in consts:
                shapes[node.output[0]] = tuple(int(v) for v in numpy_helper.to_array(consts[node.input[2]]))
            else:
                n, c, *sp = shapes[node.input[0]]
                k = _attr(node, "kernel_shape", [1] * len(sp))
                st = _attr(node, "strides", [1] * len(sp))
                pads = _attr(node, "pads", [0] * 2 * len(sp))
                shapes[node.output[0]] = (n, c, *[(x - 1) * st[i] + k[i] - pads[i] - pads[i + len(sp)]
                                                  for i, x in enumerate(sp)])
        elif node.output and node.output[0] not in shapes and node.input and node.input[0] in shapes and \
                node.op_type in ("Relu", "BatchNormalization", "Identity", "Sigmoid", "Clip"):
            shapes[node.output[0]] = shapes[node.input[0]]
        elif node.op_type == "Conv" and node.output[0] not in shapes and node.input[0] in shapes:
            n, _, *sp = shapes[node.input[0]]
            w = shapes.get(node.input[1])
            if w is None:
                continue
            pads = _attr(node, "pads", [0] * 2 * len(sp))
            st = _attr(node, "strides", [1] * len(sp))
            dl = _attr(node, "dilations", [1] * len(sp))
            shapes[node.output[0]] = (n, w[0], *[(x + pads[i] + pads[i + len(sp)] - dl[i] * (w[2 + i] - 1) - 1)
                                               // st[i] + 1 for i, x in enumerate(sp)])


def _shape_of(shapes: dict[str, tuple[int, ...]], name: str, node: onnx.NodeProto) -> tuple[int, ...]:
    try:
        return shapes[name]
    except KeyError:
        raise UserError(f"no static shape for tensor {name!r} of node {node.name or node.op_type!r} "
                        f"({node.op_type}); graphgen analyses static-shaped models only") from None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    op = node.op_type
    if op not in MAC_OPS:
        return 0
    if op == "Conv":
        w = _shape_of(shapes, node.input[1], node)
        out = _shape_of(shapes, node.output[0], node)
        return _elements(out) * _elements(w[1:])  # C_in/groups * kh * kw per output element
    if op == "ConvTranspose":
        x = _shape_of(shapes, node.input[0], node)
        w = _shape_of(shapes, node.input[1], node)  # [C_in, C_out/groups, kh, kw]
        return _elements(x) * _elements(w[1:])
    if op == "Gemm":
        a = _shape_of(shapes, node.input[0], node)
        out = _shape_of(shapes, node.output[0], node)
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return out[0] * out[1] * k
    # MatMul (numpy semantics; a 1-D left operand is a row vector)
    a = _shape_of(shapes, node.input[0], node)
    out = _shape_of(shapes, node.output[0], node)
    return _elements(out) * a[-1]


def _mac_cost(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    if node.op_type == "Constant":
        return 0
    written = sum(_elements(_shape_of(shapes, o, node)) for o in node.output if o)
    if node.op_type in _METADATA_OPS:
        return written
    read = sum(_elements(_shape_of(shapes, i, node)) for i in dict.fromkeys(i for i in node.input if i))
    return read + written


def _is_param_heuristic(node: onnx.NodeProto, slot: int, name: str, inits: dict[str, onnx.TensorProto],
                        param_matmul_outputs: set[str]) -> bool:
    if inits[name].data_type not in _FLOAT_TYPES:
        return False
    if slot in _PARAM_SLOTS.get(node.op_type, ()):
        return True
    # nn.Linear exported as MatMul(x, W) + B: the Add's constant operand is the Linear's bias
    return node.op_type == "Add" and any(i in param_matmul_outputs for i in node.input)


def layer_table(model: onnx.ModelProto, parameter_names: set[str] | None = None) -> list[LayerInfo]:
    """One :class:`LayerInfo` per node of ``model``'s graph, in graph order.

    ``parameter_names``: the initializers that are trainable parameters (for a recipe,
    ``set(recipe_graph.state_dict)``: its buffers other than BN running statistics
    are not graph initializers). Without it, float weight/bias initializers of the ops
    listed in the module docstring count.
    """
    shapes = _shapes(model)
    inits = {i.name: i for i in model.graph.initializer}
    counted: set[str] = set()
    param_matmul_outputs: set[str] = set()
    rows = []
    for index, node in enumerate(model.graph.node):
        params = 0
        buffer_slots = _BUFFER_SLOTS.get(node.op_type, ())
        for slot, name in enumerate(node.input):
            if not name or name not in inits or name in counted or slot in buffer_slots:
                continue
            if parameter_names is not None:
                is_param = name in parameter_names
            else:
                is_param = _is_param_heuristic(node, slot, name, inits, param_matmul_outputs)
            if is_param:
                counted.add(name)
                params += _elements(inits[name].dims)
        if node.op_type == "MatMul" and any(i in inits and i in counted for i in node.input):
            param_matmul_outputs.add(node.output[0])
        outs = tuple(_shape_of(shapes, o, node) for o in node.output if o)
        rows.append(LayerInfo(
            name=node.name or f"{node.op_type}_{index}",
            op=node.op_type,
            output_shape=outs[0] if outs else (),
            params=params,
            macs=_macs(node, shapes),
            mac_cost=_mac_cost(node, shapes),
            output_shapes=outs,
        ))
    return rows


def totals(rows: Iterable[LayerInfo]) -> dict:
    """Sum of params, macs and mac_cost over the rows."""
    return _sum_rows(rows)


def _sum_rows(rows: Iterable[LayerInfo]) -> dict:
    rows = list(rows)
    return {
        "params": sum(r.params for r in rows),
        "macs": sum(r.macs for r in rows),
        "mac_cost": sum(r.mac_cost for r in rows),
    }


def human_count(n: int | float, unit: str = "") -> str:
    """``819_000_000 -> '0.819 G'``, ``52_300_000 -> '52.3 M'``: G from 1e8, M from 1e5, K from 1e2."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale / 10:
            v = n / scale
            digits = 3 if abs(v) < 1 else (2 if abs(v) < 10 else 1)
            return f"{v:.{digits}f} {prefix}{unit}"
    return f"{int(n)} {unit}".rstrip()


def _shape_text(shapes: tuple[tuple[int, ...], ...]) -> str:
    if not shapes:
        return "-"
    return ", ".join("x".join(str(d) for d in s) or "scalar" for s in shapes)


def format_table(rows: Sequence[LayerInfo], totals: dict | None = None) -> str:
    """An aligned text table: one line per layer, a totals row, then a summary line
    with MACs also in G/M units. Numbers use thousands separators."""
    t = totals if totals is not None else _sum_rows(rows)
    header = ("layer", "op", "output shape", "params", "MACs", "MAC cost")
    body = [(r.name, r.op, _shape_text(r.output_shapes or (r.output_shape,)), f"{r.params:,}", f"{r.macs:,}",
             f"{r.mac_cost:,}") for r in rows]
    total_row = ("total", f"{len(rows)} nodes", "", f"{t['params']:,}", f"{t['macs']:,}", f"{t['mac_cost']:,}")
    lines = [header] + body + [total_row]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = (False, False, False, True, True, True)

    def fmt(line) -> str:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(line, widths, right)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [fmt(header), rule] + [fmt(line) for line in body] + [rule, fmt(total_row)]
    out.append(f"{t['params']:,} parameters ({human_count(t['params'])}), "
               f"{human_count(t['macs'], 'MACs')}, "
               f"MAC cost {human_count(t['mac_cost'])} elements")
    return "\n".join(out)
