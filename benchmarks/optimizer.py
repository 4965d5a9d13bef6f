"""graphgen's optimizer against onnxsim and onnxslim, and what it buys on onnxruntime.

For each recipe: node count of the raw export, after graphgen's optimizer, after onnxsim and
after onnxslim (same raw graph each time), whether any Transpose is left, and onnxruntime
latency of the raw vs the graphgen-optimized model: the median of ``--runs`` runs in one
process after ``--warmup`` runs (alternating between the two models), onnxruntime's default
graph optimizations on (what a user of the file gets), ``--threads`` intra-op threads.
Outputs of the optimized model are compared with the raw one (relative L2).

    python benchmarks/optimizer.py                                   # the ShuffleNets at 224x224
    python benchmarks/optimizer.py --models all --input-size 64 64   # every recipe, small
    python benchmarks/optimizer.py --json out.json

Needs the ``bench`` extra (onnxslim); a peer that fails on a graph shows as ``error``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODELS = ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
                  "shufflenet_v1", "shufflenet_v1_g1", "shufflenet_v1_g2", "shufflenet_v1_g4", "shufflenet_v1_g8"]


def peer_counts(model):
    import onnx

    out = {}
    try:
        import onnxsim

        sim, _ = onnxsim.simplify(model)
        out["onnxsim"] = len(sim.graph.node)
    except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
        out["onnxsim"] = f"error: {type(e).__name__}"
    try:
        import onnxslim

        m = onnx.ModelProto()
        m.CopyFrom(model)
        out["onnxslim"] = len(onnxslim.slim(m).graph.node)
    except Exception as e:  # noqa: BLE001
        out["onnxslim"] = f"error: {type(e).__name__}"
    return out


def latency_ms(models, inputs, runs: int, warmup: int, threads: int) -> list[float]:
    """Median latency of each model. Runs alternate between the models, so a load change on a
    shared machine hits them alike."""
    import onnxruntime as ort

    sessions = []
    for model in models:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sessions.append(ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]))
    for _ in range(warmup):
        for sess in sessions:
            sess.run(None, inputs)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for k, sess in enumerate(sessions):
            t0 = time.perf_counter()
            sess.run(None, inputs)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def measure(name: str, input_size, runs: int, warmup: int, threads: int) -> dict:
    from graphgen.optimize import optimize
    from graphgen.optimize.graph import op_counts
    from graphgen.registry import build_recipe
    from graphgen.verify import random_inputs, rel_l2, run_onnxruntime

    g = build_recipe(name, input_size=input_size)
    raw = g.model
    t0 = time.perf_counter()
    res = optimize(raw, verify=False)
    seconds = time.perf_counter() - t0
    ops = op_counts(res.model)
    inputs = random_inputs(raw)
    err = max(rel_l2(a, b) for a, b in zip(run_onnxruntime(res.model, inputs), run_onnxruntime(raw, inputs)))
    row = {"model": name, "input_size": list(g.input_size), "raw": len(raw.graph.node),
           "graphgen": len(res.model.graph.node), **peer_counts(raw),
           "transpose_left": ops.get("Transpose", 0), "gather_left": ops.get("Gather", 0),
           "optimize_seconds": round(seconds, 2), "rel_l2_vs_raw": err,
           "ops_after": ops}
    if runs:
        t_raw, t_opt = latency_ms([raw, res.model], inputs, runs, warmup, threads)
        row["ort_ms_raw"], row["ort_ms_graphgen"] = round(t_raw, 3), round(t_opt, 3)
    return row


def markdown(rows: list[dict]) -> str:
    lat = any("ort_ms_raw" in r for r in rows)
    head = "| model | nodes raw | graphgen | onnxsim | onnxslim | Transpose left |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if lat:
        head += " ORT ms raw | ORT ms graphgen |"
        sep += "---:|---:|"
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['model']} | {r['raw']} | **{r['graphgen']}** | {r['onnxsim']} | {r['onnxslim']} | "
                f"{r['transpose_left']} |")
        if lat:
            line += f" {r.get('ort_ms_raw', '')} | {r.get('ort_ms_graphgen', '')} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated recipe names, or 'all' (default: the ShuffleNets)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help="input size (default: each recipe's default, 224x224 for the ShuffleNets)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per model (0: no latency)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)

    from graphgen.registry import names

    models = names() if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    rows = []
    for m in models:
        try:
            row = measure(m, args.input_size, args.runs, args.warmup, args.threads)
        except Exception as e:  # noqa: BLE001 - keep going, report it
            print(f"{m}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        rows.append(row)
        print(f"{m}: {row['raw']} -> {row['graphgen']} nodes (onnxsim {row['onnxsim']}, onnxslim {row['onnxslim']})"
              + (f", ORT {row['ort_ms_raw']} -> {row['ort_ms_graphgen']} ms" if "ort_ms_raw" in row else "")
              + f", rel L2 {row['rel_l2_vs_raw']:.1e}", file=sys.stderr, flush=True)
    import onnxruntime

    meta = {"host": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "onnxruntime": onnxruntime.__version__, "threads": args.threads, "runs": args.runs}
    print(markdown(rows))
    print(f"\nonnxruntime {meta['onnxruntime']} CPU, {args.threads} thread(s), median of {args.runs} runs; "
          f"{meta['host']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
