"""Latency of graphgen libraries vs onnxruntime (and OpenVINO) over the zoo; the table goes into the README.

    python benchmarks/zoo.py                       # the four reference models, untuned
    python benchmarks/zoo.py --tuned               # also with the target's tuning database
    python benchmarks/zoo.py --models resnet50,vgg16 --no-readme

Each model runs through ``graphgen.bench.bench`` (same process, same input, same threads,
interleaved timing rounds, median after warm-up; every library checked against onnxruntime
first). The README's "Speed" section gets the table between its markers together with the
machine it ran on and that machine's load average, because timings on a busy machine move.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ["squeezenet1_1", "mobilenet_v2", "shufflenet_v2_x1_0", "resnet18"]
START, END = "<!-- zoo-bench:start -->", "<!-- zoo-bench:end -->"


def _ms(res: dict, runtime: str) -> float | None:
    row = next((r for r in res["runtimes"] if r["runtime"] == runtime), None)
    return row["median_ms"] if row else None


def _threads_cell(res: dict) -> str:
    """The row's thread count, and the count its tuning database was tuned at where that differs
    (bench falls back to the default count's database when none was tuned at the row's)."""
    tuned_at = (res.get("database") or {}).get("threads")
    return f"{res['threads']}" + (f" (tuned at {tuned_at})" if tuned_at and tuned_at != res["threads"] else "")


def markdown(results: list[dict], seconds: float) -> str:
    if not results:
        return "(no results)"
    tuned = any(_ms(r, "graphgen tuned") is not None for r in results)
    ov = any(_ms(r, "openvino") is not None for r in results)
    head = ["model", "input", "threads", "graphgen ms"] + (["graphgen tuned ms"] if tuned else []) \
        + ["onnxruntime ms"] + (["OpenVINO ms"] if ov else []) + ["graphgen / ORT"] \
        + (["tuned / ORT"] if tuned else []) + ["ORT GFLOP/s (of sgemm)", "0.8x ORT needs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        g, t, o, v = (_ms(r, k) for k in ("graphgen", "graphgen tuned", "onnxruntime", "openvino"))
        cells = [r["model"], "x".join(map(str, r["input_size"] or [])), _threads_cell(r), f"{g:.2f}" if g else "n/a"]
        if tuned:
            cells.append(f"{t:.2f}" if t else "n/a")
        cells.append(f"{o:.2f}" if o else "n/a")
        if ov:
            cells.append(f"{v:.2f}" if v else "n/a")
        cells.append(f"{g / o:.2f}" if g and o else "n/a")
        if tuned:
            cells.append(f"{t / o:.2f}" if t and o else "n/a")
        ort = next((row for row in r["runtimes"] if row["runtime"] == "onnxruntime"), {})
        cells.append(f"{ort['gflops']} ({ort['of_sgemm']:.0%})" if ort.get("of_sgemm") is not None else "n/a")
        # the share of the sgemm ceiling a runtime must average over the model, on the direct
        # convolution's multiply-adds, to take 0.8x onnxruntime's time
        cells.append(f"{ort['of_sgemm'] / 0.8:.0%} of sgemm" if ort.get("of_sgemm") is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    h = results[0]["host"]
    loads = [r["host"]["load_average"][0] for r in results if r["host"].get("load_average")] + \
            [r["host"]["load_average_after"][0] for r in results if r["host"].get("load_average_after")]
    versions = {row["runtime"]: row["version"] for r in results for row in r["runtimes"]}
    lines += ["",
              f"Measured {time.strftime('%Y-%m-%d')} on {h['cpu']} ({h['logical_cores']} logical / "
              f"{h['physical_cores']} physical cores; the same thread count for every runtime of a row), "
              f"{h['platform']}; {', '.join(sorted(set(versions.values())))}. Batch 1, fp32, median latency after "
              f"warm-up, runtimes interleaved in one process ({seconds:.0f} s in all). 1-minute load average "
              f"during the run: {min(loads):.1f}-{max(loads):.1f}"
              + (" - the machine was shared, so absolute numbers are inflated and ratios are indicative only."
                 if loads and max(loads) > 1.5 * (h['logical_cores'] or 1) / 2 else "."),
              ""]
    ceilings = {}
    for r in results:
        if r.get("sgemm_gflops"):
            ceilings.setdefault(r["threads"], []).append(r["sgemm_gflops"])
    if ceilings:
        lines += ["GFLOP/s = 2 x MACs / latency. \"of sgemm\": share of onnxruntime's own fp32 1024^3 MatMul "
                  "speed at the same thread count, measured in the same run ("
                  + ", ".join(f"{t} thread{'s' if t > 1 else ''}: {max(v):.0f} GFLOP/s"
                              for t, v in sorted(ceilings.items())) + "), a practical ceiling for a "
                  "direct convolution on this host (graphgen's Winograd kernels do fewer multiply-adds, so its "
                  "GFLOP/s, counted on the direct convolution's multiply-adds, can exceed it). \"0.8x ORT needs\": "
                  "the share of that ceiling a runtime must average over the whole model to take 0.8x "
                  "onnxruntime's time without doing fewer multiply-adds.", ""]
    lines += ["Reproduce: `python benchmarks/zoo.py --threads 1,2` (add `--tuned` after `graphgen tune MODEL "
              "--threads N` for each count N)."]
    return "\n".join(lines)


def write_readme(readme: Path, table: str) -> bool:
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    a, b = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:a] + "\n" + table + "\n" + text[b:])
    return True


def main(argv=None) -> int:
    from graphgen.bench import bench, format_table, plot

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated recipe names")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--tuned", action="store_true", help="also time libraries built with the tuning database")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--threads", default=None,
                    help="threads for every runtime, or a comma-separated list (a row per model and count); "
                         "default: physical cores")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--png", default=str(ROOT / "benchmarks" / "zoo.png"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "zoo.json"))
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    results = []
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    for name, threads in [(m.strip(), t) for t in thread_counts for m in args.models.split(",") if m.strip()]:
        print(f"== {name}" + (f" ({threads} threads)" if threads else ""), file=sys.stderr, flush=True)
        try:
            res = bench(name, args.target, tuned=args.tuned, runs=args.runs, threads=threads,
                        progress=lambda m: print("   " + m, file=sys.stderr, flush=True))
        except Exception as e:  # noqa: BLE001 - one model's failure is reported, the rest go on
            print(f"   {name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        print(format_table(res), flush=True)
        results.append(res)
    table = markdown(results, time.monotonic() - t0)
    print(table)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    written = plot(results, args.png) if results else None
    print(f"plot: {written}" if written else "plot: not written (matplotlib missing or no results)", file=sys.stderr)
    if not args.no_readme and results:
        if write_readme(Path(args.readme), table):
            print(f"table written into {args.readme}", file=sys.stderr)
        else:
            print(f"{args.readme} has no {START} ... {END} markers; table not written", file=sys.stderr)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
