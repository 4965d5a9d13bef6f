"""graphgen's graph optimizer: passes run in a declared order to a fixed point.

Each pass lives in its own module with ``NAME`` and ``run(model) -> int`` (how many
rewrites it made, mutating the model in place). ``optimize`` runs them in
:data:`PASS_ORDER` until none changes anything, checking each pass that changed the
graph against the graph before it on onnxruntime when ``verify`` is on.
"""

from __future__ import annotations

import copy
import importlib
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphgen.errors import PassEquivalenceError, UnknownNameError
from graphgen.optimize.graph import op_counts
from graphgen.verify import DEFAULT_TOLERANCE, compare, random_inputs, rel_l2

#: The order the passes run in (see docs/optimizer.md): clean-up and shape fixes first, then
#: BatchNorm and affine folding, then the channel passes, onnxsim's constant folding last.
PASS_ORDER = [
    "remove_identity",
    "convtranspose_pads",
    "fold_pad",
    "collapse_reshape",
    "channel_shuffle",
    "fold_batchnorm",
    "fold_conv_affine",
    "batchnorm_to_mul_add",
    "fold_affine_forward",
    "channel_routing",
    "sink_channel_gather",
    "simplify",
]

MAX_ROUNDS = 8


def load_pass(name: str):
    return importlib.import_module(f"graphgen.optimize.{name}")


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    before: dict[str, int]
    after: dict[str, int]
    passes: list[dict] = field(default_factory=list)

    def report(self) -> dict:
        return {"nodes_before": sum(self.before.values()), "nodes_after": sum(self.after.values()),
                "op_types_before": self.before, "op_types_after": self.after, "passes": self.passes}

    def format(self) -> str:
        ops = sorted(set(self.before) | set(self.after))
        width = max([len(o) for o in ops] + [7])
        lines = [f"{'op type':<{width}}  {'before':>7}  {'after':>7}"]
        for o in ops:
            b, a = self.before.get(o, 0), self.after.get(o, 0)
            lines.append(f"{o:<{width}}  {b:>7}  {a:>7}" + ("" if a == b else f"  ({a - b:+d})"))
        lines.append(f"{'total':<{width}}  {sum(self.before.values()):>7}  {sum(self.after.values()):>7}")
        applied = [f"{p['pass']} x{p['rewrites']}" for p in self.passes if p["rewrites"]]
        lines.append("passes: " + (", ".join(applied) if applied else "none changed the graph"))
        return "\n".join(lines)


def optimize(model: onnx.ModelProto, passes: list[str] | None = None, verify: bool = False,
             tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> OptimizeResult:
    """Optimize a copy of ``model`` with ``passes`` (default: all, always in PASS_ORDER).

    With ``verify``, every pass that changed the graph is run on onnxruntime against the graph
    before it (seeded random inputs, relative L2 within ``tolerance``), and the result against
    the original; a mismatch raises PassEquivalenceError naming the pass. A model whose own
    fp32 outputs move by more than ``tolerance`` when its weights are rounded differently
    (a deep network with untrained weights) is compared against that measured noise floor
    instead (see :func:`noise_floor`); the pass log says so.
    """
    unknown = [n for n in (passes or []) if n not in PASS_ORDER]
    if unknown:
        raise UnknownNameError(f"unknown optimizer pass {', '.join(map(repr, unknown))}; "
                               f"passes: {', '.join(PASS_ORDER)}")
    # a selection runs in the declared order too
    names = [n for n in PASS_ORDER if passes is None or n in passes]
    current = copy.deepcopy(model)
    before = op_counts(current)
    log: dict[str, dict] = {n: {"pass": n, "rewrites": 0, "seconds": 0.0} for n in names}
    checker = _Checker(model, tolerance, seed) if verify else None
    for _ in range(MAX_ROUNDS):
        changed_round = 0
        for name in names:
            mod = load_pass(name)
            t0 = time.perf_counter()
            n = mod.run(current)
            log[name]["seconds"] += time.perf_counter() - t0
            if n:
                log[name]["rewrites"] += n
                changed_round += n
                if checker is not None:
                    checker.check_pass(current, name, log[name])
        if not changed_round:
            break
    if checker is not None:
        checker.check_final(current, [n for n in names if log[n]["rewrites"]])
    onnx.checker.check_model(current, full_check=True)
    for v in log.values():
        v["seconds"] = round(v["seconds"], 4)
    return OptimizeResult(current, before, op_counts(current), list(log.values()))


#: a pass is accepted within this many times the model's fp32 noise floor
NOISE_FACTOR = 10.0
#: above this noise floor a model's outputs say nothing about equivalence in fp32
MAX_NOISE_FLOOR = 1e-2


class _Checker:
    """Runs each pass's graph on onnxruntime against the graph before it."""

    def __init__(self, original: onnx.ModelProto, tolerance: float, seed: int):
        self.original = original
        self.tolerance = tolerance
        self.inputs = _inputs(original, seed)
        self.names = [o.name for o in original.graph.output]
        self.first = run_model(original, self.inputs)
        self.reference = self.first  # outputs of the graph before the next pass
        self.seed = seed
        self._noise = None

    def noise(self) -> float:
        if self._noise is None:
            self._noise = noise_floor(self.original, self.inputs, self.first, self.seed)
        return self._noise

    def _accept(self, cmp, what: str, entry: dict | None) -> None:
        if cmp.ok:
            return
        worst = max(cmp.rel_l2) if cmp.rel_l2 else float("inf")
        if not cmp.detail and worst != float("inf"):
            nf = self.noise()
            if self.tolerance < NOISE_FACTOR * nf <= NOISE_FACTOR * MAX_NOISE_FLOOR and worst <= NOISE_FACTOR * nf:
                if entry is not None:
                    entry["verified"] = (f"within {NOISE_FACTOR:g}x the model's fp32 noise floor {nf:.2g} "
                                         f"(relative L2 {worst:.2g})")
                return
            if nf > MAX_NOISE_FLOOR:
                raise PassEquivalenceError(
                    f"{what} cannot be verified in fp32: this model's outputs move by {nf:.2g} (relative L2) when "
                    f"its weights are rounded by one ulp (untrained weights?); the pass gave {worst:.2g}. "
                    f"Optimize without verification (--no-verify) or with trained weights")
        raise PassEquivalenceError(f"{what} changed the model's outputs: {cmp.summary()}"
                                   + (f" ({cmp.detail})" if cmp.detail else ""))

    def check_pass(self, model: onnx.ModelProto, name: str, entry: dict) -> None:
        got = _run_named(model, self.inputs, f"optimizer pass {name!r}")
        self._accept(compare(got, self.reference, self.names, self.tolerance), f"optimizer pass {name!r}", entry)
        self.reference = got

    def check_final(self, model: onnx.ModelProto, applied: list[str]) -> None:
        got = _run_named(model, self.inputs, "the optimizer")
        self._accept(compare(got, self.first, self.names, self.tolerance),
                     f"the optimizer (passes: {', '.join(applied) or 'none'})", None)


def _inputs(model: onnx.ModelProto, seed: int) -> dict:
    """verify.random_inputs; a symbolic dimension (a dynamic batch) is taken as 1."""
    try:
        return random_inputs(model, seed)
    except ValueError:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        for v in fixed.graph.input:
            for d in v.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.dim_value = 1
        return random_inputs(fixed, seed)


def _run_named(model, inputs, what: str):
    try:
        return run_model(model, inputs)
    except Exception as e:  # the pass produced a graph onnxruntime rejects
        msg = str(e).strip().splitlines()
        raise PassEquivalenceError(f"{what} produced a model onnxruntime cannot run: "
                                   f"{msg[0][:300] if msg else type(e).__name__}") from e


def _split_weights(model: onnx.ModelProto, above: int = 1024):
    """A copy of ``model`` whose float initializers above ``above`` elements are graph inputs,
    and their arrays: onnxruntime then loads a small model and reads the weights as inputs
    (a VGG's check takes a second instead of seven)."""
    from onnx import numpy_helper

    g = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    arrays = {}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    declared = {i.name for i in g.input}  # IR < 4 models list initializers among the inputs
    for init in g.initializer:
        if init.data_type in floats and int(np.prod(init.dims)) > above and init.name not in arrays:
            if init.name not in declared:
                lg.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            arrays[init.name] = numpy_helper.to_array(init)
        else:
            lg.initializer.append(init)
    return light, arrays


def run_model(model: onnx.ModelProto, inputs: dict, weights: dict | None = None) -> list:
    """The model's outputs on onnxruntime (CPU, graph optimizations off), big weights fed as inputs.
    ``weights`` replaces some of them (by name)."""
    import onnxruntime as ort

    light, arrays = _split_weights(model, 1024 if weights is None else 0)
    if weights:
        arrays.update({k: v for k, v in weights.items() if k in arrays})
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(light.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in inputs.items() if k in wanted}
    feed.update({k: v for k, v in arrays.items() if k in wanted})
    return sess.run(None, feed)


def noise_floor(model: onnx.ModelProto, inputs: dict, reference: list | None = None, seed: int = 0) -> float:
    """How far the model's outputs move (worst relative L2) when every float weight moves by one
    ulp in a random direction: what rounding the weights differently, as any folding pass does,
    costs in this model. Trained networks: ~1e-7; deep networks with random weights much more."""
    _, arrays = _split_weights(model, 0)
    weight_ops = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Add", "Mul", "Sub", "Div",
                  "PRelu"}
    readers: dict[str, set] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    rng = np.random.default_rng(seed + 12345)
    moved = {}
    for k, a in arrays.items():
        if a.ndim == 0 or not readers.get(k) or not readers[k] <= weight_ops:
            continue  # only layer weights and per-channel constants; never shapes or scales
        direction = np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(a.dtype)
        moved[k] = np.asarray(np.nextafter(a, direction))
    ref = reference if reference is not None else run_model(model, inputs, {})
    got = run_model(model, inputs, moved)
    return max(rel_l2(a, b) for a, b in zip(got, ref))
