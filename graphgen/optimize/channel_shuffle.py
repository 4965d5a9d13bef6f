"""Channel shuffle -> one Gather on the channel axis.

Pattern: a chain of data-movement nodes (Reshape, Transpose, Flatten, Squeeze, Unsqueeze),
each read only by the next, that takes an [N, C, ...] tensor back to its own shape while
moving whole channels. ShuffleNet's

    Reshape(N, g, C/g, H, W) -> Transpose(0, 2, 1, 3, 4) -> Reshape(N, C, H, W)

is one; exporters also emit (N, g, C/g, H*W) views, 0 / -1 in the shapes, or a Flatten-like
last step. Replacement: ``Gather(x, indices, axis=1)`` with the chain's permutation.

Exactness does not rest on matching the pattern: the chain is *evaluated* on an index
tensor of the input's static shape (numpy reshape / transpose have ONNX's semantics), and it
is replaced only when the result has the input's shape and every position holds the same
spatial element of some input channel. A chain that changes the shape, or mixes spatial
positions, is left alone. The channel passes that follow (``channel_routing``,
``sink_channel_gather``) then fold the Gather into neighbouring weights where they can.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphgen.optimize.graph import GraphView, add_const, add_node, attr, is_static, static_shapes, toposort

NAME = "channel_shuffle"

MOVES = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}
MAX_ELEMENTS = 1 << 26


def _axes(view: GraphView, node):
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        arr = view.array(node.input[1])
        axes = None if arr is None else [int(v) for v in arr.reshape(-1)]
    return axes


def _step(view: GraphView, node: onnx.NodeProto, arr: np.ndarray, batch_free: bool) -> np.ndarray | None:
    """One chain node on numpy, with ONNX's shape rules. ``batch_free``: the model's batch is
    symbolic and ``arr`` holds one sample, so the node must treat samples alike (keep axis 0)."""
    op, shape = node.op_type, arr.shape
    if op == "Transpose":
        perm = attr(node, "perm")
        perm = list(perm) if perm is not None else list(reversed(range(arr.ndim)))
        return None if batch_free and perm[0] != 0 else arr.transpose(perm)
    if op == "Reshape":
        target = view.array(node.input[1]) if len(node.input) > 1 else None
        if target is None or attr(node, "allowzero", 0):
            return None
        target = [int(v) for v in target.reshape(-1)]
        if batch_free and target[0] not in (0, -1):
            return None
        out = [shape[i] if v == 0 else v for i, v in enumerate(target)]
        if out.count(-1) > 1:
            return None
        if -1 in out:
            known = int(np.prod([v for v in out if v != -1]))
            if known == 0 or arr.size % known:
                return None
            out[out.index(-1)] = arr.size // known
    elif op == "Flatten":
        axis = attr(node, "axis", 1) % (arr.ndim + 1) if arr.ndim else 0
        if batch_free and axis == 0:
            return None
        out = [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]
    elif op == "Squeeze":
        axes = _axes(view, node)
        axes = [a % arr.ndim for a in axes] if axes else [i for i, d in enumerate(shape) if d == 1]
        if batch_free and 0 in axes or any(shape[a] != 1 for a in axes):
            return None
        out = [d for i, d in enumerate(shape) if i not in axes]
    elif op == "Unsqueeze":
        axes = _axes(view, node)
        if axes is None:
            return None
        rank = arr.ndim + len(axes)
        axes = sorted(a % rank for a in axes)
        if batch_free and 0 in axes:
            return None
        out = list(shape)
        for a in axes:
            out.insert(a, 1)
    else:
        return None
    if int(np.prod(out)) != arr.size or any(d < 0 for d in out):
        return None
    res = arr.reshape(out)
    if batch_free and (res.ndim == 0 or res.shape[0] != 1):
        return None
    return res


def channel_permutation(view: GraphView, chain, x_shape) -> np.ndarray | None:
    """The gather index ``g`` (output channel c = input channel g[c]) the chain amounts to, or None.

    A symbolic batch (first dimension) is evaluated as one sample, and then only chains that
    keep the batch on axis 0 all the way qualify."""
    if x_shape is None or len(x_shape) < 2 or not is_static(x_shape[1:]):
        return None
    batch_free = not isinstance(x_shape[0], int) or x_shape[0] <= 0
    shape = (1, *x_shape[1:]) if batch_free else tuple(x_shape)
    if int(np.prod(shape)) > MAX_ELEMENTS:
        return None
    iota = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    res = iota
    for node in chain:
        res = _step(view, node, res, batch_free)
        if res is None:
            return None
    if res.shape != shape:
        return None
    n, c = shape[0], shape[1]
    rest = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    flat = res.reshape(n, c, rest)
    g = (flat[0, :, 0] // rest) % c
    if not np.array_equal(flat, iota.reshape(n, c, rest)[:, g, :]):
        return None
    return g


def _chain_from(view: GraphView, head: onnx.NodeProto):
    """The longest single-reader chain of MOVES nodes starting at ``head``."""
    chain = [head]
    while True:
        out = chain[-1].output[0]
        nxt = view.only_consumer(out)
        if nxt is None or nxt.op_type not in MOVES or nxt.input[0] != out or len(chain) >= 8:
            return chain
        chain.append(nxt)


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    if not any(n.op_type in MOVES for n in model.graph.node):
        return 0
    shapes = static_shapes(model)
    rewrites = 0
    removed: set[int] = set()
    for head in list(model.graph.node):
        if id(head) in removed or head.op_type not in MOVES or not head.input:
            continue
        x = head.input[0]
        chain = _chain_from(view, head)
        best = None
        for k in range(len(chain), 1, -1):  # longest prefix that is a channel permutation
            g = channel_permutation(view, chain[:k], shapes.get(x))
            if g is not None:
                best = (chain[:k], g)
                break
        if best is None:
            continue
        sub, g = best
        out = sub[-1].output[0]
        view.remove_nodes(sub)
        removed.update(id(n) for n in sub)
        if np.array_equal(g, np.arange(len(g))):
            # the chain moves nothing: its readers read x (a graph output keeps its name via Identity)
            if out in view.graph_outputs:
                add_node(view, "Identity", [x], [out], name=sub[-1].name)
            else:
                view.rename_uses(out, x)
        else:
            idx = add_const(view, g.astype(np.int64), f"{sub[0].name or out}.shuffle_indices")
            add_node(view, "Gather", [x, idx], [out], name=(sub[0].name or out) + "_gather", axis=1)
        view.refresh()
        rewrites += 1
    toposort(model)
    view.refresh()
    view.remove_unused_initializers()
    return rewrites
