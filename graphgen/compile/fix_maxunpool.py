"""Rewrite MaxPool-with-Indices + MaxUnpool pairs into ops TVM 0.27's ONNX importer accepts.

TVM's importer rejects MaxPool's second output (Indices), so SegNet-style decoders that unpool
with the encoder's pooling indices cannot be imported as exported. For non-overlapping pools
(kernel == stride, no padding, no dilation, floor mode) the pair has an exact index-free form.

Per pooling layer, computed once from its input X (cropped to the windows' area):

    up     = Resize_nearest(MaxPool(X), k)        each window's max, spread over the window
    is_max = Equal(X, up)                         every position holding its window's max
    score  = Where(is_max, rank_score, 0)         rank_score = k*k - (row-major position in window)
    keep   = And(Equal(score, Resize_nearest(MaxPool(score), k)), is_max)

``keep`` marks one position per window: the first maximum in row-major order, which is exactly
the position ONNX's MaxPool reports in Indices (onnxruntime scans a window row by row and only
replaces the running max on a strictly greater value). Each MaxUnpool(Z, Indices[, output_shape])
then becomes

    Y = Where(keep, Resize_nearest(Z, k), 0)      zero-padded at the bottom/right to output_shape

which scatters Z's values to the recorded positions and zeros elsewhere, as MaxUnpool does.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["rewrite_maxunpool_for_tvm", "has_maxpool_indices"]


def has_maxpool_indices(model: onnx.ModelProto) -> bool:
    """True when some MaxPool node emits its Indices output (the form TVM rejects)."""
    return any(n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1] for n in model.graph.node)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pool_window(node: onnx.NodeProto, rank: int) -> tuple[int, ...]:
    """The window of a non-overlapping, unpadded pool; raises for any other configuration."""
    a = _attrs(node)
    kernel = tuple(a["kernel_shape"])
    strides = tuple(a.get("strides", [1] * len(kernel)))
    pads = tuple(a.get("pads", [0] * 2 * len(kernel)))
    dilations = tuple(a.get("dilations", [1] * len(kernel)))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    problems = []
    if len(kernel) != rank - 2 or len(kernel) != 2:
        problems.append(f"{len(kernel)}-D window (only 2-D pools are handled)")
    if strides != kernel:
        problems.append(f"stride {list(strides)} != kernel {list(kernel)}")
    if any(pads) or auto_pad not in ("NOTSET", "VALID"):
        problems.append("padding")
    if any(d != 1 for d in dilations):
        problems.append("dilation")
    if node.op_type == "MaxPool" and a.get("ceil_mode", 0):
        problems.append("ceil_mode")
    if node.op_type == "MaxPool" and a.get("storage_order", 0):
        problems.append("column-major storage_order")
    if problems:
        raise NotImplementedError(f"{node.op_type} {node.name!r}: cannot rewrite for TVM ({', '.join(problems)}); "
                                  "only non-overlapping unpadded 2-D windows have an exact index-free form")
    return kernel


class _Names:
    def __init__(self, graph: onnx.GraphProto):
        self.used = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {
            o.name for o in graph.output}
        for n in graph.node:
            self.used.update(n.output)
            self.used.add(n.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _static_info(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Static shapes and element types of every value shape inference can resolve."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    shapes, types = {}, {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        types[v.name] = t.elem_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[v.name] = tuple(d.dim_value for d in t.shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def rewrite_maxunpool_for_tvm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` where every MaxPool-with-Indices feeding MaxUnpool nodes is
    replaced by the exact index-free form described in the module docstring.

    Raises NotImplementedError when Indices are used by anything but MaxUnpool (or are a graph
    output), or when a pool is overlapping/padded; shapes must be static. A model without
    MaxPool Indices is returned unchanged (as a copy).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not has_maxpool_indices(out):
        return out
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise NotImplementedError(f"rewrite_maxunpool_for_tvm needs opset >= 13 (model has {opset})")
    graph = out.graph
    shapes, types = _static_info(out)
    names = _Names(graph)
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    new_inits: list[onnx.TensorProto] = []

    def const(value: np.ndarray, base: str) -> str:
        name = names(base)
        new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], base: str, **attrs) -> str:
        name = names(base)
        emitted.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def upsample(x: str, window: tuple[int, int], base: str) -> str:
        scales = const(np.asarray([1, 1, *window], np.float32), f"{base}/scales")
        return node("Resize", [x, "", scales], base, mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    # Indices output name -> (keep-mask name, window, covered (h, w), pooled shape)
    masks: dict[str, tuple[str, tuple[int, int], tuple[int, int], tuple[int, ...]]] = {}
    replaced_indices: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    for n in graph.node:
        emitted: list[onnx.NodeProto] = []
        if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]:
            indices = n.output[1]
            users = consumers.get(indices, [])
            if indices in graph_outputs or any(u.op_type != "MaxUnpool" or list(u.input[2:3]) == [indices]
                                               or u.input[0] == indices for u in users):
                raise NotImplementedError(f"MaxPool {n.name!r}: its Indices are used by something other than "
                                          "MaxUnpool's I input; no index-free form")
            x = n.input[0]
            if x not in shapes:
                raise ValueError(f"MaxPool {n.name!r}: input {x!r} has no static shape (run shape inference "
                                 "with fixed input sizes first)")
            xshape = shapes[x]
            window = _pool_window(n, len(xshape))
            pooled_hw = tuple(s // k for s, k in zip(xshape[2:], window))
            covered = tuple(p * k for p, k in zip(pooled_hw, window))
            base = (n.name or indices) + "/unpool_mask"
            pooled = n.output[0] or names(f"{base}/pooled")
            kept = helper.make_node("MaxPool", [x], [pooled], name=n.name)
            kept.attribute.extend(a for a in n.attribute if a.name != "storage_order")
            emitted.append(kept)
            xc = x
            if covered != tuple(xshape[2:]):  # floor-mode pooling drops the last row/column
                xc = node("Slice", [x, const(np.zeros(2, np.int64), f"{base}/starts"),
                                    const(np.asarray(covered, np.int64), f"{base}/ends"),
                                    const(np.asarray([2, 3], np.int64), f"{base}/axes")], f"{base}/crop")
            dtype = helper.tensor_dtype_to_np_dtype(types.get(x, onnx.TensorProto.FLOAT))
            kh, kw = window
            # rank_score = k*k - (dh*kw + dw): distinct, positive, largest for the window's first position
            rows = (kh * kw - (np.arange(covered[0]) % kh) * kw).astype(dtype).reshape(1, 1, -1, 1)
            cols = (-(np.arange(covered[1]) % kw)).astype(dtype).reshape(1, 1, 1, -1)
            rank_score = node("Add", [const(rows, f"{base}/row_score"), const(cols, f"{base}/col_score")],
                              f"{base}/rank_score")
            is_max = node("Equal", [xc, upsample(pooled, window, f"{base}/max_up")], f"{base}/is_max")
            zero = const(np.zeros((), dtype), f"{base}/zero")
            score = node("Where", [is_max, rank_score, zero], f"{base}/score")
            best = node("MaxPool", [score], f"{base}/best", kernel_shape=list(window), strides=list(window))
            first = node("Equal", [score, upsample(best, window, f"{base}/best_up")], f"{base}/is_first")
            keep = node("And", [first, is_max], f"{base}/keep")
            masks[indices] = (keep, window, covered, (*xshape[:2], *pooled_hw))
            replaced_indices.add(indices)
        elif n.op_type == "MaxUnpool" and len(n.input) > 1 and n.input[1] in masks:
            keep, window, covered, pooled_shape = masks[n.input[1]]
            unpool_window = _pool_window(n, len(pooled_shape))
            if unpool_window != window:
                raise NotImplementedError(f"MaxUnpool {n.name!r}: window {unpool_window} differs from its "
                                          f"MaxPool's {window}")
            z = n.input[0]
            if shapes.get(z, pooled_shape) != pooled_shape:
                raise ValueError(f"MaxUnpool {n.name!r}: values shape {shapes[z]} != indices shape {pooled_shape}")
            target = covered
            if len(n.input) > 2 and n.input[2]:
                init = next((i for i in graph.initializer if i.name == n.input[2]), None)
                if init is None:
                    raise NotImplementedError(f"MaxUnpool {n.name!r}: output_shape must be a constant initializer")
                target = tuple(int(v) for v in numpy_helper.to_array(init)[2:])
            if any(t < c or t >= c + k for t, c, k in zip(target, covered, window)):
                raise ValueError(f"MaxUnpool {n.name!r}: output size {target} does not fit pooled size "
                                 f"{pooled_shape[2:]} with window {window}")
            base = n.name or n.output[0]
            dtype = helper.tensor_dtype_to_np_dtype(types.get(z, onnx.TensorProto.FLOAT))
            spread = upsample(z, window, f"{base}/spread")
            zero = const(np.zeros((), dtype), f"{base}/zero")
            if target == covered:
                emitted.append(helper.make_node("Where", [keep, spread, zero], [n.output[0]], name=names(base)))
            else:
                placed = node("Where", [keep, spread, zero], f"{base}/place")
                pads = const(np.asarray([0, 0, 0, 0, 0, 0, target[0] - covered[0], target[1] - covered[1]],
                                        np.int64), f"{base}/pads")
                emitted.append(helper.make_node("Pad", [placed, pads, zero], [n.output[0]], name=names(base),
                                                mode="constant"))
        else:
            emitted.append(n)
        new_nodes.extend(emitted)

    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    for v in [v for v in graph.value_info if v.name in replaced_indices]:
        graph.value_info.remove(v)
    # drop the removed MaxUnpool nodes' output_shape constants when nothing else reads them
    still_read = {i for nd in graph.node for i in nd.input}
    shape_consts = {nd.input[2] for nd in model.graph.node if nd.op_type == "MaxUnpool" and len(nd.input) > 2}
    for init in [i for i in graph.initializer if i.name in shape_consts and i.name not in still_read]:
        graph.initializer.remove(init)
    out = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    onnx.checker.check_model(out)
    return out
