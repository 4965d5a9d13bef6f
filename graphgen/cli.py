"""The ``graphgen`` command: a thin shell over graphgen.api.

Exit codes: 0 success, 1 build or verification failure, 2 bad input (unknown model or
target, bad weights, unreadable ONNX file, wrong option).
"""

from __future__ import annotations

import argparse
import json
import sys

from graphgen import __version__
from graphgen.errors import BuildError, GraphgenError, UserError


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="recipe name (see `graphgen list`) or a path to an .onnx file")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="input height and width")
    p.add_argument("--num-classes", type=int, metavar="N", help="number of output classes")
    p.add_argument("--weights", metavar="FILE", help="checkpoint (.npz or .safetensors, torchvision key names)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")


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

    e = sub.add_parser("export", help="write the recipe's ONNX graph (before optimization)")
    _add_model_options(e)
    e.add_argument("-o", "--output", required=False, metavar="FILE.onnx", help="where to write the ONNX file")
    e.add_argument("--save-weights", metavar="FILE", help="also write the weights (.npz or .safetensors)")

    i = sub.add_parser("info", help="per-layer params, multiply-adds and memory access cost")
    i.add_argument("model", help="recipe name or a path to an .onnx file")
    i.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="input height and width")
    i.add_argument("--num-classes", type=int, metavar="N", help="number of output classes")
    i.add_argument("--json", action="store_true", help="print rows and totals as JSON")

    ls = sub.add_parser("list", help="list the recipes with params and multiply-adds")
    ls.add_argument("--json", action="store_true", help="print as JSON")
    return parser


def _cmd_build(args) -> int:
    from graphgen import api
    from graphgen.verify import DEFAULT_TOLERANCE

    res = api.build(args.model, args.target, cpu=args.cpu, arch=args.arch, out=args.out,
                    input_size=args.input_size, num_classes=args.num_classes, weights=args.weights, seed=args.seed,
                    tolerance=args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE,
                    progress=api._stderr)
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
               weights=args.weights, save_weights=args.save_weights, seed=args.seed)
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


COMMANDS = {"build": _cmd_build, "export": _cmd_export, "list": _cmd_list, "info": _cmd_info}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
