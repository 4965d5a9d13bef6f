"""Fold an inference BatchNormalization into the Conv that feeds it.

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * s) + (b - mean) * s + beta,      s = gamma / sqrt(var + eps)

applied per output channel. Only when the Conv's output feeds nothing but the BN and
its weights are constants.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphgen.optimize.graph import GraphView, attr

NAME = "fold_batchnorm"


def _bn_scale_shift(view: GraphView, bn: onnx.NodeProto):
    arrays = [view.array(n) for n in bn.input[1:5]]
    if any(a is None for a in arrays):
        return None
    gamma, beta, mean, var = (a.astype(np.float64) for a in arrays)
    scale = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return scale, beta - mean * scale


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    folded = 0
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = view.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or view.only_consumer(conv.output[0]) is not bn:
            continue
        w = view.array(conv.input[1])
        if w is None or len(view.consumers[conv.input[1]]) != 1:
            continue
        ss = _bn_scale_shift(view, bn)
        if ss is None:
            continue
        scale, shift = ss
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        if bias_name is not None and (view.array(bias_name) is None or len(view.consumers[bias_name]) != 1):
            continue
        b = view.array(bias_name).astype(np.float64) if bias_name else np.zeros(w.shape[0])
        new_w = (w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_b = (b * scale + shift).astype(np.float32)
        view.set_array(conv.input[1], new_w)
        if bias_name is None:
            # name the new bias after the weight, as a torch conv with bias=True would be
            base = conv.input[1][: -len(".weight")] if conv.input[1].endswith(".weight") else conv.input[1]
            bias_name = view.unique_name(base + ".bias")
            conv.input.append(bias_name)
        view.set_array(bias_name, new_b)
        # the Conv now produces the BN's output tensor
        conv.output[0] = bn.output[0]
        view.remove_nodes([bn])
        view.refresh()
        folded += 1
    view.remove_unused_initializers()
    return folded
