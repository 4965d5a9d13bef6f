"""Small helpers over onnx.GraphProto that the passes share."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


class GraphView:
    """Indexes a graph: initializers as numpy, producer and consumers of each tensor.

    Passes mutate ``graph`` and call :meth:`refresh` (or build a new view) afterwards.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self) -> None:
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {}
        self.consumers = defaultdict(list)
        for n in self.graph.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.graph_outputs = {o.name for o in self.graph.output}

    def array(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def is_const(self, name: str) -> bool:
        return name in self.inits

    def only_consumer(self, tensor: str):
        """The single node reading ``tensor``, if it is not also a graph output."""
        cons = self.consumers.get(tensor, [])
        if len(cons) == 1 and tensor not in self.graph_outputs:
            return cons[0]
        return None

    def set_array(self, name: str, value: np.ndarray) -> None:
        new = numpy_helper.from_array(np.asarray(value), name)
        if name in self.inits:
            self.inits[name].CopyFrom(new)
        else:
            self.graph.initializer.append(new)
            self.inits[name] = self.graph.initializer[-1]

    def unique_name(self, base: str) -> str:
        used = set(self.inits) | set(self.producer) | {i.name for i in self.graph.input}
        if base not in used:
            return base
        k = 1
        while f"{base}_{k}" in used:
            k += 1
        return f"{base}_{k}"

    def rename_uses(self, old: str, new: str) -> None:
        """Make every consumer of ``old`` read ``new`` instead (graph outputs keep their names)."""
        for n in self.graph.node:
            for idx, i in enumerate(n.input):
                if i == old:
                    n.input[idx] = new

    def remove_nodes(self, nodes) -> None:
        # delete in place, last first: `del repeated[i]` keeps references to the other nodes
        # valid, while rebuilding the list would copy them and detach what passes hold
        ids = {id(n) for n in nodes}
        for i in reversed(range(len(self.graph.node))):
            if id(self.graph.node[i]) in ids:
                del self.graph.node[i]

    def remove_unused_initializers(self) -> None:
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def bypass_node(view: GraphView, node: onnx.NodeProto) -> None:
    """Remove a single-input pass-through node, wiring its consumers to its input.

    If its output is a graph output, the producer of its input is renamed instead so the
    graph's output names never change.
    """
    src, dst = node.input[0], node.output[0]
    if dst in view.graph_outputs:
        prod = view.producer.get(src)
        if prod is None or src in view.graph_outputs or any(
                src in n.input for n in view.graph.node if n is not node):
            return  # keep it: an input feeds the output directly, or the value is shared
        for k, o in enumerate(prod.output):
            if o == src:
                prod.output[k] = dst
    else:
        view.rename_uses(dst, src)
    view.remove_nodes([node])
    view.refresh()
