"""Moving a channel permutation or a per-channel scale into neighbouring weights.

Not a pass: the helpers the channel passes share (``channel_shuffle``, ``channel_routing``,
``sink_channel_gather``, ``fold_affine_forward``).

Conventions. A *permutation* is a gather index ``g``: the new tensor is ``old[:, g]``
(channel axis 1), ``g`` a bijection. A *scale* ``s`` says the old tensor is ``s * new``
per channel.

* :func:`absorb_forward` rewrites the readers of a tensor so they give the same results when
  the tensor is replaced by its new form: a dense Conv / ConvTranspose / Gemm / MatMul
  permutes (or scales) its input-channel weights; a per-channel op on the way (activation,
  BatchNorm, per-channel Mul/Add, depthwise Conv, pooling, a reshape that keeps [N, C])
  permutes its own parameters and passes the permutation on to its readers.
* :func:`permute_backward` makes the producer of a tensor emit it permuted: a dense Conv /
  ConvTranspose / Gemm / MatMul permutes its output channels and bias; a per-channel op
  permutes its parameters and passes the permutation on to its own input.

Both are two-phase: they return a list of edits (callables) without touching the model,
or None when the rewrite is not possible, so a pass can plan a whole region first. Edits
read the weights when applied, so edits of several plans compose.
"""

from __future__ import annotations

import numpy as np

from graphgen.optimize.graph import GraphView, attr, channel_vector, set_input_array

#: elementwise ops with no parameters: f applied to every value alone
UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus",
         "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "ThresholdedRelu",
         "Identity", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos"}
#: per-channel spatial ops (every channel pooled on its own)
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
#: f(s * x) = s * f(x) for s > 0
POSITIVE_HOMOGENEOUS = {"Relu", "LeakyRelu", "Identity", "MaxPool", "GlobalMaxPool"}
#: f(s * x) = s * f(x) for any s (linear, no offset)
LINEAR_POOLS = {"AveragePool", "GlobalAveragePool"}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
ARITH = {"Mul", "Add", "Sub", "Div"}
REDUCES = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"}

Edits = list  # list of zero-argument callables


def _rank(shapes, name):
    s = shapes.get(name)
    return None if s is None else len(s)


def _channels(shapes, name):
    s = shapes.get(name)
    return s[1] if s is not None and len(s) > 1 and isinstance(s[1], int) else None


def _keeps_nc(shapes, node) -> bool:
    """A reshape-like node whose input and output are both [N, C, 1, ...]: channels stay on axis 1."""
    a, b = shapes.get(node.input[0]), shapes.get(node.output[0])
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return False
    if a[0] != b[0] or a[1] != b[1] or a[1] is None:
        return False
    return all(d == 1 for d in a[2:]) and all(d == 1 for d in b[2:])


def _reduce_axes(view: GraphView, node, rank):
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        arr = view.array(node.input[1])
        if arr is None:
            return None
        axes = [int(v) for v in arr.reshape(-1)]
    if axes is None:
        return None  # all axes
    return [a % rank for a in axes]


def is_depthwise(view: GraphView, node, shapes) -> bool:
    if node.op_type != "Conv":
        return False
    w = view.inits.get(node.input[1]) if len(node.input) > 1 else None
    c = _channels(shapes, node.input[0])
    g = attr(node, "group", 1)
    return w is not None and c is not None and g == c and w.dims[0] == c and w.dims[1] == 1


def _const_operand(view: GraphView, node, tensor):
    """For a binary op reading ``tensor`` and a constant: the constant's input index."""
    if len(node.input) != 2:
        return None
    a, b = node.input
    if a == tensor and b != tensor and view.is_const(b):
        return 1
    if b == tensor and a != tensor and view.is_const(a):
        return 0
    return None


# ------------------------------------------------------------------------------- per-channel ops

def per_channel_params(view: GraphView, node, tensor, shapes):
    """If ``node`` reads ``tensor`` and treats every channel alone (so a permutation of its
    input channels is the same permutation of its output channels, given its per-channel
    parameters are permuted too): a function ``g -> edits`` that permutes them. Else None."""
    op = node.op_type
    if not node.input or node.input[0] != tensor and op not in ARITH:
        return None
    outs = [o for o in node.output if o]
    if len(outs) != 1 or node.output[0] != outs[0]:
        if not (op == "Dropout" and node.output[0] and not view.consumers.get(node.output[1], [])
                and node.output[1] not in view.graph_outputs):
            return None
    rank, c = _rank(shapes, tensor), _channels(shapes, tensor)
    if rank is None or rank < 2 or c is None:
        return None
    none = lambda g: []  # noqa: E731
    if op in UNARY or op == "Dropout" and (len(node.input) < 3 or not node.input[2]):
        return none
    if op == "Clip":
        return none if all(not i or view.is_const(i) and view.array(i).size == 1 for i in node.input[1:]) else None
    if op in POOLS:
        return none
    if op in RESHAPES:
        return none if _keeps_nc(shapes, node) else None
    if op in REDUCES:
        axes = _reduce_axes(view, node, rank)
        return none if axes is not None and 0 not in axes and 1 not in axes else None
    if op == "BatchNormalization":
        if any(not view.is_const(i) for i in node.input[1:5]):
            return None

        def bn(g):
            return [_permute_const(view, node, k, g, c) for k in range(1, 5)]
        return bn
    if op == "PRelu":
        if channel_vector(view, node.input[1], c, rank) is None:
            return None
        return lambda g: [_permute_const(view, node, 1, g, c, rank)]
    if op in ARITH:
        k = _const_operand(view, node, tensor)
        if k is None or channel_vector(view, node.input[k], c, rank) is None:
            return None
        return lambda g: [_permute_const(view, node, k, g, c, rank)]
    if op == "Conv" and is_depthwise(view, node, shapes):
        def dw(g):
            e = [_permute_rows(view, node, 1, g)]
            if len(node.input) > 2 and node.input[2]:
                e.append(_permute_rows(view, node, 2, g))
            return e
        return dw
    return None


def _permute_const(view, node, k, g, c, rank=None):
    def edit():
        arr = view.array(node.input[k])
        if rank is None:  # a 1-D per-channel vector (BatchNorm)
            set_input_array(view, node, k, arr[g])
            return
        shape = (1,) * (rank - arr.ndim) + arr.shape
        if shape[1] == 1:
            return  # one value for all channels
        set_input_array(view, node, k, arr.reshape(shape)[:, g].reshape(arr.shape))
    return edit


def _permute_rows(view, node, k, g, axis=0):
    def edit():
        arr = view.array(node.input[k])
        set_input_array(view, node, k, np.take(arr, g, axis=axis))
    return edit


# ---------------------------------------------------------------------------- absorbing readers

def absorb_reader(view: GraphView, node, tensor, shapes):
    """If ``node`` is a dense Conv / ConvTranspose / Gemm / MatMul reading ``tensor`` as its
    data input with constant weights: a function ``(g, scale) -> edits`` that makes it give the
    same output when ``tensor`` is replaced by ``old[:, g] / scale`` (g may be None: no
    permutation; scale may be None). Grouped convolutions take scales and permutations that
    stay inside each group. Else None."""
    op = node.op_type
    if not node.input or node.input[0] != tensor or tensor in node.input[1:]:
        return None
    if op in ("Conv", "ConvTranspose"):
        if len(node.input) < 2 or not view.is_const(node.input[1]):
            return None
        w = view.inits[node.input[1]]
        group = attr(node, "group", 1)
        cin = w.dims[1] * group if op == "Conv" else w.dims[0]
        per_group = cin // group

        def conv(g, scale):
            if g is not None and group > 1 and np.any(np.asarray(g) // per_group != np.arange(cin) // per_group):
                return None
            def edit():
                arr = view.array(node.input[1])
                if op == "Conv":
                    # weight [O, I/g, k...]: output channel o reads input channel (o // (O/g)) * I/g + i
                    o = arr.shape[0]
                    full_idx = (np.arange(o) // (o // group))[:, None] * per_group + np.arange(per_group)[None, :]
                    new = arr.copy()
                    if scale is not None:
                        new = new * scale[full_idx].reshape(o, per_group, *([1] * (arr.ndim - 2)))
                    if g is not None:
                        # the new input channel d is old channel g[d]: weight column for d = old column g[d]
                        src = np.asarray(g)[full_idx] % per_group
                        new = np.take_along_axis(new, src.reshape(o, per_group, *([1] * (arr.ndim - 2))), axis=1)
                    set_input_array(view, node, 1, new.astype(arr.dtype))
                else:  # ConvTranspose weight [I, O/g, k...]
                    new = arr.copy()
                    if scale is not None:
                        new = new * scale.reshape(-1, *([1] * (arr.ndim - 1)))
                    if g is not None:
                        new = new[np.asarray(g)]
                    set_input_array(view, node, 1, new.astype(arr.dtype))
            return [edit]
        return conv
    if op == "Gemm":
        if attr(node, "transA", 0) or len(node.input) < 2 or not view.is_const(node.input[1]):
            return None
        axis = 1 if attr(node, "transB", 0) else 0
        return lambda g, scale: [_scale_permute_axis(view, node, 1, axis, g, scale)]
    if op == "MatMul":
        if _rank(shapes, tensor) != 2 or not view.is_const(node.input[1]) or len(view.inits[node.input[1]].dims) != 2:
            return None
        return lambda g, scale: [_scale_permute_axis(view, node, 1, 0, g, scale)]
    return None


def _scale_permute_axis(view, node, k, axis, g, scale):
    def edit():
        arr = view.array(node.input[k])
        new = np.moveaxis(arr, axis, 0).copy()
        if scale is not None:
            new = new * scale.reshape(-1, *([1] * (new.ndim - 1)))
        if g is not None:
            new = new[np.asarray(g)]
        set_input_array(view, node, k, np.moveaxis(new, 0, axis).astype(arr.dtype))
    return edit


def absorb_forward(view: GraphView, tensor: str, g, shapes, readers=None, depth: int = 0):
    """Edits making every reader of ``tensor`` (or only ``readers``) work on ``old[:, g]``,
    or None if some reader cannot. The permutation travels through per-channel ops to the
    dense layers that absorb it."""
    if tensor in view.graph_outputs or depth > 64:
        return None
    edits = []
    for node in (readers if readers is not None else view.consumers.get(tensor, [])):
        ab = absorb_reader(view, node, tensor, shapes)
        e = ab(g, None) if ab is not None else None
        if e is not None:
            edits += e
            continue
        # not absorbed here (a grouped conv takes only permutations inside its groups): a
        # depthwise conv passes the permutation on instead
        pc = per_channel_params(view, node, tensor, shapes)
        if pc is None:
            return None
        out = node.output[0]
        rest = absorb_forward(view, out, g, shapes, depth=depth + 1)
        if rest is None:
            return None
        edits += pc(g) + rest
    return edits


def permute_backward(view: GraphView, tensor: str, g, shapes, depth: int = 0):
    """Edits making the producer of ``tensor`` emit ``old[:, g]``, or None. Walks back through
    per-channel ops (each read only there) to a dense Conv / ConvTranspose / Gemm / MatMul."""
    node = view.producer.get(tensor)
    if node is None or depth > 64:
        return None
    op = node.op_type
    if op == "Conv" and attr(node, "group", 1) == 1 and view.is_const(node.input[1]):
        e = [_permute_rows(view, node, 1, g)]
        if len(node.input) > 2 and node.input[2]:
            if not view.is_const(node.input[2]):
                return None
            e.append(_permute_rows(view, node, 2, g))
        return e
    if op == "ConvTranspose" and attr(node, "group", 1) == 1 and view.is_const(node.input[1]):
        e = [_permute_rows(view, node, 1, g, axis=1)]
        if len(node.input) > 2 and node.input[2]:
            if not view.is_const(node.input[2]):
                return None
            e.append(_permute_rows(view, node, 2, g))
        return e
    if op in ("Gemm", "MatMul") and len(node.input) >= 2 and view.is_const(node.input[1]):
        if op == "Gemm" and attr(node, "transA", 0):
            return None
        w = view.inits[node.input[1]]
        if len(w.dims) != 2 or _rank(shapes, tensor) != 2:
            return None
        axis = 0 if op == "Gemm" and attr(node, "transB", 0) else 1
        e = [_permute_rows(view, node, 1, g, axis=axis)]
        if op == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = view.array(node.input[2])
            if c is None:
                return None
            if c.ndim >= 1 and c.shape[-1] > 1:
                if c.ndim == 2 and c.shape[0] != 1:
                    return None
                e.append(_permute_rows(view, node, 2, g, axis=c.ndim - 1))
        return e
    # a per-channel op: permute its parameters, then its input
    data_in = node.input[0] if node.input else ""
    if op in ARITH:
        k = _const_operand(view, node, node.input[0]) if node.input else None
        if k is None:
            k2 = _const_operand(view, node, node.input[1]) if len(node.input) > 1 else None
            if k2 is None:
                return None
            data_in = node.input[1]
    if not data_in or data_in in view.graph_outputs or len(view.consumers.get(data_in, [])) != 1:
        return None
    if view.is_const(data_in) or _channels(shapes, data_in) != _channels(shapes, tensor):
        return None
    pc = per_channel_params(view, node, data_in, shapes)
    if pc is None or op in RESHAPES or op in REDUCES:
        return None
    rest = permute_backward(view, data_in, g, shapes, depth + 1)
    if rest is None:
        return None
    return pc(g) + rest


def inverse(g) -> np.ndarray:
    g = np.asarray(g, np.int64)
    inv = np.empty_like(g)
    inv[g] = np.arange(len(g))
    return inv


# ------------------------------------------------------------------------- per-channel affine maps

def affine_producer(view: GraphView, node, shapes):
    """If ``node``'s output can absorb a per-output-channel ``y * scale + shift`` into its
    constants: a function ``(scale, shift) -> edit``, else None. Conv (any groups),
    ConvTranspose (any groups), Gemm, and MatMul + Add (the Add's constant is the bias)."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        if len(node.input) < 2 or not view.is_const(node.input[1]):
            return None
        if len(node.input) > 2 and node.input[2] and not view.is_const(node.input[2]):
            return None
        group = attr(node, "group", 1)

        def conv(scale, shift):
            def edit():
                w = view.array(node.input[1]).astype(np.float64)
                if op == "Conv":
                    out_ch = w.shape[0]
                    w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
                else:  # [I, O/g, k...]: output channel o = (o // (O/g), o % (O/g))
                    i, og = w.shape[0], w.shape[1]
                    out_ch = og * group
                    w = (w.reshape(group, i // group, og, *w.shape[2:])
                         * scale.reshape(group, 1, og, *([1] * (w.ndim - 2)))).reshape(w.shape)
                has_bias = len(node.input) > 2 and node.input[2]
                b = view.array(node.input[2]).astype(np.float64) if has_bias else np.zeros(out_ch)
                set_input_array(view, node, 1, w.astype(np.float32))
                new_b = (b * scale + shift).astype(np.float32)
                if has_bias:
                    set_input_array(view, node, 2, new_b)
                else:
                    wname = node.input[1]
                    base = wname[: -len(".weight")] if wname.endswith(".weight") else wname
                    name = view.unique_name(base + ".bias")
                    view.set_array(name, new_b)
                    node.input.append(name)
                    view.consumers[name].append(node)
            return edit
        return conv
    if op == "Gemm":
        if attr(node, "transA", 0) or not view.is_const(node.input[1]):
            return None
        if len(node.input) > 2 and node.input[2] and not view.is_const(node.input[2]):
            return None
        trans_b = attr(node, "transB", 0)

        def gemm(scale, shift):
            def edit():
                w = view.array(node.input[1]).astype(np.float64)
                w = w * (scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1))
                beta = float(attr(node, "beta", 1.0))
                c = (view.array(node.input[2]).astype(np.float64) * beta
                     if len(node.input) > 2 and node.input[2] else np.zeros(len(scale)))
                c = np.broadcast_to(c, np.broadcast_shapes(c.shape, (len(scale),)))
                new_c = c * scale + shift
                if new_c.ndim == 2 and new_c.shape[0] == 1:
                    new_c = new_c[0]
                set_input_array(view, node, 1, w.astype(np.float32))
                set_input_array(view, node, 2, new_c.astype(np.float32))
                for a in list(node.attribute):
                    if a.name == "beta":
                        node.attribute.remove(a)
            return edit
        return gemm
    if op == "Add" and len(node.input) == 2:
        # MatMul(x, B) + c: the Add carries the bias
        for k in (0, 1):
            mm, c = view.producer.get(node.input[k]), node.input[1 - k]
            if (mm is not None and mm.op_type == "MatMul" and view.is_const(c) and view.is_const(mm.input[1])
                    and view.only_consumer(mm.output[0]) is node and _rank(shapes, mm.output[0]) == 2
                    and len(view.inits[mm.input[1]].dims) == 2):
                n_out = view.inits[mm.input[1]].dims[1]
                if channel_vector(view, c, n_out, 2) is None:
                    return None

                def matmul_add(scale, shift, mm=mm, k=k):
                    def edit():
                        b = view.array(mm.input[1]).astype(np.float64) * scale.reshape(1, -1)
                        set_input_array(view, mm, 1, b.astype(np.float32))
                        bias = channel_vector(view, node.input[1 - k], len(scale), 2).astype(np.float64)
                        set_input_array(view, node, 1 - k, (bias * scale + shift).astype(np.float32))
                    return edit
                return matmul_add
    return None


def absorb_scale_forward(view: GraphView, tensor: str, scale: np.ndarray, shapes, depth: int = 0):
    """Edits making every reader of ``tensor`` give the same results when ``tensor`` is
    divided by ``scale`` per channel (``scale`` non-zero), or None. The scale travels through
    ops with f(s x) = s f(x) (ReLU, max pooling only for s > 0; average pooling, depthwise
    conv, per-channel Mul / Add, reshapes keeping [N, C]) to Conv / ConvTranspose / Gemm /
    MatMul readers, whose input-channel weights take it."""
    if tensor in view.graph_outputs or depth > 64 or not np.all(scale != 0):
        return None
    positive = bool(np.all(scale > 0))
    edits = []
    rank, c = _rank(shapes, tensor), _channels(shapes, tensor)
    for node in view.consumers.get(tensor, []):
        ab = absorb_reader(view, node, tensor, shapes)
        e = ab(None, scale) if ab is not None else None
        if e is not None:
            edits += e
            continue
        op = node.op_type
        outs = [o for o in node.output if o]
        if len(outs) != 1 or node.input[0] != tensor and op not in ARITH:
            return None
        if op == "Identity" or op in POSITIVE_HOMOGENEOUS and positive or op in LINEAR_POOLS:
            pass
        elif op in RESHAPES and _keeps_nc(shapes, node):
            pass
        elif op in ("ReduceMean", "ReduceSum") and rank and (lambda ax: ax is not None and 0 not in ax
                                                            and 1 not in ax)(_reduce_axes(view, node, rank)):
            pass
        elif op == "Conv" and is_depthwise(view, node, shapes):
            if len(node.input) > 2 and node.input[2]:
                edits.append(_divide_const(view, node, 2, scale, None))
        elif op in ("Mul", "Add") and c is not None:
            k = _const_operand(view, node, tensor)
            if k is None or channel_vector(view, node.input[k], c, rank) is None:
                return None
            if op == "Add":
                edits.append(_divide_const(view, node, k, scale, rank))
        else:
            return None
        rest = absorb_scale_forward(view, node.output[0], scale, shapes, depth + 1)
        if rest is None:
            return None
        edits += rest
    return edits


def _divide_const(view, node, k, scale, rank):
    def edit():
        arr = view.array(node.input[k]).astype(np.float64)
        if rank is None:
            set_input_array(view, node, k, (arr / scale).astype(np.float32))
            return
        vec = channel_vector(view, node.input[k], len(scale), rank).astype(np.float64)
        set_input_array(view, node, k, (vec / scale).reshape((len(scale),) + (1,) * (rank - 2)).astype(np.float32))
    return edit
