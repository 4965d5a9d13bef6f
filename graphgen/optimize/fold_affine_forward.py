"""Fold a per-channel affine map (Mul and / or Add by constants) forwards into the layers
that read it.

A BatchNorm after an activation (pre-activation ResNet's BN-ReLU-Conv, DenseNet's
BN-ReLU-Conv after each Concat) has no layer before it to fold into;
``batchnorm_to_mul_add`` made it ``y = x * s + t``. Two exact rewrites, tried in order:

A. Every reader of ``y`` is a Conv or Gemm (a Conv with ``t != 0`` only without padding:
   zero padding around ``x * s + t`` is not ``t`` around ``x``, so the shift would depend on
   the position near the border; such a Conv is left alone). The readers take it all:
   ``W' = W * s`` per input channel and ``b' = b + sum(W * t)`` over the window. The Mul
   and the Add disappear. With ``t == 0`` padding does not matter (``0 * s = 0``) and
   ConvTranspose / MatMul readers take the scale too.
B. Otherwise, with ``s != 0``: ``x * s + t = (x + t / s) * s``, and ``s`` travels on through
   ops with f(s x) = s f(x) (ReLU and max pooling when s > 0, average pooling, depthwise
   conv, reshapes) to the convolutions that take it in their weights
   (:func:`channels.absorb_scale_forward`; padding is fine for a pure scale). The Mul
   disappears; the Add stays as ``x + t / s`` (one rounding more, within fp32 tolerance).
   BN-ReLU-Conv becomes Add-ReLU-Conv.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphgen.optimize.channels import _const_operand, absorb_reader, absorb_scale_forward
from graphgen.optimize.graph import GraphView, attr, channel_vector, rename_input, set_input_array, static_shapes

NAME = "fold_affine_forward"


def _affine_at(view: GraphView, node, shapes):
    """(x, s, t, nodes, y) for Mul [-> Add] or Add by per-channel constants starting at ``node``."""
    if node.op_type not in ("Mul", "Add") or len(node.input) != 2:
        return None
    for k in (0, 1):
        x, c = node.input[k], node.input[1 - k]
        if view.is_const(x) or not view.is_const(c):
            continue
        sx = shapes.get(x)
        if not sx or len(sx) < 2 or not isinstance(sx[1], int) or shapes.get(node.output[0]) != sx:
            return None
        ch, rank = sx[1], len(sx)
        vec = channel_vector(view, c, ch, rank)
        if vec is None:
            return None
        vec = vec.astype(np.float64)
        if node.op_type == "Add":
            return x, np.ones(ch), vec, [node], node.output[0]
        s, t, nodes, y = vec, np.zeros(ch), [node], node.output[0]
        nxt = view.only_consumer(y)
        if nxt is not None and nxt.op_type == "Add":
            kk = _const_operand(view, nxt, y)
            if kk is not None:
                tv = channel_vector(view, nxt.input[kk], ch, rank)
                if tv is not None and shapes.get(nxt.output[0]) == sx:
                    t, nodes, y = tv.astype(np.float64), [node, nxt], nxt.output[0]
        return x, s, t, nodes, y
    return None


def _conv_reader_edit(view, node, s, t):
    """Conv / Gemm reading x * s + t -> reading x (A above); None when not exact."""
    op = node.op_type
    if op == "Conv":
        if not view.is_const(node.input[1]) or len(node.input) > 2 and node.input[2] and not view.is_const(
                node.input[2]):
            return None
        if np.any(t != 0) and (any(attr(node, "pads", [0]) or [0])
                               or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")):
            return None
        group = attr(node, "group", 1)

        def edit():
            w = view.array(node.input[1]).astype(np.float64)
            o, per_group = w.shape[0], w.shape[1]
            full = (np.arange(o) // (o // group))[:, None] * per_group + np.arange(per_group)[None, :]
            extra = (1,) * (w.ndim - 2)
            has_b = len(node.input) > 2 and node.input[2]
            b = view.array(node.input[2]).astype(np.float64) if has_b else np.zeros(o)
            b = b + (w * t[full].reshape(o, per_group, *extra)).reshape(o, -1).sum(1)
            set_input_array(view, node, 1, (w * s[full].reshape(o, per_group, *extra)).astype(np.float32))
            set_input_array(view, node, 2, b.astype(np.float32))
        return edit
    if op == "Gemm":
        if attr(node, "transA", 0) or not view.is_const(node.input[1]):
            return None
        if len(node.input) > 2 and node.input[2] and not view.is_const(node.input[2]):
            return None

        def edit():
            w = view.array(node.input[1]).astype(np.float64)
            wk = w.T if attr(node, "transB", 0) else w  # [K, N]
            alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
            c = view.array(node.input[2]).astype(np.float64) * beta if len(node.input) > 2 and node.input[2] else 0.0
            new_c = np.asarray(c + alpha * (t @ wk))
            if new_c.ndim == 2 and new_c.shape[0] == 1:
                new_c = new_c[0]
            new_w = wk * s[:, None]
            set_input_array(view, node, 1, (new_w.T if attr(node, "transB", 0) else new_w).astype(np.float32))
            set_input_array(view, node, 2, new_c.astype(np.float32))
            for a in list(node.attribute):
                if a.name == "beta":
                    node.attribute.remove(a)
        return edit
    return None


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    if not any(n.op_type in ("Mul", "Add") for n in model.graph.node):
        return 0
    shapes = static_shapes(model)
    removed = 0
    gone: set[int] = set()
    for node in list(model.graph.node):
        if node.op_type not in ("Mul", "Add") or id(node) in gone:
            continue
        found = _affine_at(view, node, shapes)
        if found is None:
            continue
        x, s, t, nodes, y = found
        readers = view.consumers.get(y, [])
        if not readers or y in view.graph_outputs:
            continue
        # A: the readers take both
        edits = []
        for r in readers:
            e = None
            if r.input[0] == y and y not in r.input[1:]:
                e = _conv_reader_edit(view, r, s, t)
                if e is None and not np.any(t):
                    ab = absorb_reader(view, r, y, shapes)
                    e = ab(None, s) if ab is not None else None
                    e = (lambda es: (lambda: [f() for f in es]))(e) if e is not None else None
            if e is None:
                edits = None
                break
            edits.append(e)
        if edits is not None:
            for e in edits:
                e()
            for r in readers:
                rename_input(r, y, x)
            view.remove_nodes(nodes)
            gone.update(id(n) for n in nodes)
            view.refresh()
            removed += len(nodes)
            continue
        # B: the scale travels on, the shift stays as x + t / s
        if np.all(s == 1.0) or not np.all(s != 0):
            continue
        chain = absorb_scale_forward(view, y, s, shapes)
        if chain is None:
            continue
        for e in chain:
            e()
        mul = nodes[0]
        if len(nodes) == 2:
            add = nodes[1]
            k = _const_operand(view, add, mul.output[0])
            shape = (len(s),) + (1,) * (len(shapes[x]) - 2)
            set_input_array(view, add, k, (t / s).reshape(shape).astype(np.float32))
            add.input[1 - k] = x
        else:
            for r in readers:
                rename_input(r, y, x)
        view.remove_nodes([mul])
        gone.add(id(mul))
        view.refresh()
        removed += 1
    view.remove_unused_initializers()
    return removed
