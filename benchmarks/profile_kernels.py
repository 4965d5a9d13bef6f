"""Per-kernel time of a graphgen library in the model, next to onnxruntime's per-node time.

    python benchmarks/profile_kernels.py mobilenet_v2 [--threads 1] [--runs 50] [--top 25] [--tuned | --db DIR]
    python benchmarks/profile_kernels.py mobilenet_v2 --side-by-side

graphgen: TVM's VM runs the library with an instrument hook that takes the time around each
kernel call (median over runs, per call site in run order). onnxruntime: its own profiler
(``enable_profiling``), the median of each node's duration over the same number of runs.
Both get the same optimized graph and input, one after the other in one process, pinned as
``graphgen bench`` pins them. The hook costs a few microseconds per call, so the kernel
times are what the kernels take, and their sum is below the model's latency by the VM's own
work (allocation, calls). Prints both tables, largest first, and the totals.

``--side-by-side`` lists the two runtimes' kernels in run order instead, one row per layer
with the difference, where they pair up one to one (the VM's own builtins and onnxruntime's
layout reorders left out; both fuse each conv with its bias, activation and residual add):
the per-layer view that shows which layers a change should go after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

# graphgen's side: the library's own profiler (``graphgen tune`` uses it for its check in the model)
from graphgen.bench import kernel_times as profile_tvm


def profile_ort(model, inputs: dict, threads: int, runs: int, warmup: int = 10) -> list[tuple[str, float]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            sess.run(None, inputs)
        for _ in range(runs):
            sess.run(None, inputs)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        key = f'{e["args"].get("op_name", "?")} {e["name"][:-len("_kernel_time")]}'
        if key not in per_node:
            order.append(key)
        per_node[key].append(e["dur"] * 1e-6)
    return [(k, statistics.median(per_node[k][-runs:])) for k in order]


def side_by_side(tvm_rows: list[tuple[str, float]], ort_rows: list[tuple[str, float]]) -> str | None:
    """The kernels of both runtimes in run order, a row per layer: graphgen's time,
    onnxruntime's, the difference and both names; None where they do not pair up one to one."""
    ours = [r for r in tvm_rows if not r[0].startswith("vm.")]
    theirs = [r for r in ort_rows if not r[0].startswith(("ReorderInput", "ReorderOutput"))]
    if len(ours) != len(theirs):
        return None
    lines = [f"{'graphgen':>9} {'ORT':>9} {'diff':>9}  layer (graphgen kernel | onnxruntime node)"]
    for (a, ta), (b, tb) in zip(ours, theirs):
        lines.append(f"{ta * 1e6:6.1f} us {tb * 1e6:6.1f} us {(ta - tb) * 1e6:+6.1f} us  {a} | {b}")
    total_a, total_b = sum(t for _, t in ours), sum(t for _, t in theirs)
    lines.append(f"{total_a * 1e3:6.3f} ms {total_b * 1e3:6.3f} ms {(total_a - total_b) * 1e3:+6.3f} ms  "
                 f"summed over {len(ours)} layers")
    return "\n".join(lines)


def _table(rows: list[tuple[str, float]], top: int, title: str) -> str:
    total = sum(t for _, t in rows)
    lines = [f"{title}: {len(rows)} calls, {total * 1e3:.3f} ms summed"]
    for name, t in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"  {t * 1e6:9.1f} us  {100 * t / total:5.1f} %  {name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--db", help="a tuning database to build with (default: none, the untuned library)")
    ap.add_argument("--tuned", action="store_true", help="build with the database tuned at --threads")
    ap.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    ap.add_argument("--side-by-side", action="store_true",
                    help="one row per layer in run order, graphgen next to onnxruntime, with the difference")
    args = ap.parse_args(argv)

    from graphgen.api import load_model
    from graphgen.bench import set_tvm_threads
    from graphgen.compile import compile_model, resolve_target
    from graphgen.errors import UserError
    from graphgen.optimize import optimize
    from graphgen.tune import database_for
    from graphgen.verify import random_inputs

    try:
        # the thread count is part of the target: a database tuned at it matches
        spec = resolve_target(args.target, threads=args.threads)
        db = database_for(spec, args.db) if args.db or args.tuned else None
        if db is not None and not db.exists():
            raise UserError(f"no tuning database at {db}")
        src = load_model(args.model, input_size=tuple(args.input_size) if args.input_size else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opt = optimize(src.model).model
    inputs = random_inputs(opt, 0)
    set_tvm_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="graphgen-profile-") as tmp:
        lib = Path(tmp) / "model.so"
        compile_model(opt, spec, lib, database=db, default_schedules=True)
        tvm_rows = profile_tvm(lib, inputs, opt, args.runs)
    ort_rows = profile_ort(opt, inputs, args.threads, args.runs)
    if args.side_by_side:
        table = side_by_side(tvm_rows, ort_rows)
        if table is not None:
            print(f"graphgen and onnxruntime, {args.model} ({args.threads} threads), run order:")
            print(table)
            return 0
        print("the two runtimes' kernels do not pair up one to one (different fusion): separate tables\n")
    print(_table(tvm_rows, args.top, f"graphgen {args.model} ({args.threads} threads)"))
    print()
    print(_table(ort_rows, args.top, f"onnxruntime {args.model}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
