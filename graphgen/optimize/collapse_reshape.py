"""Collapse consecutive Reshape / Transpose nodes; drop those that move nothing.

Patterns and replacements:

* reshape-like (Reshape, Flatten, Squeeze, Unsqueeze) reading another reshape-like ->
  one Reshape of the first one's input to the second one's output shape (a reshape only
  re-reads the row-major element order, so a chain of them is one reshape);
* Transpose(p2) reading Transpose(p1) -> Transpose(p1[p2]), nothing when that is the identity;
* a reshape-like whose output shape equals its input shape, a Transpose with the identity
  permutation -> removed;
* GlobalAveragePool / GlobalMaxPool -> Flatten (or a Reshape / Squeeze to [N, C]) -> one
  ReduceMean / ReduceMax with keepdims=0 (opset < 18 only: there ``axes`` is an attribute).

A pair is merged only when the first node has no other reader. Target shapes are the
static shapes from shape inference; with a symbolic dimension, only a Reshape whose shape
constant has no 0 (copy-this-dimension) entry is merged, by reusing that constant.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphgen.optimize.graph import (GraphView, add_const, add_node, attr, bypass_node, is_static, opset,
                                     static_shapes, toposort)

NAME = "collapse_reshape"

RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


GLOBAL_POOLS = {"GlobalAveragePool": "ReduceMean", "GlobalMaxPool": "ReduceMax"}


def _drops_pooled_dims(shapes, pool, node) -> bool:
    """``node`` turns the pool's [N, C, 1, ...] into [N, C]."""
    a, b = shapes.get(pool.input[0]), shapes.get(node.output[0])
    return (a is not None and b is not None and len(a) > 2 and len(b) == 2
            and tuple(b) == tuple(a[:2]) and isinstance(a[1], int))


def _perm(node, rank):
    p = attr(node, "perm")
    return list(p) if p is not None else list(reversed(range(rank)))


def _target(view: GraphView, node, shapes):
    """A shape constant for 'reshape the chain's input to what ``node`` outputs', or None."""
    out = shapes.get(node.output[0])
    if is_static(out):
        return np.asarray(out, np.int64)
    if node.op_type == "Reshape" and not attr(node, "allowzero", 0):
        s = view.array(node.input[1])
        if s is not None and not np.any(s == 0):
            return s.astype(np.int64)
    return None


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    if not any(n.op_type in RESHAPES or n.op_type == "Transpose" for n in model.graph.node):
        return 0
    shapes = static_shapes(model)
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in list(model.graph.node):
            op = node.op_type
            if op not in RESHAPES and op != "Transpose" or not node.input:
                continue
            x, y = node.input[0], node.output[0]
            sx, sy = shapes.get(x), shapes.get(y)
            # a node that moves nothing
            if (op in RESHAPES and is_static(sx) and sx == sy) or (
                    op == "Transpose" and sx is not None and _perm(node, len(sx)) == list(range(len(sx)))):
                before = len(model.graph.node)
                bypass_node(view, node)
                if len(model.graph.node) < before:
                    removed += 1
                    changed = True
                    break
                continue
            prev = view.producer.get(x)
            if prev is None or not prev.input or view.only_consumer(x) is not node:
                continue
            if op in RESHAPES and prev.op_type in RESHAPES:
                target = _target(view, node, shapes)
                if target is None:
                    continue
                name = add_const(view, target, f"{node.name or y}.shape")
                view.remove_nodes([node])
                add_node(view, "Reshape", [prev.input[0], name], [y], name=node.name or y)
            elif op in RESHAPES and prev.op_type in GLOBAL_POOLS and opset(model) < 18 and _drops_pooled_dims(
                    shapes, prev, node):
                # GlobalAveragePool -> Flatten is ReduceMean(keepdims=0): one node (opset 18 moved
                # `axes` to an input, which TVM 0.27's importer mishandles: left alone there)
                rank = len(shapes[prev.input[0]])
                view.remove_nodes([node])
                add_node(view, GLOBAL_POOLS[prev.op_type], [prev.input[0]], [y], name=node.name or y,
                         axes=list(range(2, rank)), keepdims=0)
            elif op == "Transpose" and prev.op_type == "Transpose":
                rank = len(attr(prev, "perm")) if attr(prev, "perm") is not None else (len(sx) if sx else None)
                if rank is None:
                    continue
                p1, p2 = _perm(prev, rank), _perm(node, rank)
                composed = [p1[i] for i in p2]
                view.remove_nodes([node])
                add_node(view, "Transpose", [prev.input[0]], [y], name=node.name or y, perm=composed)
            else:
                continue
            view.remove_nodes([prev])  # read only by the node just replaced
            removed += 1
            toposort(model)
            view.refresh()
            changed = True
            break
    view.remove_unused_initializers()
    return removed
