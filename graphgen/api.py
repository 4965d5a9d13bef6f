"""graphgen's Python API; the CLI is a thin shell over these functions.

    import graphgen
    result = graphgen.build("squeezenet", target="arm")
    print(result.path, result.manifest["verification"]["status"])
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from graphgen import __version__
from graphgen.artifact import StagedDir, file_record, write_json
from graphgen.builder import OPSET
from graphgen.errors import BuildError, ModelFileError, UserError, VerificationError
from graphgen.verify import DEFAULT_TOLERANCE, compare, io_spec, random_inputs, run_onnxruntime

DEFAULT_OUT_ROOT = Path("compiled")
VERIFY_SEED = 0


@dataclass
class ModelSource:
    """A model to compile: from a recipe or from an .onnx file."""

    name: str
    model: onnx.ModelProto
    kind: str  # "recipe" or "file"
    meta: dict = field(default_factory=dict)
    state_dict: dict | None = None


def _quiet(_msg: str) -> None:
    pass


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_onnx_path(model: str) -> bool:
    return str(model).lower().endswith(".onnx") or Path(str(model)).is_file()


def load_onnx_file(path: str | Path) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"ONNX file {p} does not exist")
    try:
        model = onnx.load(str(p))
    except Exception as e:
        raise ModelFileError(f"{p} is not a readable ONNX model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else 'parse error'})") from e
    if not model.graph.node:
        raise ModelFileError(f"{p} is not a valid ONNX model: its graph has no nodes")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ModelFileError(f"{p} is not a valid ONNX model: {str(e).strip().splitlines()[0][:200]}") from e
    return model


def load_model(model: str, *, input_size=None, num_classes: int | None = None, weights: str | Path | None = None,
               seed: int = 0, options: dict | None = None) -> ModelSource:
    """A recipe name (or alias) or a path to an .onnx file -> ModelSource."""
    from graphgen.registry import build_recipe
    from graphgen.weights import load_weights

    if is_onnx_path(model):
        if input_size is not None or num_classes is not None or options:
            raise UserError("--input-size, --num-classes and recipe options apply to recipes, not to .onnx files")
        m = load_onnx_file(model)
        if weights is not None:
            m = apply_weights_to_onnx(m, load_weights(weights))
        return ModelSource(Path(model).stem, m, "file", {"file": str(model)})
    sd = load_weights(weights) if weights is not None else None
    g = build_recipe(model, input_size=input_size, num_classes=num_classes, weights=sd, seed=seed, **(options or {}))
    meta = {"recipe": g.recipe.name, "family": g.recipe.family, "source": g.recipe.source,
            "input_size": list(g.input_size), "num_classes": g.num_classes, "parameters": g.parameter_count,
            "options": g.options,
            "weights": {"file": str(weights)} if weights is not None else {"seeded": seed}}
    return ModelSource(g.recipe.name, g.model, "recipe", meta, g.state_dict)


def apply_weights_to_onnx(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Replace initializers of an ONNX file by name; every tensor of the file must match one."""
    from onnx import numpy_helper

    from graphgen.errors import WeightsError

    inits = {i.name: i for i in model.graph.initializer}
    unexpected = sorted(k for k in weights if k not in inits and not k.endswith("num_batches_tracked"))
    bad = []
    for k, v in weights.items():
        if k in inits:
            want = tuple(inits[k].dims)
            if tuple(np.shape(v)) != want:
                bad.append(f"{k}: expected {list(want)}, got {list(np.shape(v))}")
            else:
                inits[k].CopyFrom(numpy_helper.from_array(np.asarray(v, dtype=numpy_helper.to_array(inits[k]).dtype), k))
    if unexpected or bad:
        parts = ([f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"] if unexpected else []) + (
            [f"mis-shaped {len(bad)}: {', '.join(bad[:8])}"] if bad else [])
        raise WeightsError("weights do not match the ONNX file: " + "; ".join(parts))
    return model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(model.SerializeToString(deterministic=True))
    return p


def export(model: str, out: str | Path | None = None, *, input_size=None, num_classes: int | None = None,
           weights=None, save_weights: str | Path | None = None, seed: int = 0, options: dict | None = None
           ) -> onnx.ModelProto:
    """The recipe's graph before optimization; written to ``out`` when given."""
    src = load_model(model, input_size=input_size, num_classes=num_classes, weights=weights, seed=seed,
                     options=options)
    if out is not None:
        save_onnx(src.model, out)
    if save_weights is not None:
        from graphgen.weights import save_weights as _save

        if src.state_dict is None:
            raise UserError("--save-weights needs a recipe (an .onnx file has no state_dict)")
        _save(src.state_dict, save_weights)
    return src.model


@dataclass
class BuildResult:
    path: Path
    manifest: dict

    @property
    def ok(self) -> bool:
        return self.manifest["verification"]["status"] in ("passed", "not_executed")


def default_out_dir(name: str, target_slug: str, root: Path = DEFAULT_OUT_ROOT) -> Path:
    return root / f"{name}-{target_slug}"


def build(model: str, target: str | dict = "x86", *, cpu: str | None = None, arch: str | None = None,
          out: str | Path | None = None, input_size=None, num_classes: int | None = None, weights=None,
          tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, options: dict | None = None,
          progress=_quiet, verify: str = "host", rpc: str | None = None, rpc_tracker: str | None = None,
          rpc_key: str | None = None, tune: bool = False, trials: int | None = None, minutes: float | None = None,
          db: str | Path | None = None, threads: int | None = None) -> BuildResult:
    """Build ``model`` for ``target`` into ``compiled/<model>-<target>/`` (or ``out``).

    Steps: recipe/ONNX -> optimizer (each pass checked on onnxruntime) -> TVM compile -> verify
    -> manifest -> rename into place. Raises UserError on bad input (nothing written) and
    BuildError/VerificationError when the build or its check fails (nothing published).
    CPU targets use the target's tuning database when one exists (``db`` names another);
    ``tune`` tunes first (``trials``/``minutes``; boards through ``rpc_tracker``/``rpc_key``).
    ``threads``: the thread count the library is made for (CPU targets; default the host's
    physical cores, 4 for boards): tuning measures at it, and the database used is the one
    tuned at it (:func:`graphgen.compile.resolve_target`).
    """
    from graphgen.compile import compile_model, resolve_target
    from graphgen.optimize import optimize

    import tvm

    t_start = time.perf_counter()
    spec = resolve_target(target, cpu=cpu, arch=arch, threads=threads)
    from graphgen.emulate import check_mode
    from graphgen.tune.winograd import resolve_mode

    resolve_mode()  # a bad GRAPHGEN_WINOGRAD is a user error before any work
    if db is not None and spec.arch != "cuda":
        from graphgen.tune import database_for

        database_for(spec, db)  # one tuned at another thread count, too

    # verify: "host" (run here if the target is this host, else ELF checks), "emulate" (qemu, arm/armv7),
    # "rpc" (a board running tvm.exec.rpc_server: rpc="HOST:PORT" or rpc_tracker + rpc_key); see graphgen.emulate
    verify_mode, remote = check_mode(verify, spec, rpc, rpc_tracker, rpc_key)
    src = load_model(model, input_size=input_size, num_classes=num_classes, weights=weights, seed=seed,
                     options=options)
    dest = Path(out) if out is not None else default_out_dir(src.name, spec.slug)
    progress(f"[1/4] {src.name}: {len(src.model.graph.node)} nodes; optimizing (each pass checked on onnxruntime)")
    opt = optimize(src.model, verify=True, tolerance=tolerance)
    progress(f"      {sum(opt.before.values())} -> {sum(opt.after.values())} nodes")
    from graphgen.tune import build_database, manifest_section

    if tune:
        progress(f"      tuning {src.name} for {spec.name} (MetaSchedule; Ctrl-C keeps the trials, run again to resume)")
    db_path, tune_result = build_database(opt.model, spec, tune=tune, trials=trials, minutes=minutes, db=db,
                                          rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                                          progress=progress if tune and progress is not _quiet else None,
                                          report=progress)
    with StagedDir(dest) as stage:
        onnx_path = save_onnx(opt.model, stage.path("model.onnx"))
        lib_path = stage.path("model.so")
        progress(f"[2/4] compiling for {spec.name} with TVM {tvm.__version__} ({_target_brief(spec)})")
        build_info = compile_model(opt.model, spec, lib_path, log=lambda m: progress("      " + m),
                                   database=db_path)
        progress(f"[3/4] verifying")
        verification = verify_library(lib_path, spec, opt.model, tolerance=tolerance, seed=VERIFY_SEED,
                                      mode=verify_mode, remote=remote, progress=progress, build_info=build_info)
        progress(f"      {verification['summary']}")
        manifest = {
            "graphgen_version": __version__,
            "tvm_version": tvm.__version__,
            "onnx_opset": OPSET,
            "model": {"name": src.name, "kind": src.kind, **src.meta},
            "io": io_spec(opt.model),
            "target": {"name": spec.name, "arch": spec.arch, "tvm": spec.tvm_json, **spec.details},
            "optimizer": opt.report(),
            "tuning": manifest_section(build_info, tune_result),
            "build": {**build_info, "host": platform.platform(),
                      "seconds": None},
            "verification": verification,
            "files": {"model.onnx": file_record(onnx_path), "model.so": file_record(lib_path)},
        }
        manifest["build"]["seconds"] = round(time.perf_counter() - t_start, 2)
        if verification["status"] == "failed":
            raise VerificationError(f"{src.name} for {spec.name}: verification failed: {verification['summary']}")
        write_json(stage.path("manifest.json"), manifest)
        progress(f"[4/4] publishing {dest}")
        path = stage.commit()
    return BuildResult(path, manifest)


def _target_brief(spec) -> str:
    d = spec.details
    return ", ".join(f"{k} {v}" for k, v in d.items() if v) or spec.tvm_json.get("kind", "")


def verify_library(lib_path: Path, spec, model: onnx.ModelProto, *, tolerance: float = DEFAULT_TOLERANCE,
                   seed: int = 0, mode: str = "host", remote=None, progress=None,
                   build_info: dict | None = None) -> dict:
    """Run the library against onnxruntime where this host can, else check what can be checked statically."""
    import onnxruntime

    from graphgen.compile import run_library
    from graphgen.compile.elf import check_elf

    elf_ok, elf, elf_problem = check_elf(lib_path, spec.arch)
    result = {"status": None, "tolerance": tolerance, "metric": "relative L2 per output (max abs also reported)",
              "inputs": f"seeded standard normal (seed {seed})",
              "reference": f"onnxruntime {onnxruntime.__version__} CPU on the shipped model.onnx",
              "elf": elf, "errors": []}
    if not elf_ok:
        result.update(status="failed", summary=f"library is not a {spec.arch} shared object: {elf_problem}",
                      errors=[elf_problem])
        return result
    if mode != "host":  # qemu emulation or a board over TVM RPC
        from graphgen.emulate import verify_elsewhere

        return verify_elsewhere(mode, lib_path, spec, model, result, tolerance=tolerance, seed=seed, remote=remote,
                                progress=progress, build_info=build_info)
    if spec.arch == "cuda":
        return _verify_cuda(lib_path, spec, model, result, tolerance, seed)
    if not spec.host_runnable:
        result.update(status="not_executed", ran_on=None,
                      summary=f"{spec.arch} ELF shared object checked ({_elf_brief(elf)}); not executed on this "
                              f"{platform.machine()} host" + ("; --verify emulate runs it under qemu, --rpc on a board"
                                                             if spec.arch in ("aarch64", "armv7") else ""))
        return result
    inputs = random_inputs(model, seed)
    expected = run_onnxruntime(model, inputs)
    try:
        got = run_library(lib_path, spec, model, inputs)
    except Exception as e:
        result.update(status="failed", summary=f"running the library failed: {e}", errors=[str(e)])
        return result
    c = compare(got, expected, [o.name for o in model.graph.output], tolerance)
    result.update(status="passed" if c.ok else "failed", ran_on=f"this host ({platform.machine()}), TVM Relax VM",
                  rel_l2=c.rel_l2, max_abs=c.max_abs, summary=c.summary())
    if c.detail:
        result["errors"].append(c.detail)
    return result


def _elf_brief(elf: dict) -> str:
    s = f"{elf['machine']}, {elf['bits']}-bit"
    if "float_abi" in elf:
        s += f", {elf['float_abi']}-float ABI"
    return s


def _verify_cuda(lib_path, spec, model, result, tolerance, seed) -> dict:
    from graphgen.compile.cuda import fatbin_archs

    data = Path(lib_path).read_bytes()
    entries = fatbin_archs(data)
    want = int(spec.details["arch"].split("_")[1].rstrip("af"))
    result["device_code"] = entries
    problems = []
    if not any(e["kind"] == "elf" and e["sm"] == want for e in entries):
        problems.append(f"no sm_{want} device code in the library")
    if b"__global__" in data:
        problems.append("CUDA source found in the library")
    if problems:
        result.update(status="failed", summary="; ".join(problems), errors=problems)
        return result
    import tvm

    has_gpu = False
    try:
        has_gpu = bool(tvm.cuda(0).exist)
    except Exception:
        has_gpu = False
    if not has_gpu:
        result.update(status="not_executed", ran_on=None,
                      summary=f"embedded device code for sm_{want} checked; no CUDA GPU on this host, not executed")
        return result
    inputs = random_inputs(model, seed)
    expected = run_onnxruntime(model, inputs)
    lib = tvm.runtime.load_module(str(lib_path))
    from tvm import relax

    vm = relax.VirtualMachine(lib, tvm.cuda(0))
    from graphgen.verify import graph_inputs

    args = [tvm.runtime.tensor(inputs[v.name], tvm.cuda(0)) for v in graph_inputs(model)]
    from graphgen.compile.tvm_build import _flatten

    got = [o.numpy() for o in _flatten(vm["main"](*args))]
    c = compare(got, expected, [o.name for o in model.graph.output], tolerance)
    result.update(status="passed" if c.ok else "failed", ran_on=f"CUDA GPU {tvm.cuda(0).device_name}",
                  rel_l2=c.rel_l2, max_abs=c.max_abs, summary=c.summary())
    return result


def info(model: str, *, input_size=None, num_classes: int | None = None, options: dict | None = None):
    """Per-layer table (name, op, output shape, params, multiply-adds, memory access cost) and totals.

    Returns (rows, totals) of :mod:`graphgen.analysis`. Recipes are built shape-only (no weight data),
    so even the largest networks answer in a fraction of a second.
    """
    from graphgen.analysis import layer_table, totals
    from graphgen.registry import build_recipe

    if is_onnx_path(model):
        if input_size is not None or num_classes is not None:
            raise UserError("--input-size and --num-classes apply to recipes, not to .onnx files")
        rows = layer_table(load_onnx_file(model))
    else:
        g = build_recipe(model, input_size=input_size, num_classes=num_classes, shape_only=True, **(options or {}))
        rows = layer_table(g.model, set(g.parameter_names))
    return rows, totals(rows)


def verify(model: str | Path, target: str | dict | None = None, *, mode: str = "host", rpc: str | None = None,
           rpc_tracker: str | None = None, rpc_key: str | None = None, tolerance: float | None = None,
           progress=_quiet, **build_options) -> BuildResult:
    """Verify a build folder again (``mode`` "host", "emulate" or "rpc"; the result goes into its manifest),
    or, for a recipe name or .onnx file, build it with that verification (``build_options`` as for build)."""
    from graphgen.emulate import verify_artifact

    if Path(str(model)).is_dir():
        if target is not None or build_options:
            raise UserError(f"{model} is a build folder: its target and options come from its manifest")
        return verify_artifact(model, mode, rpc=rpc, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                               tolerance=tolerance, progress=progress)
    return build(str(model), target or "x86", verify=mode, rpc=rpc, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                 tolerance=tolerance if tolerance is not None else DEFAULT_TOLERANCE, progress=progress,
                 **build_options)


def optimize_file(path: str | Path, out: str | Path, *, passes: list[str] | None = None, verify: bool = True,
                  tolerance: float = DEFAULT_TOLERANCE):
    """Optimize any ONNX file into ``out`` (``graphgen optimize``); returns the OptimizeResult
    (``.format()`` is the per-op-type report). With ``verify`` each pass is checked against the
    graph before it on onnxruntime (PassEquivalenceError names a pass that changes outputs)."""
    from graphgen.optimize import optimize

    if not str(out).lower().endswith(".onnx"):
        raise UserError(f"-o {out}: the output file must end in .onnx")
    model = load_onnx_file(path)
    res = optimize(model, passes=passes, verify=verify, tolerance=tolerance)
    save_onnx(res.model, out)
    return res


def list_models(stats: bool = True) -> list[dict]:
    """Every recipe with family, source, default input size and (with ``stats``) params and multiply-adds."""
    from graphgen.analysis import layer_table, totals
    from graphgen.registry import build_recipe, recipes

    rows = []
    for r in recipes():
        row = {"name": r.name, "family": r.family, "source": r.source, "input_size": list(r.input_size),
               "aliases": list(r.aliases), "description": r.doc}
        if stats:
            g = build_recipe(r.name, shape_only=True)
            row["params"] = g.parameter_count
            try:
                row["macs"] = totals(layer_table(g.model, set(g.parameter_names)))["macs"]
            except UserError:
                row["macs"] = None  # a graph ONNX shape inference cannot follow
        rows.append(row)
    return rows
