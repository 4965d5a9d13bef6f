"""The ``tune`` and ``bench`` subcommands and the tuning options of ``build`` (wired in graphgen.cli)."""

from __future__ import annotations

import argparse
import json
import sys


def _budget_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, metavar="N",
                   help="trials the model's kernels should have in the database (earlier ones count: run the same "
                        "command again to resume); default 32 per kernel when --minutes is not given")
    p.add_argument("--minutes", type=float, metavar="M", help="wall-time limit of this tuning run")
    p.add_argument("--db", metavar="DIR", help="tuning database folder (default: one per target under "
                                               "$GRAPHGEN_CACHE_DIR or ~/.cache/graphgen/tuning)")


def winograd_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--winograd", choices=["auto", "off", "2", "4"], default=None,
                   help="3x3 stride-1 convs as Winograd F(4x4)/F(2x2) kernels on CPU targets: auto (where they pay, "
                        "the default), off (smaller library: no transformed weights), 2 or 4 (force the tile); "
                        "also GRAPHGEN_WINOGRAD")


def threads_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--threads", type=int, metavar="N", default=None,
                   help=f"{what} (CPU targets; default: this host's physical cores, 4 for boards). Tuning measures "
                        "at N threads and the tuning database is kept per N: the best schedule on one thread is "
                        "not the best on two")


def add_build_options(p: argparse.ArgumentParser) -> None:
    """--tune, --trials, --minutes, --db, --threads, --winograd on ``graphgen build``."""
    p.add_argument("--tune", action="store_true",
                   help="tune the kernels with MetaSchedule before compiling (boards: --rpc-tracker/--rpc-key)")
    _budget_options(p)
    threads_option(p, "threads the library is made to run on: the tuning database of that count is used")
    winograd_option(p)


def add_subcommands(sub, add_model_options) -> dict:
    t = sub.add_parser("tune", help="tune a model's kernels into the target's tuning database",
                       description="Tune MODEL's kernels with MetaSchedule for TARGET. Results go into a database "
                                   "per target that every later `graphgen build` (of any model) uses. Ctrl-C keeps "
                                   "the trials measured so far; the same command resumes.")
    add_model_options(t)
    t.add_argument("--target", "-t", default="x86", help="CPU target (x86, x86-64-v3, avx512, arm, armv7, or JSON)")
    t.add_argument("--cpu", help="CPU model (e.g. cortex-a53, skylake)")
    _budget_options(t)
    t.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on boards registered at this TVM RPC tracker")
    t.add_argument("--rpc-key", metavar="KEY", help="the boards' device key at the tracker")
    threads_option(t, "threads the candidates are timed on (the thread count the library will run on)")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    winograd_option(t)

    b = sub.add_parser("bench", help="median latency of the graphgen library vs onnxruntime (and OpenVINO)",
                       description="Build MODEL for this host and time it against onnxruntime (and OpenVINO when "
                                   "installed) in one process: median latency after warm-up, a table and a PNG.")
    add_model_options(b)
    b.add_argument("--target", "-t", default="x86", help="a target this host runs (default x86)")
    b.add_argument("--cpu", help="CPU model")
    b.add_argument("--tuned", action="store_true", help="also time the library built with the tuning database")
    b.add_argument("--db", metavar="DIR", help="tuning database folder for --tuned (default: the target's)")
    b.add_argument("--runs", type=int, default=None, help="timed runs per runtime (default: about 2 s worth)")
    b.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    b.add_argument("--threads", type=int, default=None,
                   help="threads for every runtime (default: physical cores); --tuned uses the database tuned at "
                        "this count (graphgen tune --threads N), else the one tuned at the default count")
    b.add_argument("--png", metavar="FILE", help="write the plot here (default bench-<model>-<target>.png)")
    b.add_argument("--no-png", action="store_true", help="no plot")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    winograd_option(b)
    return {"tune": cmd_tune, "bench": cmd_bench}


def _options(args) -> dict:
    from graphgen.cli import _recipe_options

    return _recipe_options(args)


def cmd_tune(args) -> int:
    from graphgen import api
    from graphgen.tune import tune

    res = tune(args.model, args.target, cpu=args.cpu, trials=args.trials, minutes=args.minutes, db=args.db,
               rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, input_size=args.input_size,
               num_classes=args.num_classes, options=_options(args), progress=True, report=api._stderr,
               threads=args.threads)
    if args.json:
        print(json.dumps({"summary": res.summary(), **res.as_manifest(), "database": str(res.database),
                          "estimated_ms_before": res.estimated_ms_before, "estimated_ms_after": res.estimated_ms_after,
                          "kernels": res.per_task}, indent=2))
    else:
        print(res.summary())
    if res.interrupted:
        print(f"graphgen: interrupted; {res.trials_run} trials of this run are in {res.database}; run the same "
              f"command again to resume", file=sys.stderr)
        return 130
    return 0


def cmd_bench(args) -> int:
    from graphgen.bench import bench, format_table, plot

    res = bench(args.model, args.target, cpu=args.cpu, tuned=args.tuned, db=args.db, runs=args.runs,
                warmup=args.warmup, threads=args.threads, input_size=args.input_size, num_classes=args.num_classes,
                options=_options(args), progress=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(format_table(res))
    if not args.no_png:
        png = args.png or f"bench-{res['model']}-{res['target']}.png"
        written = plot([res], png)
        print(f"plot: {written}" if written else "plot: matplotlib is not installed (pip install graphgen[bench])",
              file=sys.stderr)
    return 0
