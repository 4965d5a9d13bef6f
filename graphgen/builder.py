"""GraphBuilder: a small layer over the `onnx` package that recipes call.

A recipe reads like a torchvision module: it opens name scopes that mirror the
module nesting (``with b.scope("features", 3): b.conv(x, 16, 1, name="squeeze")``)
so that initializer names fall out equal to torchvision's state_dict keys
(``features.3.squeeze.weight``).

Design points:
* Every op returns a :class:`Tensor` carrying its static shape, computed here
  with the same formulas PyTorch uses, so recipes can ask ``x.channels``.
* Initial values are seeded per tensor from its *name* (sha256 of seed+name),
  never from call order: adding a layer leaves every other weight unchanged.
* Weights given to the builder (a checkpoint) replace the seeded ones; missing,
  unexpected and mis-shaped tensors are collected and reported together.
* The model uses one opset (:data:`OPSET`) and passes ``onnx.checker`` with
  ``full_check=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphgen.errors import WeightsError

#: The single opset of the whole project. 17 rather than 18+: TVM 0.27's
#: importer mishandles Resize with `axes` (opset 18) and ReduceMean-as-input.
OPSET = 17
PRODUCER = "graphgen"

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.bool_): TensorProto.BOOL,
}


@dataclass(frozen=True)
class Tensor:
    """A value in the graph under construction: its name and static shape."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.shape[2:]


def _pair(v, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"expected {n} values, got {v!r}")
        return tuple(int(i) for i in v)
    return (int(v),) * n


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def conv_out_size(size: int, k: int, s: int, p_begin: int, p_end: int, d: int, ceil_mode: bool = False) -> int:
    eff = d * (k - 1) + 1
    num = size + p_begin + p_end - eff
    if ceil_mode:
        out = -(-num // s) + 1
        # PyTorch/ONNX rule: the last window must start inside the input or left padding.
        if (out - 1) * s >= size + p_begin:
            out -= 1
        return out
    return num // s + 1


class GraphBuilder:
    """Collects nodes and initializers and emits an ``onnx.ModelProto``."""

    def __init__(self, name: str, seed: int = 0, weights: dict[str, np.ndarray] | None = None,
                 shape_only: bool = False):
        self.name = name
        self.seed = seed
        #: emit parameters as shape-only tensors (no data): for counting and shape analysis of
        #: big models without generating or serializing hundreds of MB of weights
        self.shape_only = shape_only
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        #: names of trainable parameters (torchvision's `parameters()`), in creation order
        self.parameter_names: list[str] = []
        #: names of buffers (BN running stats, num_batches_tracked), in creation order
        self.buffer_names: list[str] = []
        #: buffers that exist in the state_dict but not in the graph (num_batches_tracked)
        self.extra_state: dict[str, np.ndarray] = {}
        self._scope: list[str] = []
        self._used_names: set[str] = set()
        self._counters: dict[str, int] = {}
        self._weights = dict(weights) if weights is not None else None
        self._weights_used: set[str] = set()
        self._weight_shape_errors: list[str] = []

    # ------------------------------------------------------------------ naming
    @contextlib.contextmanager
    def scope(self, *parts):
        """Enter a module scope; parts are joined with '.' (ints allowed)."""
        added = [str(p) for p in parts if p is not None and str(p) != ""]
        self._scope.extend(added)
        try:
            yield self
        finally:
            del self._scope[len(self._scope) - len(added):]

    def qualify(self, name: str) -> str:
        return ".".join(self._scope + [name]) if name else ".".join(self._scope)

    def _unique(self, base: str) -> str:
        if base not in self._used_names:
            self._used_names.add(base)
            return base
        i = self._counters.get(base, 1)
        while f"{base}_{i}" in self._used_names:
            i += 1
        self._counters[base] = i + 1
        name = f"{base}_{i}"
        self._used_names.add(name)
        return name

    def _node_name(self, op: str, name: str | None) -> str:
        return self._unique(self.qualify(name) if name else self.qualify(op))

    # ----------------------------------------------------------- initializers
    def _initial_value(self, full: str, shape: tuple[int, ...], init, fan_in: int | None, std: float | None) -> np.ndarray:
        if isinstance(init, np.ndarray):
            return init.astype(np.float32, copy=False).reshape(shape)
        rng = np.random.default_rng(_seed_for(self.seed, full))
        if init == "kaiming":
            fan = fan_in if fan_in else int(np.prod(shape[1:])) or 1
            # float32 draws: half the time of float64 for 100M-parameter classifiers
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan))
        if init == "normal":
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(std if std is not None else 0.01)
        if init == "bias":  # small non-zero biases so folding passes are really tested
            return (rng.uniform(-0.1, 0.1, shape)).astype(np.float32)
        if init == "bn_weight":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if init == "bn_weight_residual":
            # small but non-zero (torchvision's zero_init_residual idea): with random weights and
            # uncalibrated running stats, full-scale residual branches double the activations per
            # block and deep nets reach float32's rounding limits; non-zero keeps folding tested
            return rng.uniform(0.05, 0.25, shape).astype(np.float32)
        if init == "bn_bias":
            return rng.uniform(-0.2, 0.2, shape).astype(np.float32)
        if init == "bn_mean":
            return rng.uniform(-0.2, 0.2, shape).astype(np.float32)
        if init == "bn_var":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if init == "zeros":
            return np.zeros(shape, np.float32)
        if init == "ones":
            return np.ones(shape, np.float32)
        raise ValueError(f"unknown init {init!r}")

    def param(self, name: str, shape: Sequence[int], init="kaiming", *, fan_in: int | None = None,
              std: float | None = None, buffer: bool = False) -> str:
        """Create a state_dict tensor ``<scope>.<name>`` and return its full name.

        A checkpoint given to the builder supplies the value when it has the key.
        """
        full = self.qualify(name)
        if full in self.initializers:
            raise ValueError(f"duplicate parameter name {full!r}")
        shape = tuple(int(s) for s in shape)
        value = None
        if self._weights is not None and full in self._weights:
            self._weights_used.add(full)
            given = np.asarray(self._weights[full])
            if tuple(given.shape) != shape:
                self._weight_shape_errors.append(f"{full}: expected {list(shape)}, got {list(given.shape)}")
            else:
                value = given.astype(np.float32, copy=False)
        if value is None:
            # np.zeros is lazily allocated: shape-only builds never touch the memory
            value = np.zeros(shape, np.float32) if self.shape_only else self._initial_value(full, shape, init, fan_in, std)
        self.initializers[full] = value
        self._used_names.add(full)
        (self.buffer_names if buffer else self.parameter_names).append(full)
        return full

    def const(self, value, name: str = "const", dtype=None) -> str:
        """A non-parameter constant initializer (shapes, scales, clip bounds)."""
        arr = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        full = self._unique(f"{self.qualify(name)}:const")
        self.initializers[full] = arr
        return full

    # ------------------------------------------------------------------ graph
    def input(self, name: str, shape: Sequence[int], dtype=np.float32) -> Tensor:
        t = Tensor(self._unique(name), tuple(int(s) for s in shape), np.dtype(dtype))
        self.inputs.append(t)
        return t

    def output(self, x: Tensor, name: str) -> Tensor:
        """Mark ``x`` as a graph output named ``name`` (via Identity, removed by the optimizer)."""
        out = self._emit("Identity", [x.name], name, x.shape, raw_name=True, dtype=x.dtype)
        self.outputs.append(out)
        return out

    def _emit(self, op: str, inputs: Sequence[str], name: str | None, shape: tuple[int, ...],
              raw_name: bool = False, dtype=np.float32, n_outputs: int = 1, shapes=None, **attrs):
        node_name = self._unique(name) if raw_name else self._node_name(op, name)
        for sh in ([shape] if n_outputs == 1 else shapes):
            if any(d < 1 for d in sh):
                raise ValueError(f"{node_name} ({op}) would output shape {tuple(sh)}: the input is too small")
        if n_outputs == 1:
            outs = [node_name]
        else:
            outs = [self._unique(f"{node_name}:{i}") for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=node_name, **attrs))
        if n_outputs == 1:
            return Tensor(outs[0], tuple(shape), np.dtype(dtype))
        return [Tensor(o, tuple(s), np.dtype(dtype)) for o, s in zip(outs, shapes)]

    # --------------------------------------------------------------- layers
    def conv(self, x: Tensor, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
             bias: bool = True, name: str = "conv", weight_init="kaiming", weight_std: float | None = None) -> Tensor:
        """nn.Conv2d: parameters ``<name>.weight`` [O, I/g, kh, kw] and ``<name>.bias``.

        ``padding`` is an int, (ph, pw), or (top, left, bottom, right); "same" is accepted for stride 1.
        """
        k = _pair(kernel_size)
        s = _pair(stride)
        d = _pair(dilation)
        pads = self._conv_pads(padding, k, d)
        cin = x.channels
        if cin % groups or out_channels % groups:
            raise ValueError(f"{self.qualify(name)}: channels {cin}->{out_channels} not divisible by groups {groups}")
        with self.scope(name):
            w = self.param("weight", (out_channels, cin // groups, *k), weight_init, std=weight_std)
            b = self.param("bias", (out_channels,), "bias") if bias else None
        oh = conv_out_size(x.shape[2], k[0], s[0], pads[0], pads[2], d[0])
        ow = conv_out_size(x.shape[3], k[1], s[1], pads[1], pads[3], d[1])
        ins = [x.name, w] + ([b] if b else [])
        return self._emit("Conv", ins, name, (x.shape[0], out_channels, oh, ow), kernel_shape=list(k),
                          strides=list(s), pads=list(pads), dilations=list(d), group=groups)

    @staticmethod
    def _conv_pads(padding, k, d) -> tuple[int, int, int, int]:
        if padding == "same":
            tot = [di * (ki - 1) for ki, di in zip(k, d)]
            return (tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2)
        if isinstance(padding, (list, tuple)) and len(padding) == 4:
            return tuple(int(p) for p in padding)
        ph, pw = _pair(padding)
        return (ph, pw, ph, pw)

    def conv_transpose(self, x: Tensor, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                       groups: int = 1, bias: bool = True, dilation=1, name: str = "conv") -> Tensor:
        """nn.ConvTranspose2d: weight [I, O/g, kh, kw]; explicit pads (never output_shape)."""
        k, s, d = _pair(kernel_size), _pair(stride), _pair(dilation)
        p, op = _pair(padding), _pair(output_padding)
        cin = x.channels
        with self.scope(name):
            w = self.param("weight", (cin, out_channels // groups, *k), "kaiming",
                           fan_in=(out_channels // groups) * k[0] * k[1])
            b = self.param("bias", (out_channels,), "bias") if bias else None
        out_hw = [(x.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + op[i] + 1 for i in range(2)]
        ins = [x.name, w] + ([b] if b else [])
        attrs = dict(kernel_shape=list(k), strides=list(s), pads=[p[0], p[1], p[0], p[1]], dilations=list(d),
                     group=groups)
        if any(op):
            attrs["output_padding"] = list(op)
        return self._emit("ConvTranspose", ins, name, (x.shape[0], out_channels, *out_hw), **attrs)

    def batch_norm(self, x: Tensor, name: str = "bn", eps: float = 1e-5, momentum: float = 0.1,
                   residual_end: bool = False) -> Tensor:
        """nn.BatchNorm2d / 1d in eval mode: weight, bias, running_mean, running_var (+ num_batches_tracked).

        ``residual_end``: the last BN of a residual branch; its seeded scale starts small.
        """
        c = x.channels
        with self.scope(name):
            w = self.param("weight", (c,), "bn_weight_residual" if residual_end else "bn_weight")
            b = self.param("bias", (c,), "bn_bias")
            m = self.param("running_mean", (c,), "bn_mean", buffer=True)
            v = self.param("running_var", (c,), "bn_var", buffer=True)
            nbt = self.qualify("num_batches_tracked")
        self.extra_state[nbt] = np.zeros((), np.int64)
        if self._weights is not None and nbt in self._weights:
            self._weights_used.add(nbt)
        return self._emit("BatchNormalization", [x.name, w, b, m, v], name, x.shape, epsilon=float(eps),
                          momentum=float(1.0 - momentum))

    def linear(self, x: Tensor, out_features: int, bias: bool = True, name: str = "fc",
               weight_init="kaiming", weight_std: float | None = None) -> Tensor:
        """nn.Linear as Gemm(transB=1): weight [out, in] like torch."""
        if len(x.shape) != 2:
            raise ValueError(f"{self.qualify(name)}: linear expects a 2-D input, got shape {x.shape}")
        with self.scope(name):
            w = self.param("weight", (out_features, x.shape[1]), weight_init, std=weight_std)
            b = self.param("bias", (out_features,), "bias") if bias else None
        ins = [x.name, w] + ([b] if b else [])
        return self._emit("Gemm", ins, name, (x.shape[0], out_features), transB=1)

    # ----------------------------------------------------------- activations
    def relu(self, x: Tensor, name: str | None = None) -> Tensor:
        return self._emit("Relu", [x.name], name, x.shape)

    def relu6(self, x: Tensor, name: str | None = None) -> Tensor:
        lo, hi = self.const(np.float32(0.0), "relu6_min"), self.const(np.float32(6.0), "relu6_max")
        return self._emit("Clip", [x.name, lo, hi], name, x.shape)

    def hardswish(self, x: Tensor, name: str | None = None) -> Tensor:
        return self._emit("HardSwish", [x.name], name, x.shape)

    def hardsigmoid(self, x: Tensor, name: str | None = None) -> Tensor:
        # torch.nn.Hardsigmoid is relu6(x + 3) / 6: alpha 1/6, beta 0.5 (ONNX default alpha is 0.2)
        return self._emit("HardSigmoid", [x.name], name, x.shape, alpha=1.0 / 6.0, beta=0.5)

    def sigmoid(self, x: Tensor, name: str | None = None) -> Tensor:
        return self._emit("Sigmoid", [x.name], name, x.shape)

    def tanh(self, x: Tensor, name: str | None = None) -> Tensor:
        return self._emit("Tanh", [x.name], name, x.shape)

    def swish(self, x: Tensor, name: str | None = None) -> Tensor:
        """SiLU: x * sigmoid(x)."""
        s = self.sigmoid(x, (name + "_sigmoid") if name else None)
        return self.mul(x, s, name)

    silu = swish

    def leaky_relu(self, x: Tensor, alpha: float = 0.01, name: str | None = None) -> Tensor:
        return self._emit("LeakyRelu", [x.name], name, x.shape, alpha=float(alpha))

    def softmax(self, x: Tensor, axis: int = -1, name: str | None = None) -> Tensor:
        return self._emit("Softmax", [x.name], name, x.shape, axis=axis)

    # --------------------------------------------------------------- pooling
    def max_pool(self, x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 dilation=1, name: str | None = None) -> Tensor:
        return self._pool("MaxPool", x, kernel_size, stride, padding, ceil_mode, name, dilation=dilation)

    def avg_pool(self, x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, name: str | None = None) -> Tensor:
        return self._pool("AveragePool", x, kernel_size, stride, padding, ceil_mode, name,
                          count_include_pad=count_include_pad)

    def _pool(self, op, x, kernel_size, stride, padding, ceil_mode, name, dilation=1, count_include_pad=None):
        k = _pair(kernel_size)
        s = _pair(stride) if stride is not None else k
        d = _pair(dilation)
        p = self._conv_pads(padding, k, d)
        oh = conv_out_size(x.shape[2], k[0], s[0], p[0], p[2], d[0], ceil_mode)
        ow = conv_out_size(x.shape[3], k[1], s[1], p[1], p[3], d[1], ceil_mode)
        attrs = dict(kernel_shape=list(k), strides=list(s), pads=list(p), ceil_mode=int(bool(ceil_mode)))
        if op == "MaxPool" and any(v != 1 for v in d):
            attrs["dilations"] = list(d)
        if count_include_pad is not None:
            attrs["count_include_pad"] = int(bool(count_include_pad))
        return self._emit(op, [x.name], name, (x.shape[0], x.shape[1], oh, ow), **attrs)

    def global_avg_pool(self, x: Tensor, name: str | None = None) -> Tensor:
        return self._emit("GlobalAveragePool", [x.name], name, (x.shape[0], x.shape[1], 1, 1))

    def global_max_pool(self, x: Tensor, name: str | None = None) -> Tensor:
        return self._emit("GlobalMaxPool", [x.name], name, (x.shape[0], x.shape[1], 1, 1))

    def adaptive_avg_pool(self, x: Tensor, output_size, name: str | None = None) -> Tensor:
        """nn.AdaptiveAvgPool2d. Emitted as GlobalAveragePool, Identity, or an exact AveragePool
        when the input divides evenly; otherwise as per-bin slices (PyTorch's start/end rule)."""
        oh, ow = _pair(output_size)
        h, w = x.shape[2], x.shape[3]
        if (oh, ow) == (1, 1):
            return self.global_avg_pool(x, name)
        if (oh, ow) == (h, w):
            return x
        if h % oh == 0 and w % ow == 0:
            return self.avg_pool(x, (h // oh, w // ow), (h // oh, w // ow), name=name)
        return self._adaptive_by_bins(x, oh, ow, "ReduceMean", name)

    def adaptive_max_pool(self, x: Tensor, output_size, name: str | None = None) -> Tensor:
        oh, ow = _pair(output_size)
        h, w = x.shape[2], x.shape[3]
        if (oh, ow) == (1, 1):
            return self.global_max_pool(x, name)
        if h % oh == 0 and w % ow == 0:
            return self.max_pool(x, (h // oh, w // ow), (h // oh, w // ow), name=name)
        return self._adaptive_by_bins(x, oh, ow, "ReduceMax", name)

    def _adaptive_by_bins(self, x: Tensor, oh: int, ow: int, reduce_op: str, name: str | None) -> Tensor:
        h, w = x.shape[2], x.shape[3]
        base = name or f"adaptive_{reduce_op}"
        rows = []
        for i in range(oh):
            h0, h1 = (i * h) // oh, -(-((i + 1) * h) // oh)
            cols = []
            for j in range(ow):
                w0, w1 = (j * w) // ow, -(-((j + 1) * w) // ow)
                sl = self.slice(x, [h0, w0], [h1, w1], [2, 3], name=f"{base}_slice")
                r = self._emit(reduce_op, [sl.name], f"{base}_reduce", (x.shape[0], x.shape[1], 1, 1),
                               axes=[2, 3], keepdims=1)
                cols.append(r)
            rows.append(self.concat(cols, axis=3, name=f"{base}_row") if len(cols) > 1 else cols[0])
        return self.concat(rows, axis=2, name=base) if len(rows) > 1 else rows[0]

    # ------------------------------------------------------------ structure
    def concat(self, xs: Sequence[Tensor], axis: int = 1, name: str | None = None) -> Tensor:
        xs = list(xs)
        rank = len(xs[0].shape)
        ax = axis % rank
        shape = list(xs[0].shape)
        shape[ax] = sum(t.shape[ax] for t in xs)
        return self._emit("Concat", [t.name for t in xs], name, tuple(shape), axis=axis)

    def split(self, x: Tensor, sizes: Sequence[int], axis: int = 1, name: str | None = None) -> list[Tensor]:
        rank = len(x.shape)
        ax = axis % rank
        if sum(sizes) != x.shape[ax]:
            raise ValueError(f"split sizes {list(sizes)} do not add up to {x.shape[ax]}")
        split = self.const(np.asarray(sizes, np.int64), "split")
        shapes = []
        for s in sizes:
            sh = list(x.shape)
            sh[ax] = s
            shapes.append(tuple(sh))
        return self._emit("Split", [x.name, split], name, None, n_outputs=len(sizes), shapes=shapes, axis=axis)

    def slice(self, x: Tensor, starts, ends, axes, steps=None, name: str | None = None) -> Tensor:
        steps = steps or [1] * len(axes)
        shape = list(x.shape)
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            shape[ax] = len(range(*slice(st, en, sp).indices(x.shape[ax])))
        ins = [x.name, self.const(np.asarray(starts, np.int64), "starts"), self.const(np.asarray(ends, np.int64), "ends"),
               self.const(np.asarray(axes, np.int64), "axes"), self.const(np.asarray(steps, np.int64), "steps")]
        return self._emit("Slice", ins, name, tuple(shape))

    def reshape(self, x: Tensor, shape: Sequence[int], name: str | None = None) -> Tensor:
        shape = [int(s) for s in shape]
        out = list(shape)
        total = int(np.prod(x.shape))
        for i, s in enumerate(out):
            if s == 0:
                out[i] = x.shape[i]
        if -1 in out:
            known = int(np.prod([s for s in out if s != -1]))
            out[out.index(-1)] = total // known
        if int(np.prod(out)) != total:
            raise ValueError(f"cannot reshape {x.shape} to {shape}")
        return self._emit("Reshape", [x.name, self.const(np.asarray(shape, np.int64), "shape")], name, tuple(out))

    def transpose(self, x: Tensor, perm: Sequence[int], name: str | None = None) -> Tensor:
        return self._emit("Transpose", [x.name], name, tuple(x.shape[p] for p in perm), perm=list(perm))

    def flatten(self, x: Tensor, axis: int = 1, name: str | None = None) -> Tensor:
        lead = int(np.prod(x.shape[:axis]))
        return self._emit("Flatten", [x.name], name, (lead, int(np.prod(x.shape[axis:]))), axis=axis)

    def channel_shuffle(self, x: Tensor, groups: int, name: str | None = None) -> Tensor:
        """ShuffleNet's shuffle exactly as exporters emit it: Reshape -> Transpose -> Reshape."""
        n, c, h, w = x.shape
        base = name or "channel_shuffle"
        y = self.reshape(x, [n, groups, c // groups, h, w], name=f"{base}_reshape")
        y = self.transpose(y, [0, 2, 1, 3, 4], name=f"{base}_transpose")
        return self.reshape(y, [n, c, h, w], name=f"{base}_flatten")

    # ------------------------------------------------------------- arithmetic
    def _broadcast(self, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(np.broadcast_shapes(a, b))

    def _binary(self, op: str, a, b, name):
        an = a.name if isinstance(a, Tensor) else self.const(np.asarray(a, np.float32), op.lower())
        bn = b.name if isinstance(b, Tensor) else self.const(np.asarray(b, np.float32), op.lower())
        ash = a.shape if isinstance(a, Tensor) else np.shape(a)
        bsh = b.shape if isinstance(b, Tensor) else np.shape(b)
        return self._emit(op, [an, bn], name, self._broadcast(tuple(ash), tuple(bsh)))

    def add(self, a, b, name: str | None = None) -> Tensor:
        return self._binary("Add", a, b, name)

    def sub(self, a, b, name: str | None = None) -> Tensor:
        return self._binary("Sub", a, b, name)

    def mul(self, a, b, name: str | None = None) -> Tensor:
        return self._binary("Mul", a, b, name)

    def div(self, a, b, name: str | None = None) -> Tensor:
        return self._binary("Div", a, b, name)

    def matmul(self, a: Tensor, b: Tensor, name: str | None = None) -> Tensor:
        shape = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2])) + (a.shape[-2], b.shape[-1])
        return self._emit("MatMul", [a.name, b.name], name, shape)

    def reduce_mean(self, x: Tensor, axes: Sequence[int], keepdims: bool = True, name: str | None = None) -> Tensor:
        axes = [a % len(x.shape) for a in axes]
        shape = tuple((1 if i in axes else s) for i, s in enumerate(x.shape) if keepdims or i not in axes)
        return self._emit("ReduceMean", [x.name], name, shape, axes=list(axes), keepdims=int(keepdims))

    # --------------------------------------------------------------- resize
    def resize(self, x: Tensor, scale=None, size=None, mode: str = "nearest", align_corners: bool = False,
               name: str | None = None) -> Tensor:
        """nn.Upsample / F.interpolate on NCHW as Resize-13 with constant scales or sizes.

        Only forms TVM 0.27 imports correctly: nearest (asymmetric, floor) and linear
        (half_pixel, or align_corners). Never Upsample-9 nor Resize with `axes`.
        """
        n, c, h, w = x.shape
        if size is not None:
            oh, ow = _pair(size)
            scales_in, sizes_in = "", self.const(np.asarray([n, c, oh, ow], np.int64), "sizes")
        elif scale is not None:
            sh, sw = (float(v) for v in (scale if isinstance(scale, (list, tuple)) else (scale, scale)))
            oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
            scales_in, sizes_in = self.const(np.asarray([1, 1, sh, sw], np.float32), "scales"), ""
        else:
            raise ValueError("resize needs scale or size")
        if mode == "nearest":
            attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        elif mode in ("linear", "bilinear"):
            attrs = dict(mode="linear",
                         coordinate_transformation_mode="align_corners" if align_corners else "half_pixel")
        else:
            raise ValueError(f"resize mode {mode!r}: nearest or bilinear")
        ins = [x.name, "", scales_in] + ([sizes_in] if sizes_in else [])
        return self._emit("Resize", ins, name, (n, c, oh, ow), **attrs)

    def dropout(self, x: Tensor, p: float = 0.5, name: str | None = None) -> Tensor:
        """Inference-mode Dropout (identity); kept in the export, removed by the optimizer."""
        ratio = self.const(np.float32(p), "dropout_ratio")
        return self._emit("Dropout", [x.name, ratio], name, x.shape)

    def identity(self, x: Tensor, name: str | None = None) -> Tensor:
        return self._emit("Identity", [x.name], name, x.shape)

    # ---------------------------------------------------------------- output
    @property
    def state_dict_names(self) -> list[str]:
        """Every torchvision-style state_dict key this graph defines, in creation order."""
        names = []
        for n in self.parameter_names + self.buffer_names:
            names.append(n)
        names.extend(self.extra_state)
        return names

    def state_dict(self) -> dict[str, np.ndarray]:
        sd = {n: self.initializers[n] for n in self.parameter_names + self.buffer_names}
        sd.update(self.extra_state)
        return sd

    def parameter_count(self) -> int:
        return int(sum(self.initializers[n].size for n in self.parameter_names))

    def check_weights(self) -> None:
        """Raise WeightsError listing missing, unexpected and mis-shaped tensors of a given checkpoint."""
        if self._weights is None:
            return
        expected = set(self.parameter_names + self.buffer_names)
        missing = sorted(expected - self._weights_used)
        unexpected = sorted(set(self._weights) - self._weights_used)
        problems = []
        if missing:
            problems.append(f"missing {len(missing)}: {_short_list(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)}: {_short_list(unexpected)}")
        if self._weight_shape_errors:
            problems.append(f"mis-shaped {len(self._weight_shape_errors)}: {_short_list(self._weight_shape_errors)}")
        if problems:
            raise WeightsError("weights do not match the recipe: " + "; ".join(problems))

    def build(self, check: bool = True, doc: str = "") -> onnx.ModelProto:
        if not self.outputs:
            raise ValueError("the graph has no outputs: call output()")
        self.check_weights()
        state = set(self.parameter_names + self.buffer_names) if self.shape_only else set()
        inits = [_shape_only_tensor(k, v.shape) if k in state else numpy_helper.from_array(np.asarray(v), k)
                 for k, v in self.initializers.items()]
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(t.name, _NP_TO_ONNX[t.dtype], list(t.shape)) for t in self.inputs],
            [helper.make_tensor_value_info(t.name, _NP_TO_ONNX[t.dtype], list(t.shape)) for t in self.outputs],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name=PRODUCER, doc_string=doc)
        model.ir_version = 8  # opset 17 pairs with IR 8; keeps older runtimes able to load it
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        if check and not self.shape_only:
            onnx.checker.check_model(model, full_check=True)
        return model


def _shape_only_tensor(name: str, shape) -> onnx.TensorProto:
    """A float tensor with dims and no data: only for shape-only builds (never run or saved)."""
    t = onnx.TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(int(d) for d in shape)
    return t


def _short_list(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
