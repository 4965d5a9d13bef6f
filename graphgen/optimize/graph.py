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
            # an If / Loop body reading an outer tensor makes its node a reader too, so no pass
            # takes that tensor for single-use
            for i in sorted(subgraph_reads(n) - set(n.input)):
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
            rename_input(n, old, new)

    def remove_nodes(self, nodes) -> None:
        # delete in place, last first: `del repeated[i]` keeps references to the other nodes
        # valid, while rebuilding the list would copy them and detach what passes hold
        ids = {id(n) for n in nodes}
        for i in reversed(range(len(self.graph.node))):
            if id(self.graph.node[i]) in ids:
                del self.graph.node[i]

    def remove_unused_initializers(self) -> None:
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        used |= {i for n in self.graph.node for i in subgraph_reads(n)}
        # delete in place: rebuilding the list would copy every weight (500 MB for a VGG)
        for i in reversed(range(len(self.graph.initializer))):
            if self.graph.initializer[i].name not in used:
                del self.graph.initializer[i]
        self.inits = {i.name: i for i in self.graph.initializer}


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def subgraph_reads(node: onnx.NodeProto) -> set:
    """Names the node's subgraphs (If / Loop / Scan bodies) read from outside themselves."""
    reads = set()
    for g in _subgraphs(node):
        inner = {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            reads.update(i for i in n.input if i and i not in inner)
            reads.update(subgraph_reads(n) - inner)
            inner.update(o for o in n.output if o)
        reads.update(o.name for o in g.output if o.name not in inner)
    return reads


def rename_input(node: onnx.NodeProto, old: str, new: str) -> None:
    """Make ``node`` (and the subgraphs it carries) read ``new`` where it read ``old``."""
    for idx, i in enumerate(node.input):
        if i == old:
            node.input[idx] = new
    for g in _subgraphs(node):
        if old in {i.name for i in g.input} | {i.name for i in g.initializer}:
            continue  # shadowed inside
        for n in g.node:
            rename_input(n, old, new)
        for o in g.output:
            if o.name == old:
                o.name = new


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


# --------------------------------------------------------------------------- more helpers

def opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Shapes of every tensor onnx's shape inference can tell (dims int, or None when symbolic).

    Runs on a light copy: large float initializers become graph inputs of the same shape, so a
    500 MB model is not copied to learn its shapes.
    """
    g = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    init_names = set()
    for init in g.initializer:
        init_names.add(init.name)
        n = int(np.prod(init.dims)) if len(init.dims) else 1
        if n > 64 and init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            lg.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            lg.initializer.append(init)
    lg.input.extend(i for i in g.input if i.name not in init_names)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # a model shape inference cannot handle: no shapes, passes that need them skip
        inferred = light
    shapes: dict[str, tuple] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def is_static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def uses(view: GraphView, name: str) -> int:
    """How many node inputs (and graph outputs) read ``name``."""
    return sum(1 for n in view.consumers.get(name, []) for i in n.input if i == name) + (
        1 if name in view.graph_outputs else 0)


def set_input_array(view: GraphView, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
    """Give ``node.input[index]`` the constant ``value``: in place when no other node reads the
    initializer, otherwise as a new initializer so the other readers keep the old value."""
    name = node.input[index] if index < len(node.input) else ""
    value = np.asarray(value)
    if name and name in view.inits and uses(view, name) == 1:
        view.set_array(name, value)
        return
    base = name or (node.name or node.op_type) + ".const"
    new = view.unique_name(base)
    view.set_array(new, value)
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = new
    view.consumers[new].append(node)
    if name:
        view.consumers[name] = [n for n in view.consumers[name] if n is not node]


def add_const(view: GraphView, value: np.ndarray, base: str) -> str:
    name = view.unique_name(base)
    view.set_array(name, np.asarray(value))
    return name


def add_node(view: GraphView, op_type: str, inputs, outputs, name: str | None = None, **attrs) -> onnx.NodeProto:
    """Append a node (callers restore topological order with :func:`toposort` at the end)."""
    used = {n.name for n in view.graph.node}
    base = name or outputs[0]
    node_name, k = base, 1
    while node_name in used:
        node_name, k = f"{base}_{k}", k + 1
    view.graph.node.append(onnx.helper.make_node(op_type, list(inputs), list(outputs), name=node_name, **attrs))
    node = view.graph.node[-1]
    for o in node.output:
        if o:
            view.producer[o] = node
    for i in node.input:
        if i:
            view.consumers[i].append(node)
    return node


def toposort(model: onnx.ModelProto) -> bool:
    """Put the nodes back in topological order (stable) if a rewrite appended some out of order.

    Node references held by a pass are invalid afterwards: call it last."""
    g = model.graph
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    ok = True
    seen = set(available)
    for n in g.node:
        if any(i not in seen for i in n.input) or any(i not in seen for i in subgraph_reads(n)):
            ok = False
            break
        seen.update(n.output)
    if ok:
        return False
    nodes = [copy_node(n) for n in g.node]
    producers = {}
    for idx, n in enumerate(nodes):
        for o in n.output:
            producers[o] = idx
    order, state = [], [0] * len(nodes)

    def visit(root):
        stack = [(root, False)]
        while stack:
            idx, done = stack.pop()
            if done:
                if state[idx] != 2:
                    state[idx] = 2
                    order.append(idx)
                continue
            if state[idx]:
                continue
            state[idx] = 1
            stack.append((idx, True))
            for i in list(reversed(nodes[idx].input)) + sorted(subgraph_reads(nodes[idx])):
                p = producers.get(i)
                if p is not None and not state[p]:
                    stack.append((p, False))

    for idx in range(len(nodes)):
        visit(idx)
    del g.node[:]
    g.node.extend(nodes[i] for i in order)
    return True


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(node)
    return c


def channel_vector(view: GraphView, name: str, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts against an [N, C, ...] tensor of ``rank`` as one value per
    channel (or one value for all): its values as a length-``channels`` vector, else None."""
    arr = view.array(name)
    if arr is None or arr.ndim > rank:
        return None
    shape = (1,) * (rank - arr.ndim) + arr.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(arr.reshape(-1), (channels,)).copy()


def split_sizes(view: GraphView, node: onnx.NodeProto, dim: int) -> list[int] | None:
    """A Split node's part sizes (input, attribute or equal parts)."""
    if len(node.input) > 1 and node.input[1]:
        arr = view.array(node.input[1])
        return None if arr is None else [int(v) for v in arr.reshape(-1)]
    sp = attr(node, "split")
    if sp:
        return [int(v) for v in sp]
    k = len(node.output)
    n_out = attr(node, "num_outputs")
    if n_out:
        chunk = -(-dim // int(n_out))
        return [min(chunk, dim - i * chunk) for i in range(int(n_out))]
    if dim % k:
        return None
    return [dim // k] * k
