"""Running ARM libraries where they can run: under qemu user-mode emulation, or on a board via TVM RPC.

Verification modes (``graphgen build --verify MODE``, ``graphgen verify``):

* ``host``     run on this machine when the target is this machine; otherwise check the ELF only.
* ``emulate``  arm (aarch64): the whole model in TVM's Relax VM (the aarch64 runtime from PyPI)
               under qemu-aarch64; armv7: every compiled kernel under qemu-arm, one by one and
               chained (PyPI has no armv7 TVM runtime, so the VM itself does not run; see
               :mod:`graphgen.emulate.kernels`).
* ``rpc``      the whole model on a board running ``python -m tvm.exec.rpc_server``.

Each compares with onnxruntime on this host, on the same seeded inputs as a host build, with
the same rule (relative L2 per output below the tolerance); the result, including what was
and was not executed, goes into the manifest's ``verification``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from graphgen.emulate.env import Component, EmulationError, cache_root, check_component, ensure
from graphgen.emulate.rpc import RemoteError, RemoteSpec, remote_spec
from graphgen.errors import UserError, VerificationError

MODES = ("host", "emulate", "rpc")

__all__ = ["MODES", "EmulationError", "RemoteError", "RemoteSpec", "cache_root", "check_component", "check_mode",
           "ensure", "verify_elsewhere", "verify_artifact"]


def check_mode(mode: str, spec, rpc: str | None = None, rpc_tracker: str | None = None,
               rpc_key: str | None = None) -> tuple[str, RemoteSpec | None]:
    """Validate a verification mode for a target before anything is built; returns (mode, remote)."""
    mode = (mode or "host").lower()
    if mode == "host" and (rpc or rpc_tracker):
        mode = "rpc"  # --rpc alone means "verify there"
    if mode not in MODES:
        raise UserError(f"unknown verification mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "emulate":
        if rpc or rpc_tracker or rpc_key:
            raise UserError("--rpc options go with --verify rpc, not emulate")
        if spec.arch not in ("aarch64", "armv7"):
            raise UserError(f"emulation is for the arm and armv7 targets; a {spec.name} library "
                            + ("runs on this host: verify it without emulation" if spec.host_runnable else
                               "cannot be emulated here (verify it on a device with --rpc)"))
        return mode, None
    if mode == "rpc":
        return mode, remote_spec(rpc, rpc_tracker, rpc_key)
    if rpc_key:
        raise UserError("--rpc-key goes with --rpc-tracker HOST:PORT")
    return mode, None


def _input_names(model) -> list[str]:
    from graphgen.verify import graph_inputs

    return [v.name for v in graph_inputs(model)]


def _finish(result: dict, got, expected, model, tolerance) -> dict:
    from graphgen.verify import compare

    c = compare(got, expected, [o.name for o in model.graph.output], tolerance)
    result.update(status="passed" if c.ok else "failed", rel_l2=c.rel_l2, max_abs=c.max_abs, summary=c.summary())
    if c.detail:
        result["errors"].append(c.detail)
    return result


def verify_elsewhere(mode: str, lib_path: Path, spec, model, result: dict, *, tolerance: float, seed: int,
                     remote: RemoteSpec | None = None, progress=None, build_info: dict | None = None) -> dict:
    """Fill ``result`` (verify_library's dict, ELF already checked) by running in ``mode``.

    ``build_info`` is the build's manifest ``build`` section: the armv7 kernel check compiles
    its host reference with the same schedules (``build_info["schedules"]``)."""
    from graphgen.verify import random_inputs, run_onnxruntime

    progress = progress or (lambda msg: None)
    inputs = random_inputs(model, seed)
    expected = run_onnxruntime(model, inputs)
    names = _input_names(model)
    result["mode"] = mode
    if mode == "rpc":
        from graphgen.emulate.rpc import run_remote

        progress(f"      running on the {remote.describe()}")
        got, facts = run_remote(remote, lib_path, spec.arch, names, inputs)
        result.update(ran_on=f"{remote.describe()}: whole model, TVM Relax VM on the board", scope="whole model",
                      executed=["the whole model (Relax VM and every kernel) on the remote device"],
                      not_executed=[], timing={"load_s": facts["load_s"], "run_ms": facts["run_ms"],
                                               "note": "measured on the device by TVM's time_evaluator"},
                      remote={"rpc": remote.rpc, "tracker": remote.tracker, "key": remote.key})
        result = _finish(result, got, expected, model, tolerance)
        result["summary"] = f"whole model on the {remote.describe()}: {result['summary']}"
        return result
    if spec.arch == "aarch64":
        return _emulate_aarch64(lib_path, model, result, names, inputs, expected, tolerance, progress)
    return _emulate_armv7(lib_path, model, result, inputs, expected, tolerance, progress, spec,
                          (build_info or {}).get("schedules"))


def _emulate_aarch64(lib_path, model, result, names, inputs, expected, tolerance, progress) -> dict:
    from graphgen.emulate.qemu import run_aarch64

    comp = ensure(["aarch64"], progress)["aarch64"]
    progress(f"      running under {comp.stamp.get('qemu_version', 'qemu-aarch64')} (emulated aarch64 Python)")
    t0 = time.perf_counter()
    out, comp, error = _run_checked(lambda c: run_aarch64(c, lib_path, names, inputs), comp, progress)
    if error is not None:
        result.update(status="failed", ran_on=f"{comp.stamp.get('qemu_version')} (aarch64 emulation)",
                      scope="whole model", summary=f"the library failed under qemu-aarch64 emulation: {error}",
                      errors=[error], emulator=comp.describe())
        return result
    got, facts = out
    wall = time.perf_counter() - t0
    pk = comp.stamp.get("python_packages", {})
    result.update(
        ran_on=f"{comp.stamp.get('qemu_version', 'qemu')} user-mode emulation of aarch64 Linux: "
               f"TVM Relax VM (apache-tvm {pk.get('apache-tvm')} aarch64 wheel, runtime only) in "
               f"{comp.stamp.get('guest')}",
        scope="whole model",
        executed=["the whole model: Relax VM bytecode and every kernel, on the aarch64 TVM runtime, emulated"],
        not_executed=["real hardware: timings under emulation say nothing about the board's speed"],
        emulator={**comp.describe(), "guest_machine": facts.get("machine")},
        timing={"wall_s": round(wall, 2), "load_s": facts.get("load_s"), "first_run_ms": facts.get("first_run_ms"),
                "run_ms": facts.get("run_ms"), "note": "emulated (qemu), not the board's speed"})
    result = _finish(result, got, expected, model, tolerance)
    result["summary"] = f"whole model under qemu-aarch64 emulation: {result['summary']}"
    return result


def _emulate_armv7(lib_path, model, result, inputs, expected, tolerance, progress, spec=None,
                   schedules: dict | None = None) -> dict:
    from graphgen.emulate import kernels as K
    from graphgen.verify import compare

    names, missing_hooks = K.check_library_symbols(lib_path)
    vm_note = ("the Relax VM bytecode and the TVM runtime for armv7 (PyPI has no armv7 TVM runtime); for a "
               "whole-model run on a board: graphgen verify ... --rpc HOST:PORT")
    result.update(mode="emulate", scope="kernels", not_executed=[vm_note])
    if missing_hooks:
        result.update(status="not_executed", ran_on=None,
                      summary=f"armv7 ELF checked; kernels not run: the library calls runtime functions the kernel "
                              f"driver lacks ({', '.join(missing_hooks)})")
        result["not_executed"].insert(0, "the compiled kernels (" + ", ".join(missing_hooks) + ")")
        return result
    comp = ensure(["armv7"], progress)["armv7"]
    progress(f"      tracing the kernel calls on this host, then running each armv7 kernel under "
             f"{comp.stamp.get('qemu_version', 'qemu-arm')}")
    try:
        trace = K.trace_host(model, inputs, like=spec, schedules=schedules)
        called = sorted({c.name for c in trace.calls})
        absent = [n for n in called if n not in names]
        if absent:
            raise K.KernelCheckUnavailable(f"kernels of the host build are missing from the armv7 library "
                                           f"({', '.join(absent[:5])})")
        stream, layout = K.build_stream(trace)
        weights_found, weights_total = K.weights_in_library(trace, lib_path)
    except K.KernelCheckUnavailable as e:
        result.update(status="not_executed", ran_on=None, summary=f"armv7 ELF checked; kernels not run: {e}")
        result["not_executed"].insert(0, f"the compiled kernels ({e})")
        return result
    t0 = time.perf_counter()
    out, comp, error = _run_checked(lambda c: K.run_driver(c, lib_path, stream), comp, progress)
    if error is not None:
        result.update(status="failed", ran_on=f"{comp.stamp.get('qemu_version')} (armv7 emulation, kernel driver)",
                      summary=f"a kernel of the library failed under qemu-arm: {error}", errors=[error],
                      emulator=comp.describe())
        return result
    data, _ = out
    wall = time.perf_counter() - t0
    dumps = K.split_dumps(data, _dump_sizes(layout, trace))
    per_kernel: dict[str, dict] = {}
    failures = []
    for i, (c, outs) in enumerate(zip(trace.calls, layout["per_call"])):
        got = [_as_array(dumps[d], c.args[k]) for k, d in outs]
        want = [_as_array(c.post[k].tobytes(), c.args[k]) for k, _ in outs]
        cmp = compare(got, want, [f"{c.name}#{k}" for k, _ in outs], tolerance)
        rec = per_kernel.setdefault(c.name, {"calls": 0, "rel_l2": 0.0, "max_abs": 0.0})
        rec["calls"] += 1
        rec["rel_l2"] = max(rec["rel_l2"], max(cmp.rel_l2, default=0.0))
        rec["max_abs"] = max(rec["max_abs"], max(cmp.max_abs, default=0.0))
        if not cmp.ok:
            failures.append(f"call {i} {c.name}: {cmp.summary()}" + (f" ({cmp.detail})" if cmp.detail else ""))
    kernel_failures = len(failures)
    chained = [_as_array(dumps[d], o) for d, o in zip(layout["chained"], trace.outputs)]
    unused = [n for n in names if n not in per_kernel]
    worst = max((r["rel_l2"] for r in per_kernel.values()), default=0.0)
    result.update(
        ran_on=f"{comp.stamp.get('qemu_version', 'qemu-arm')} user-mode emulation of armv7 Linux (Debian "
               f"{comp.stamp.get('debian_suite')} armhf glibc): graphgen's kernel driver calling the library's "
               f"kernels, no TVM runtime",
        kernels={"compiled": len(names), "run": len(per_kernel), "calls": len(trace.calls),
                 "tolerance": tolerance, "worst_rel_l2": worst, "per_kernel": per_kernel,
                 "not_exercised": unused,
                 "reference": "the same kernel compiled for this x86 host, on the host run's inputs of that call"},
        chained={"reference": "onnxruntime", "external_bytes": layout["external_bytes"],
                 "note": "every kernel in the VM's call order on the driver's own results; only the model input "
                         "and the weights come from the host"},
        executed=[f"{len(per_kernel)} of {len(names)} compiled kernels ({len(trace.calls)} calls), each on the "
                  f"host run's inputs of that call, compared with the host's outputs",
                  "all kernel calls chained in the VM's order on armv7 results, final outputs compared with "
                  "onnxruntime"],
        weights={"found_in_library": weights_found, "total": weights_total,
                 "note": "the kernels ran on the weights of model.onnx (as the host run has them); each of these "
                         "tensors was found byte-for-byte in the armv7 library's constant data"},
        emulator=comp.describe(),
        timing={"wall_s": round(wall, 2), "note": "emulated (qemu), not the board's speed"})
    result["executed"].append(f"weights: {weights_found} of {weights_total} weight tensors found byte-for-byte in "
                              f"the library")
    if weights_found < weights_total:
        failures.append(f"{weights_total - weights_found} of {weights_total} weight tensors of model.onnx are not "
                        f"in the library (built from other weights?)")
    if layout["external_bytes"]:
        result["not_executed"].append(f"{layout['external_bytes']} bytes that VM builtins wrote between kernels "
                                      f"were taken from the host run in the chained pass")
    result = _finish(result, chained, expected, model, tolerance)
    result["chained"].update(rel_l2=result["rel_l2"], max_abs=result["max_abs"])
    if unused:  # compiled but dead: the VM does its work another way (e.g. a reshape as a view)
        result["not_executed"].append(f"{len(unused)} compiled kernel(s) the VM never calls: {', '.join(unused[:8])}")
    if failures:
        result["status"] = "failed"
        result["errors"] += failures[:20]
    result["summary"] = (
        f"kernel-level under qemu-arm: {len(per_kernel)} kernels ({len(trace.calls)} calls) "
        f"{'MISMATCH' if kernel_failures else 'match'} the host's (worst relative L2 {worst:.3g}); "
        f"chained: {result['summary']}; weights: {weights_found}/{weights_total} found in the library; "
        f"the armv7 Relax VM itself was not run (no armv7 TVM runtime)")
    return result


def _run_checked(run, comp: Component, progress):
    """``run(comp)`` -> (value, comp, None), or (None, comp, error line) when the emulated program failed.

    A failure may be a damaged cache (say a corrupt library in the sysroot): the component's binaries
    are then checked against their sha256, and a damaged component is rebuilt and the run retried
    once. A failure with an intact environment is the library's: it becomes a failed verification.
    """
    from graphgen.emulate.env import repair

    try:
        return run(comp), comp, None
    except EmulationError as e:
        fixed = repair(comp, progress)
        if fixed is None:
            return None, comp, str(e)
        comp = fixed
    try:
        return run(comp), comp, None
    except EmulationError as e:
        return None, comp, str(e)


def _dump_sizes(layout: dict, trace) -> list[int]:
    sizes: dict[int, int] = {}
    for c, outs in zip(trace.calls, layout["per_call"]):
        for k, d in outs:
            sizes[d] = c.args[k].nbytes
    for d, o in zip(layout["chained"], trace.outputs):
        sizes[d] = o.nbytes
    return [sizes[i] for i in range(len(sizes))]


def _as_array(raw: bytes, arg):
    import numpy as np

    return np.frombuffer(raw, dtype=np.dtype(arg.dtype)).reshape(arg.shape)


# ------------------------------------------------------------------------ existing artifact folders


def verify_artifact(folder: str | Path, mode: str = "host", *, rpc: str | None = None,
                    rpc_tracker: str | None = None, rpc_key: str | None = None, tolerance: float | None = None,
                    progress=None):
    """Verify a published build folder again (e.g. on a board) and record the result in its manifest.

    Returns an ``api.BuildResult``; raises VerificationError when the check fails (the failed
    result is still written to the manifest, the previous one is kept under ``previous``).
    """
    import onnx

    from graphgen.api import BuildResult, VERIFY_SEED, verify_library
    from graphgen.artifact import sha256_file, write_json
    from graphgen.compile import resolve_target
    from graphgen.verify import DEFAULT_TOLERANCE

    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"{folder} is not a graphgen build folder (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
        tinfo = manifest["target"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{mpath} is not a graphgen manifest ({type(e).__name__})") from e
    for name in ("model.onnx", "model.so"):
        rec = manifest.get("files", {}).get(name)
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} is missing")
        if rec and sha256_file(folder / name) != rec["sha256"]:
            raise VerificationError(f"{folder / name} differs from the manifest (sha256); it was changed after "
                                    f"the build: rebuild it")
    try:
        spec = resolve_target(tinfo["name"], cpu=tinfo.get("cpu"), arch=tinfo.get("arch") if tinfo["name"] == "cuda"
                              else None)
    except UserError:
        spec = resolve_target(tinfo["tvm"])
    mode, remote = check_mode(mode, spec, rpc, rpc_tracker, rpc_key)
    tol = tolerance if tolerance is not None else manifest.get("verification", {}).get("tolerance", DEFAULT_TOLERANCE)
    model = onnx.load(str(folder / "model.onnx"))
    v = verify_library(folder / "model.so", spec, model, tolerance=tol, seed=VERIFY_SEED, mode=mode,
                       remote=remote, progress=progress, build_info=manifest.get("build"))
    previous = manifest.get("verification") or {}
    v["previous"] = [{k: previous.get(k) for k in ("mode", "status", "summary", "ran_on")}] + previous.get(
        "previous", [])[:4]
    v["verified_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    v["verified_on"] = platform.platform()
    manifest["verification"] = v
    tmp = mpath.with_name(f".manifest.json.tmp-{os.getpid()}")
    write_json(tmp, manifest)
    os.replace(tmp, mpath)
    if v["status"] == "failed":
        raise VerificationError(f"{folder}: verification failed: {v['summary']}")
    return BuildResult(folder, manifest)
