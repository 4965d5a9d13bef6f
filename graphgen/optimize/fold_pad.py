"""Fold an explicit Pad into the Conv or pooling that reads it.

Pattern: ``Pad(x, pads)`` (constant mode, spatial axes only, no negative pads) read only by
a Conv, MaxPool or AveragePool with explicit pads (auto_pad NOTSET). Replacement: the
reader with ``pads`` added to its own. Exact when the padding value is what the reader
would pad with itself:

* Conv: 0.
* AveragePool (floor mode): 0, counted in the average; the pool gets ``count_include_pad=1``,
  so only a pool that already counts its padding, or has none, qualifies.
* MaxPool (floor mode): -inf (or the lowest float), or 0 when ``x`` is never negative (it
  comes from Relu, Relu6-like Clip with min >= 0, or Sigmoid).

Pools in ceil mode are left alone: with explicit padding a last partial window may start
inside the padded area, which implicit padding does not allow.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphgen.optimize.graph import GraphView, attr

NAME = "fold_pad"

READERS = {"Conv", "MaxPool", "AveragePool"}


def _pad_spec(view: GraphView, pad):
    """(spatial begin pads, spatial end pads, value) of a constant-mode Pad, or None."""
    mode = attr(pad, "mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if len(pad.input) > 1 and pad.input[1]:
        pads = view.array(pad.input[1])
    else:
        pads = attr(pad, "pads")  # opset < 11
        pads = None if pads is None else np.asarray(pads)
    if pads is None or len(pad.input) > 3 and pad.input[3]:  # axes input: keep it simple
        return None
    pads = [int(v) for v in np.asarray(pads).reshape(-1)]
    value = 0.0
    if len(pad.input) > 2 and pad.input[2]:
        v = view.array(pad.input[2])
        if v is None or v.size != 1:
            return None
        value = float(v.reshape(-1)[0])
    elif attr(pad, "value") is not None:
        value = float(attr(pad, "value"))
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if rank < 3 or any(begin[:2]) or any(end[:2]) or min(pads) < 0:
        return None
    return begin[2:], end[2:], value


def _never_negative(view: GraphView, name: str) -> bool:
    p = view.producer.get(name)
    if p is None:
        return False
    if p.op_type in ("Relu", "Sigmoid", "Softplus"):
        return True
    if p.op_type == "Clip" and len(p.input) > 1 and p.input[1]:
        lo = view.array(p.input[1])
        return lo is not None and float(lo.reshape(-1)[0]) >= 0
    return False


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    folded = 0
    for pad in [n for n in model.graph.node if n.op_type == "Pad"]:
        reader = view.only_consumer(pad.output[0])
        if reader is None or reader.op_type not in READERS or reader.input[0] != pad.output[0]:
            continue
        spec = _pad_spec(view, pad)
        if spec is None:
            continue
        begin, end, value = spec
        auto = attr(reader, "auto_pad", b"NOTSET")
        if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
            continue
        op = reader.op_type
        if op == "Conv" and value != 0.0:
            continue
        if op in ("MaxPool", "AveragePool") and attr(reader, "ceil_mode", 0):
            continue
        if op == "AveragePool":
            if value != 0.0 or (any(attr(reader, "pads", [0])) and not attr(reader, "count_include_pad", 0)):
                continue
        if op == "MaxPool":
            if len(reader.output) > 1 and reader.output[1]:
                continue  # indices would count positions in the padded tensor
            lowest = value == -np.inf or value <= float(np.finfo(np.float32).min)
            if not (lowest or value == 0.0 and _never_negative(view, pad.input[0])):
                continue
        n = len(begin)
        old = list(attr(reader, "pads", [0] * (2 * n)))
        new = [old[i] + begin[i] for i in range(n)] + [old[n + i] + end[i] for i in range(n)]
        for a in list(reader.attribute):
            if a.name in ("pads", "count_include_pad"):
                reader.attribute.remove(a)
        reader.attribute.append(onnx.helper.make_attribute("pads", new))
        if op == "AveragePool":
            reader.attribute.append(onnx.helper.make_attribute("count_include_pad", 1))
        reader.input[0] = pad.input[0]
        view.remove_nodes([pad])
        view.refresh()
        folded += 1
    if folded:
        view.remove_unused_initializers()
    return folded
