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

import onnx

from graphgen.errors import PassEquivalenceError
from graphgen.optimize.graph import op_counts
from graphgen.verify import DEFAULT_TOLERANCE, check_equivalent

#: The order the passes run in. Structural rewrites first, onnxsim's clean-up last.
PASS_ORDER = [
    "remove_identity",
    "fold_batchnorm",
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
             tolerance: float = DEFAULT_TOLERANCE) -> OptimizeResult:
    """Optimize a copy of ``model``. With ``verify``, a pass that changes outputs raises
    PassEquivalenceError naming it."""
    names = passes if passes is not None else PASS_ORDER
    current = copy.deepcopy(model)
    before = op_counts(current)
    log: dict[str, dict] = {n: {"pass": n, "rewrites": 0, "seconds": 0.0} for n in names}
    for _ in range(MAX_ROUNDS):
        changed_round = 0
        for name in names:
            mod = load_pass(name)
            snapshot = copy.deepcopy(current) if verify else None
            t0 = time.perf_counter()
            n = mod.run(current)
            log[name]["seconds"] += time.perf_counter() - t0
            if n:
                log[name]["rewrites"] += n
                changed_round += n
                if verify:
                    cmp = check_equivalent(snapshot, current, tolerance=tolerance)
                    if not cmp.ok:
                        raise PassEquivalenceError(f"optimizer pass {name!r} changed the model's outputs: "
                                                   f"{cmp.summary()}")
        if not changed_round:
            break
    onnx.checker.check_model(current, full_check=True)
    for v in log.values():
        v["seconds"] = round(v["seconds"], 4)
    return OptimizeResult(current, before, op_counts(current), list(log.values()))
