"""Reference runs on onnxruntime and the comparison rule every check in graphgen uses.

The rule: outputs match when the relative L2 error ||a - b|| / ||b|| is below the
tolerance (fp32 default 1e-5) for every output. Max abs error is reported too.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import onnx

#: fp32 relative-L2 tolerance: float32 has ~6e-8 unit roundoff; reordered sums over
#: a few thousand terms (a deep net's convs) stay well below 1e-5.
DEFAULT_TOLERANCE = 1e-5

_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.BOOL: np.bool_,
}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def io_spec(model: onnx.ModelProto) -> dict:
    """Names, shapes and dtypes of a model's inputs and outputs, for manifests."""

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": np.dtype(_ONNX_TO_NP.get(t.elem_type, np.float32)).name}

    return {"inputs": [spec(v) for v in graph_inputs(model)], "outputs": [spec(v) for v in model.graph.output]}


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input (standard normal for floats)."""
    out = {}
    for v in graph_inputs(model):
        t = v.type.tensor_type
        shape = []
        for d in t.shape.dim:
            if not d.HasField("dim_value"):
                raise ValueError(f"input {v.name!r} has a dynamic dimension; give static shapes")
            shape.append(d.dim_value)
        dtype = _ONNX_TO_NP.get(t.elem_type, np.float32)
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{v.name}".encode()).digest()[:8], "little"))
        if np.issubdtype(dtype, np.floating):
            out[v.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            out[v.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            out[v.name] = rng.integers(0, 10, shape).astype(dtype)
    return out


def run_onnxruntime(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run on onnxruntime's CPU provider with graph optimizations off (the plain reference)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


@dataclass
class Comparison:
    ok: bool
    tolerance: float
    rel_l2: list[float]
    max_abs: list[float]
    outputs: list[str]
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        worst = max(self.rel_l2) if self.rel_l2 else 0.0
        return (f"{'match' if self.ok else 'MISMATCH'}: worst relative L2 {worst:.3g} "
                f"(tolerance {self.tolerance:g}), max abs {max(self.max_abs, default=0.0):.3g}")


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    denom = np.linalg.norm(e)
    num = np.linalg.norm(a - e)
    if denom == 0.0:
        return float(num)
    return float(num / denom)


def compare(actual: list[np.ndarray], expected: list[np.ndarray], names: list[str] | None = None,
            tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    names = names or [f"output{i}" for i in range(len(expected))]
    if len(actual) != len(expected):
        return Comparison(False, tolerance, [], [], names, f"{len(actual)} outputs, expected {len(expected)}")
    errs, maxabs, problems = [], [], []
    for n, a, e in zip(names, actual, expected):
        a = np.asarray(a)
        e = np.asarray(e)
        if a.shape != e.shape:
            problems.append(f"{n}: shape {a.shape}, expected {e.shape}")
            errs.append(float("inf"))
            maxabs.append(float("inf"))
            continue
        if not np.all(np.isfinite(a)) and np.all(np.isfinite(e)):
            problems.append(f"{n}: non-finite values")
        errs.append(rel_l2(a, e))
        maxabs.append(float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))) if a.size else 0.0)
    ok = not problems and all(r <= tolerance for r in errs)
    return Comparison(ok, tolerance, errs, maxabs, names, "; ".join(problems))


def check_equivalent(before: onnx.ModelProto, after: onnx.ModelProto, seed: int = 0,
                     tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Run two ONNX models on the same seeded inputs and compare all outputs."""
    inputs = random_inputs(before, seed)
    ref = run_onnxruntime(before, inputs)
    got = run_onnxruntime(after, {k: v for k, v in inputs.items()
                                  if k in {i.name for i in graph_inputs(after)}})
    return compare(got, ref, [o.name for o in before.graph.output], tolerance)
