"""Fold Mul / Add / Sub / Div by a per-channel (or scalar) constant into the layer before it.

Pattern: Conv, ConvTranspose, Gemm or MatMul + Add whose output feeds only ``y * c``,
``y + c``, ``y - c``, ``c - y`` or ``y / c`` with ``c`` constant and one value per output
channel (shape [C, 1, 1], [1, C, 1, 1], [C] for 2-D, or a single value).
Replacement: the layer with weights and bias scaled / shifted
(:func:`channels.affine_producer`). ``y / c`` becomes ``y * (1 / c)``: one rounding more,
well inside fp32 tolerance. A constant that would broadcast the output to a bigger shape
(e.g. [1, 1, H, W]) is not per-channel and stays.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphgen.optimize.channels import affine_producer
from graphgen.optimize.graph import GraphView, channel_vector, static_shapes

NAME = "fold_conv_affine"

OPS = {"Mul", "Add", "Sub", "Div"}
LAYERS = {"Conv", "ConvTranspose", "Gemm", "Add"}  # Add: MatMul + Add


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    candidates = [n for n in model.graph.node if n.op_type in OPS and len(n.input) == 2]
    if not candidates:
        return 0
    shapes = None
    folded = 0
    for node in candidates:
        for k in (0, 1):
            y, c = node.input[k], node.input[1 - k]
            layer = view.producer.get(y)
            if layer is None or layer.op_type not in LAYERS or not view.is_const(c) or view.is_const(y):
                continue
            if view.only_consumer(y) is not node:
                continue
            if shapes is None:
                shapes = static_shapes(model)
            sy = shapes.get(y)
            if not sy or len(sy) < 2 or not isinstance(sy[1], int) or shapes.get(node.output[0]) not in (sy, None):
                continue
            vec = channel_vector(view, c, sy[1], len(sy))
            if vec is None:
                continue
            vec = vec.astype(np.float64)
            op = node.op_type
            if op == "Mul":
                scale, shift = vec, np.zeros_like(vec)
            elif op == "Add":
                scale, shift = np.ones_like(vec), vec
            elif op == "Sub":
                scale, shift = (np.ones_like(vec), -vec) if k == 0 else (-np.ones_like(vec), vec)
            else:  # Div
                if k != 0 or np.any(vec == 0):
                    continue
                scale, shift = 1.0 / vec, np.zeros_like(vec)
            fold = affine_producer(view, layer, shapes)
            if fold is None:
                continue
            fold(scale, shift)()
            layer.output[0] = node.output[0]
            view.remove_nodes([node])
            view.refresh()
            folded += 1
            break
    view.remove_unused_initializers()
    return folded
