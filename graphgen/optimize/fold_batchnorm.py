"""Fold an inference BatchNormalization into the layer that feeds it.

    y = gamma * (layer(x) - mean) / sqrt(var + eps) + beta = layer(x) * s + t,
    s = gamma / sqrt(var + eps),  t = beta - mean * s

per output channel, taken by the layer's constants (:func:`channels.affine_producer`):

* Conv, any groups: weight rows and bias;
* ConvTranspose, any groups: weight [I, O/g, k...] per output channel (o // (O/g), o % (O/g));
* Gemm: the output columns of B and the bias C (beta folded in);
* MatMul + Add (a Linear exported as two nodes): B's columns and the Add's constant;
* MatMul alone (2-D): becomes a Gemm carrying the shift as its bias.

Only when the layer's output feeds nothing but the BN. A BN after an activation, a residual
Add or a Concat has no such layer: ``fold_affine_forward`` and ``batchnorm_to_mul_add`` deal
with it.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphgen.optimize.channels import affine_producer
from graphgen.optimize.graph import GraphView, attr, static_shapes

NAME = "fold_batchnorm"


def bn_scale_shift(view: GraphView, bn: onnx.NodeProto):
    """(scale, shift) of an inference BN with constant parameters, float64, or None."""
    if len(bn.input) < 5:
        return None
    arrays = [view.array(n) for n in bn.input[1:5]]
    if any(a is None for a in arrays):
        return None
    gamma, beta, mean, var = (a.astype(np.float64).reshape(-1) for a in arrays)
    scale = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return scale, beta - mean * scale


def _inference_bn(view: GraphView, bn) -> bool:
    return (bn.op_type == "BatchNormalization" and not attr(bn, "training_mode", 0)
            and all(not o or not view.consumers.get(o) and o not in view.graph_outputs for o in bn.output[1:]))


def inference_batchnorms(model: onnx.ModelProto):
    """The shared start of the BatchNormalization passes: (view, static shapes, the model's
    inference-mode BatchNormalization nodes, checked lazily as the pass rewrites the graph),
    or None when the model has no BatchNormalization."""
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        return None
    view = GraphView(model)
    return view, static_shapes(model), (bn for bn in bns if _inference_bn(view, bn))


def run(model: onnx.ModelProto) -> int:
    found = inference_batchnorms(model)
    if found is None:
        return 0
    view, shapes, bns = found
    folded = 0
    for bn in bns:
        x = bn.input[0]
        layer = view.producer.get(x)
        if layer is None or view.only_consumer(x) is not bn:
            continue
        ss = bn_scale_shift(view, bn)
        if ss is None:
            continue
        scale, shift = ss
        fold = affine_producer(view, layer, shapes)
        if fold is not None:
            fold(scale, shift)()
            layer.output[0] = bn.output[0]
        elif (layer.op_type == "MatMul" and len(shapes.get(x, ())) == 2 and view.is_const(layer.input[1])
              and len(view.inits[layer.input[1]].dims) == 2 and len(shapes.get(layer.input[0], ())) == 2):
            # MatMul(A, B) then BN: Gemm(A, B * s, t)
            b = view.array(layer.input[1]).astype(np.float64) * scale.reshape(1, -1)
            bname = view.unique_name(layer.input[1] + ".folded")
            view.set_array(bname, b.astype(np.float32))
            cname = view.unique_name((layer.name or bn.output[0]) + ".bias")
            view.set_array(cname, shift.astype(np.float32))
            gemm = onnx.helper.make_node("Gemm", [layer.input[0], bname, cname], [bn.output[0]],
                                         name=layer.name or bn.name)
            layer.CopyFrom(gemm)
        else:
            continue
        view.remove_nodes([bn])
        view.refresh()
        folded += 1
    view.remove_unused_initializers()
    return folded
