"""The ``graphgen`` command: a thin shell over graphgen.api.

Exit codes: 0 success, 1 build or verification failure, 2 bad input (unknown model or
target, bad weights, unreadable ONNX file, wrong option).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from graphgen import __version__
from graphgen.errors import BuildError, GraphgenError, UserError


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="recipe name (see `graphgen list`) or a path to an .onnx file")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="input height and width")
    p.add_argument("--num-classes", type=int, metavar="N", help="number of output classes")
    p.add_argument("--weights", metavar="FILE", help="checkpoint (.npz or .safetensors, torchvision key names)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
    p.add_argument("--postprocess", action="store_true",
                   help="detection recipes: decode boxes and run NonMaxSuppression in the graph")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe option, e.g. --option width_mult=0.75 --option bilinear=False (repeatable)")


def _recipe_options(args) -> dict:
    """--option KEY=VALUE pairs (values read as Python literals, else strings) and --postprocess."""
    import ast

    opts = {}
    for item in getattr(args, "option", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        try:
            opts[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            opts[key.strip()] = value.strip()
    if getattr(args, "postprocess", False):
        opts["postprocess"] = True
    return opts


def _add_remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT", help="verify on a board running python -m tvm.exec.rpc_server")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="verify on a board found through a TVM RPC tracker")
    p.add_argument("--rpc-key", metavar="KEY", help="the board's device key at the tracker")


def make_parser() -> argparse.ArgumentParser:
    from graphgen.compile.targets import TARGETS

    parser = argparse.ArgumentParser(prog="graphgen", description="Classic CNNs from the paper to a compiled, "
                                     "verified library (ONNX + Apache TVM).")
    parser.add_argument("--version", action="version", version=f"graphgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="optimize, compile, verify and publish a model library",
                       description="Build MODEL into compiled/<model>-<target>/ (model.onnx, model.so, manifest.json).",
                       epilog="targets: " + "; ".join(f"{k}: {v}" for k, v in TARGETS.items()))
    _add_model_options(b)
    b.add_argument("--target", "-t", default="x86", help=f"{', '.join(TARGETS)}, or a TVM target JSON (default x86)")
    b.add_argument("--cpu", help="CPU model for CPU targets (e.g. cortex-a53, cortex-a76, skylake)")
    b.add_argument("--arch", help="GPU arch for the cuda target (e.g. sm_80, sm_90)")
    b.add_argument("--out", "-o", metavar="DIR", help="output folder (default compiled/<model>-<target>)")
    b.add_argument("--tolerance", type=float, default=None, help="relative L2 tolerance of the check (default 1e-5)")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON when done")
    b.add_argument("--verify", choices=["host", "emulate", "rpc"], default=None,
                   help="host: run here if the target is this host, else check the ELF (default); emulate: run "
                        "under qemu (arm, armv7); rpc: run on a board (--rpc or --rpc-tracker/--rpc-key)")
    _add_remote_options(b)
    from graphgen.tune.cli import add_build_options, add_subcommands

    add_build_options(b)
    COMMANDS.update(add_subcommands(sub, _add_model_options))

    e = sub.add_parser("export", help="write the recipe's ONNX graph (before optimization)")
    _add_model_options(e)
    e.add_argument("-o", "--output", required=False, metavar="FILE.onnx", help="where to write the ONNX file")
    e.add_argument("--save-weights", metavar="FILE", help="also write the weights (.npz or .safetensors)")

    i = sub.add_parser("info", help="per-layer params, multiply-adds and memory access cost")
    i.add_argument("model", help="recipe name or a path to an .onnx file")
    i.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="input height and width")
    i.add_argument("--num-classes", type=int, metavar="N", help="number of output classes")
    i.add_argument("--json", action="store_true", help="print rows and totals as JSON")

    v = sub.add_parser("verify", help="run a build under ARM emulation or on a board and compare with onnxruntime",
                       description="MODEL is a build folder (its manifest gets the result) or a recipe / .onnx "
                                   "file (built with this verification). See docs/deploy.md.")
    _add_model_options(v)
    v.add_argument("--target", "-t", default=None, help="target when MODEL is a recipe or .onnx file (default x86)")
    v.add_argument("--cpu", help="CPU model when MODEL is a recipe or .onnx file")
    v.add_argument("--out", "-o", metavar="DIR", help="output folder when MODEL is a recipe or .onnx file")
    v.add_argument("--emulate", action="store_true",
                   help="run under qemu user-mode emulation (arm: whole model; armv7: every kernel)")
    _add_remote_options(v)
    v.add_argument("--tolerance", type=float, default=None, help="relative L2 tolerance (default 1e-5)")
    v.add_argument("--json", action="store_true", help="print the manifest as JSON when done")

    o = sub.add_parser("optimize", help="run graphgen's optimizer on any ONNX file and print what it did",
                       description="Optimize IN.onnx (a recipe's export or any ONNX model) into OUT.onnx; each pass "
                                   "is checked against the graph before it on onnxruntime. See docs/optimizer.md.")
    o.add_argument("input", metavar="IN.onnx", help="the ONNX file to optimize")
    o.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the optimized model")
    o.add_argument("--passes", metavar="A,B", help="only these passes (still in the declared order)")
    o.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check of each pass")
    o.add_argument("--json", action="store_true", help="print the report as JSON")

    ls = sub.add_parser("list", help="list the recipes with params and multiply-adds")
    ls.add_argument("--json", action="store_true", help="print as JSON")
    return parser


def _cmd_build(args) -> int:
    from graphgen import api
    from graphgen.verify import DEFAULT_TOLERANCE

    res = api.build(args.model, args.target, cpu=args.cpu, arch=args.arch, out=args.out,
                    input_size=args.input_size, num_classes=args.num_classes, weights=args.weights, seed=args.seed,
                    tolerance=args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE,
                    progress=api._stderr, verify=args.verify or "host", rpc=args.rpc, rpc_tracker=args.rpc_tracker,
                    rpc_key=args.rpc_key, options=_recipe_options(args), tune=args.tune, trials=args.trials,
                    minutes=args.minutes, db=args.db, threads=args.threads)
    if args.json:
        print(json.dumps(res.manifest, indent=2, default=str))
    else:
        v = res.manifest["verification"]
        print(f"built {res.path} ({res.manifest['build']['seconds']} s): verification {v['status']}: {v['summary']}")
    return 0


def _cmd_export(args) -> int:
    from graphgen import api

    if not args.output and not args.save_weights:
        raise UserError("export needs -o FILE.onnx and/or --save-weights FILE")
    if args.output and not args.output.lower().endswith(".onnx"):
        raise UserError(f"-o {args.output}: the output file must end in .onnx")
    api.export(args.model, args.output, input_size=args.input_size, num_classes=args.num_classes,
               weights=args.weights, save_weights=args.save_weights, seed=args.seed, options=_recipe_options(args))
    for what in (args.output, args.save_weights):
        if what:
            print(f"wrote {what}")
    return 0


def _cmd_list(args) -> int:
    from graphgen import api
    from graphgen.analysis import human_count

    rows = api.list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    w = max(len(r["name"]) for r in rows)
    fw = max(len(r["family"]) for r in rows)
    print(f"{'model':<{w}}  {'family':<{fw}}  {'params':>12}  {'mult-adds':>10}  {'input':>9}  source")
    for r in rows:
        size = "x".join(map(str, r["input_size"]))
        alias = f" (alias: {', '.join(r['aliases'])})" if r["aliases"] else ""
        macs = human_count(r["macs"]) if r["macs"] is not None else "n/a"
        print(f"{r['name']:<{w}}  {r['family']:<{fw}}  {r['params']:>12,}  {macs:>10}  {size:>9}  "
              f"{r['source']}{alias}")
    return 0


def _cmd_info(args) -> int:
    from dataclasses import asdict

    from graphgen import api
    from graphgen.analysis import format_table

    rows, total = api.info(args.model, input_size=args.input_size, num_classes=args.num_classes)
    if args.json:
        print(json.dumps({"layers": [asdict(r) for r in rows], "totals": total}, indent=2))
    else:
        print(format_table(rows, total))
    return 0


def _cmd_verify(args) -> int:
    from graphgen import api

    if args.emulate and (args.rpc or args.rpc_tracker):
        raise UserError("choose --emulate or --rpc/--rpc-tracker, not both")
    mode = "emulate" if args.emulate else "rpc" if (args.rpc or args.rpc_tracker) else "host"
    opts = {k: v for k, v in {"cpu": args.cpu, "out": args.out, "input_size": args.input_size,
                              "num_classes": args.num_classes, "weights": args.weights,
                              "seed": args.seed or None}.items() if v is not None}
    res = api.verify(args.model, args.target, mode=mode, rpc=args.rpc, rpc_tracker=args.rpc_tracker,
                     rpc_key=args.rpc_key, tolerance=args.tolerance, progress=api._stderr, **opts)
    v = res.manifest["verification"]
    if args.json:
        print(json.dumps(res.manifest, indent=2, default=str))
    else:
        print(f"verified {res.path}: {v['status']}: {v['summary']}")
    return 0


COMMANDS = {"build": _cmd_build, "export": _cmd_export, "list": _cmd_list, "info": _cmd_info,
            "verify": _cmd_verify}


def _cmd_optimize(args) -> int:
    from graphgen import api

    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    res = api.optimize_file(args.input, args.output, passes=passes, verify=not args.no_verify)
    print(json.dumps(res.report(), indent=2) if args.json else res.format())
    if not args.json:
        print(f"wrote {args.output}")
    return 0


COMMANDS["optimize"] = _cmd_optimize


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    before = os.environ.get("GRAPHGEN_WINOGRAD")
    if getattr(args, "winograd", None):
        # one switch for every step of the command (tuning, compiling, the emulated reference)
        os.environ["GRAPHGEN_WINOGRAD"] = args.winograd
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"graphgen: error: {e}", file=sys.stderr)
        return 2
    except BuildError as e:
        print(f"graphgen: build failed: {e}", file=sys.stderr)
        return 1
    except GraphgenError as e:
        print(f"graphgen: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("graphgen: interrupted; nothing was published", file=sys.stderr)
        return 130
    finally:
        if before is None:
            os.environ.pop("GRAPHGEN_WINOGRAD", None)
        else:
            os.environ["GRAPHGEN_WINOGRAD"] = before


if __name__ == "__main__":
    sys.exit(main())
