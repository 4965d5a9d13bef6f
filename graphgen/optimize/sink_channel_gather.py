"""Move a channel Gather past a per-channel op that makes the tensor smaller.

Pattern: ``Gather(x, g, axis=1)`` (``g`` a permutation) read only by an op that treats
every channel alone and outputs fewer elements than it reads: a strided depthwise Conv, a
pooling. Replacement: the op on ``x`` with its per-channel parameters permuted the other
way, then the Gather on its (smaller) output. ShuffleNet V1's shuffle that no weight can
absorb (grouped 1x1 convolutions on both sides) then moves a quarter of the data in the
stride-2 units. A Gather whose readers can absorb it was already folded by
``channel_routing``.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphgen.optimize.channels import inverse, per_channel_params
from graphgen.optimize.graph import GraphView, attr, is_static, static_shapes, toposort

NAME = "sink_channel_gather"


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    if not any(n.op_type == "Gather" for n in model.graph.node):
        return 0
    shapes = static_shapes(model)
    moved = 0
    for gather in [n for n in model.graph.node if n.op_type == "Gather"]:
        while True:
            x, y = gather.input[0], gather.output[0]
            sx = shapes.get(x)
            if sx is None or len(sx) < 2 or not is_static(sx[1:]) or attr(gather, "axis", 0) % len(sx) != 1:
                break
            g = view.array(gather.input[1])
            if g is None or g.ndim != 1 or len(g) != sx[1] or not np.array_equal(np.sort(g % sx[1]),
                                                                                  np.arange(sx[1])):
                break
            g = g.astype(np.int64) % sx[1]
            r = view.only_consumer(y)
            if r is None or not r.input or r.input[0] != y:
                break
            so = shapes.get(r.output[0])
            # per sample: the batch may be symbolic
            if so is None or len(so) < 2 or not is_static(so[1:]) or so[1] != sx[1] or np.prod(so[1:]) >= np.prod(
                    sx[1:]):
                break
            pc = per_channel_params(view, r, y, shapes)
            if pc is None:
                break
            for e in pc(inverse(g)):
                e()
            z = r.output[0]
            z_new = view.unique_name(z + ".unshuffled")
            r.input[0] = x
            r.output[0] = z_new
            gather.input[0] = z_new
            gather.output[0] = z
            shapes[z_new] = so
            view.refresh()
            moved += 1
    if moved:
        toposort(model)
        view.refresh()
    return moved
