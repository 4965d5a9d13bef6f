"""ONNX -> TVM Relax -> shared library, for CPU (x86, aarch64, armv7) and CUDA targets.

* Import with the Relax ONNX frontend after :func:`prepare_for_tvm` has rewritten the
  constructs TVM's importer gets wrong.
* Compile with the target's own Relax pipeline (``relax.get_default_pipeline``): for CPU
  that is the fusing pipeline; plain ``tvm.compile`` would leave conv, add and relu unfused.
* Link every CPU library with the lld that ships in the ``ziglang`` wheel, so cross
  targets need nothing but pip (no system cross-gcc).
* CUDA: TVM without a CUDA driver exports CUDA C *source* that would need a compiler on
  the device. We compile each kernel module ahead of time with nvcc into a fatbin for the
  requested arch and swap it into the packed import blob (see :mod:`graphgen.compile.cuda`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import onnx

from graphgen.compile.targets import TargetSpec
from graphgen.errors import BuildError, UserError


def prepare_for_tvm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite graph constructs TVM 0.27's ONNX importer rejects or gets wrong (one place for the quirks)."""
    ops = {n.op_type for n in model.graph.node}
    if "MaxUnpool" in ops or any(n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]
                                 for n in model.graph.node):
        from graphgen.compile.fix_maxunpool import rewrite_maxunpool_for_tvm

        model = rewrite_maxunpool_for_tvm(model)
    return model


def import_onnx(model: onnx.ModelProto, params_as_inputs: bool = False):
    import tvm.relax.frontend.onnx  # noqa: F401  (registers the frontend)
    from tvm import relax

    model = prepare_for_tvm(model)
    try:
        with warnings.catch_warnings():
            # the importer warns about value_info without shapes; our graphs are fully shaped
            warnings.simplefilter("ignore", UserWarning)
            return relax.frontend.onnx.from_onnx(model, keep_params_in_input=params_as_inputs)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise BuildError(f"TVM's ONNX importer failed: {msg[-1] if msg else type(e).__name__}") from e


def lld_fcompile(spec: TargetSpec):
    """An export_library fcompile that links objects with ziglang's ld.lld."""

    def fcompile(output, objects, options=None, **_):
        cmd = [sys.executable, "-m", "ziglang", "ld.lld", "-shared", "--build-id=sha1", "-o", str(output),
               *[str(o) for o in objects]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"linking {spec.name} library with ld.lld failed: "
                             f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")

    fcompile.output_format = "so"
    fcompile.get_target_triple = lambda: spec.triple
    return fcompile


def compile_model(model: onnx.ModelProto, spec: TargetSpec, out_path: str | Path, *, log=None,
                  params_as_inputs: bool = False, database=None, default_schedules: bool | None = None,
                  schedule_like: TargetSpec | None = None, winograd: str | None = None,
                  pointwise: bool | None = None, concat_in_place: bool | None = None) -> dict:
    """Compile ``model`` for ``spec`` and write a shared library to ``out_path``.

    Returns facts for the manifest (timings, how it was linked, CUDA device code).
    ``params_as_inputs`` (tests of very large models only) keeps the weights out of the
    library: the same kernels, called with the weights as extra arguments (repacked by the
    library on each call), which ``info["detached_params"]`` then holds in call order.
    CPU targets: every kernel gets the tuning ``database``'s schedule (a folder path, or None)
    when it has one, else graphgen's default schedule (see :mod:`graphgen.tune.pipeline`);
    ``info["schedules"]`` counts which. ``default_schedules=False`` with no database gives
    TVM's plain default pipeline; ``None`` means on unless the environment sets
    ``GRAPHGEN_DEFAULT_SCHEDULES=0``. ``schedule_like`` schedules the kernels as a build for
    that target would (see :func:`graphgen.tune.pipeline.compile_cpu`). ``winograd``: which 3x3
    convs become Winograd kernels on CPU targets (``auto``, ``off``, ``2``, ``4``; default the
    environment's ``GRAPHGEN_WINOGRAD``, else ``auto``; see :mod:`graphgen.tune.winograd`).
    ``pointwise``: whether 1x1 convs become pointwise GEMM kernels (default: yes unless the
    environment sets ``GRAPHGEN_POINTWISE=0``; see :mod:`graphgen.tune.pointwise`).
    ``concat_in_place``: whether the kernels producing a concat's pieces write them into its
    output (default: yes unless ``GRAPHGEN_CONCAT_IN_PLACE=0``; see
    :mod:`graphgen.tune.concat_inplace`).
    """
    import tvm
    from tvm import relax

    if default_schedules is None:
        # on by default: an untuned build must be usable (TVM's plain lowering is 25-100x slower
        # than onnxruntime); GRAPHGEN_DEFAULT_SCHEDULES=0 turns them off (e.g. to compare)
        default_schedules = os.environ.get("GRAPHGEN_DEFAULT_SCHEDULES", "1") != "0"
    log = log or (lambda msg: None)
    out_path = Path(out_path)
    info: dict = {}
    t0 = time.perf_counter()
    mod = import_onnx(model, params_as_inputs)
    if params_as_inputs:
        mod, detached = relax.frontend.detach_params(mod)
        info["detached_params"] = [p.numpy() for p in detached.get("main", [])]
    info["import_seconds"] = round(time.perf_counter() - t0, 3)
    target = spec.tvm_target()
    t1 = time.perf_counter()
    try:
        if spec.arch != "cuda" and (database is not None or default_schedules):
            from graphgen.tune.pipeline import compile_cpu

            # weights repacked for the schedules in both cases: folded into the constants, or with
            # params_as_inputs by repacking kernels the library runs on the weight arguments each
            # call (a test path; without repacking, channel-vectorized kernels gather every weight
            # vector from rows 100 KB apart: FCN-32s's 7x7 fc6 ran minutes instead of 0.07 s)
            executable = compile_cpu(mod, spec, database, default_schedules, info, log,
                                     layout_rewrite=True, schedule_like=schedule_like, winograd=winograd,
                                     pointwise=pointwise, concat_in_place=concat_in_place)
        else:
            pipeline = relax.get_default_pipeline(target)
            executable = tvm.compile(mod, target=target, relax_pipeline=pipeline)
            if spec.arch != "cuda":
                info["schedules"] = {"pipeline": "tvm-default", "database": None, "isa": None,
                                     "default_schedules": False, "layout_rewrite": False, "winograd": "off",
                                     "pointwise": False, "concat_in_place": False, "stack_tiles": False,
                                     "prefetch_weights": False}
    except UserError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise BuildError(f"TVM failed to compile for {spec.name}: {msg[-1] if msg else type(e).__name__}") from e
    info["compile_seconds"] = round(time.perf_counter() - t1, 3)
    t2 = time.perf_counter()
    if spec.arch == "cuda":
        from graphgen.compile.cuda import export_cuda_library

        info["cuda"] = export_cuda_library(executable, spec, out_path, lld_fcompile(spec), log=log)
    else:
        executable.export_library(str(out_path), fcompile=lld_fcompile(spec))
    info["link_seconds"] = round(time.perf_counter() - t2, 3)
    info["linker"] = "ziglang ld.lld"
    return info


def run_library(lib_path: str | Path, spec: TargetSpec, model: onnx.ModelProto, inputs: dict,
                extra_args: list | None = None) -> list:
    """Load a host-runnable library in TVM's Relax VM and run it on ``inputs`` (numpy, by input name)."""
    import numpy as np
    import tvm
    from tvm import relax

    from graphgen.verify import graph_inputs

    if not spec.host_runnable:
        raise UserError(f"a {spec.name} library cannot run on this host")
    lib = tvm.runtime.load_module(str(lib_path))
    dev = tvm.cpu() if spec.arch != "cuda" else tvm.cuda()
    vm = relax.VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[v.name]), dev) for v in graph_inputs(model)]
    # not np.ascontiguousarray: it turns 0-d scalars (detached scalar constants) into shape (1,)
    args += [tvm.runtime.tensor(a if a.flags.c_contiguous else a.copy(), dev)
             for a in map(np.asarray, extra_args or [])]
    out = vm["main"](*args)
    outs = _flatten(out)
    return [o.numpy() for o in outs]


def _flatten(value) -> list:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not hasattr(value, "numpy"):
        out = []
        for v in value:
            out.extend(_flatten(v))
        return out
    return [value]
