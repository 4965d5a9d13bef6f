"""Latency of a graphgen library against onnxruntime (and OpenVINO when installed), in one process.

    graphgen bench squeezenet1_1 --target x86 [--tuned]

Every runtime gets the same optimized ``model.onnx`` graphgen compiles, the same input and
the same number of threads (the host's physical cores unless ``--threads``). After a
warm-up the runtimes are timed in interleaved rounds (a burst of load on the host then hits
them all alike), each runtime starting a round in turn (:func:`round_orders`: the position
in a round counts by a few percent), and the median of the single-run latencies is reported
with the 10th and 90th percentiles. Each graphgen library is checked against onnxruntime first (relative L2,
the build's rule), so a fast wrong library never makes the table.

Speed is reported here, never asserted in a test: timings on a shared machine are noisy,
and the table says what the machine was doing (its load average) when they were taken.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from graphgen.errors import UserError

#: seconds of timed runs per runtime when ``runs`` is not given
DEFAULT_SECONDS = 2.0
#: interleaved timing rounds at least (rounded up to a multiple of the runtimes, see :func:`round_orders`)
ROUNDS = 5
SEGMENT_WARMUP = 3


def host_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001
        physical = None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical,
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform()}


#: the cores TVM's pool was configured over by :func:`set_tvm_threads` (its first: the caller's)
_pool_cores: list[int] = []


def _allowed_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def set_tvm_threads(n: int) -> None:
    """Make TVM's thread pool run ``n`` threads, one per core this process may use: thread
    ``i`` (the caller's share is thread 0) on the ``i``-th of those cores. Run the library
    inside :func:`tvm_caller_pinned` so the calling thread takes the first core.

    TVM's default pool size halves the logical core count on x86 (it assumes hyper-threads),
    and "big cores" mode (``config_threadpool(1, n)``) cannot grow the pool past that default:
    both left a 2-core VM without hyper-threads at one thread (measured: SqueezeNet 12.6 ms
    at "2 threads", 6.2 ms with two real ones). Threads that share all cores (mode -3) are
    sized right but float: between kernels TVM's worker sleeps, and Linux wakes it on the
    caller's core, where the two then take turns while the other core idles - for seconds at a
    time (measured, two threads, TVM alone in the process: SqueezeNet 1.1 flipping between
    3.8-4.9 ms and 8.1-9.7 ms, its one-thread time, with one core idle). One core per thread
    (mode -2) with the caller on the first removes that co-location; slow phases from outside
    the process (both cores about half busy, the threads taking turns) remain on this VM.
    """
    import tvm  # noqa: F401 - registers the runtime's global functions
    import tvm_ffi

    cpus = _allowed_cores()
    _pool_cores[:] = cpus
    mode = -2 if int(n) <= len(cpus) else -3  # more threads than cores: they must share
    tvm_ffi.get_global_func("runtime.config_threadpool")(mode, int(n), [str(c) for c in cpus])


def pin_caller_to_pool() -> set[int] | None:
    """Pin the calling thread to the first core of TVM's pool (see :func:`set_tvm_threads`);
    returns its affinity before, or None when there is nothing to pin (no pool configured, or
    no thread affinity on this OS)."""
    if not _pool_cores or not hasattr(os, "sched_setaffinity"):
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {_pool_cores[0]})
    return before


@contextlib.contextmanager
def tvm_caller_pinned():
    """The calling thread on the first core of TVM's pool while inside, its own affinity again
    after: another runtime's threads created or run outside (onnxruntime's pool inherits its
    creator's affinity) keep every core."""
    before = pin_caller_to_pool()
    try:
        yield
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)


def _tvm_runner(lib_path: Path, inputs: dict, model):
    import tvm
    from tvm import relax

    from graphgen.verify import graph_inputs

    lib = tvm.runtime.load_module(str(lib_path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[v.name])) for v in graph_inputs(model)]
    fn = vm["main"]

    def run():
        out = fn(*args)
        return out

    return run


def kernel_times(lib_path: Path, inputs: dict, model, runs: int, warmup: int = 10) -> list[tuple[str, float]]:
    """Each kernel call of one run of the library at ``lib_path`` on ``inputs``, in run order:
    (the kernel's name, its median time in seconds over ``runs`` runs), timed through the VM's
    instrument hook (a few microseconds of its own per call), the caller pinned as
    :func:`bench` pins it. The VM's own builtins are rows too (``vm.builtin.*``)."""
    import tvm
    from tvm import relax

    from graphgen.verify import graph_inputs

    lib = tvm.runtime.load_module(str(lib_path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[v.name])) for v in graph_inputs(model)]
    fn = vm["main"]
    calls: list[tuple[str, float]] = []
    started: list[float] = []

    def instrument(func, name, before_run, ret_value, *a):
        if before_run:
            started.append(time.perf_counter())
        else:
            calls.append((str(name), time.perf_counter() - started.pop()))
        return 0

    per_site: dict[int, list[float]] = defaultdict(list)
    names: dict[int, str] = {}
    with tvm_caller_pinned():
        for _ in range(warmup):
            fn(*args)
        vm.set_instrument(instrument)
        for _ in range(runs):
            calls.clear()
            fn(*args)
            for i, (name, dt) in enumerate(calls):
                names[i] = name
                per_site[i].append(dt)
    return [(names[i], statistics.median(per_site[i])) for i in sorted(names)]


def _ort_runner(model, inputs: dict, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, inputs)


def _openvino_runner(onnx_path: Path, inputs: dict, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                          "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    feed = {k: v for k, v in inputs.items()}
    return lambda: req.infer(feed), ov.__version__


def _placement(label: str):
    """Where the timing thread runs for ``label``: graphgen's libraries with the caller on the
    first core of TVM's pool (:func:`tvm_caller_pinned`), the other runtimes as they place
    themselves."""
    return tvm_caller_pinned() if label.startswith("graphgen") else contextlib.nullcontext()


def _time(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench(model: str, target: str | dict = "x86", *, cpu: str | None = None, tuned: bool = False, db=None,
          runs: int | None = None, warmup: int = 5, threads: int | None = None, input_size=None,
          num_classes: int | None = None, options: dict | None = None, progress=None) -> dict:
    """Build ``model`` for this host (untuned, and with the tuning database when ``tuned``) and time it
    against onnxruntime and OpenVINO (when installed). Returns a dict (see :func:`format_table`)."""
    import onnxruntime
    import tvm

    from graphgen.api import load_model, save_onnx
    from graphgen.compile import compile_model, resolve_target, run_library
    from graphgen.optimize import optimize
    from graphgen.tune import database_for
    from graphgen.tune.pipeline import num_cores_for
    from graphgen.verify import DEFAULT_TOLERANCE, compare, random_inputs, run_onnxruntime

    say = progress or (lambda msg: None)
    spec = resolve_target(target, cpu=cpu, threads=threads)
    if not spec.host_runnable or spec.arch == "cuda":
        raise UserError(f"bench runs on this host: {spec.name} code does not run here")
    threads = num_cores_for(spec)
    host = host_description()
    src = load_model(model, input_size=input_size, num_classes=num_classes, options=options)
    opt = optimize(src.model).model
    inputs = random_inputs(opt, 0)
    expected = run_onnxruntime(opt, inputs)
    out_names = [o.name for o in opt.graph.output]
    macs = _macs(opt)
    result = {"model": src.name, "target": spec.name, "input_size": src.meta.get("input_size"), "threads": threads,
              "host": host, "macs": macs, "tvm_version": tvm.__version__, "runtimes": [], "checks": {}}
    db_path, db_spec = None, spec
    if tuned:
        db_path, db_spec = _tuned_database(spec, db, model, say)
        result["database"] = {"path": str(db_path), "threads": num_cores_for(db_spec)}
    set_tvm_threads(threads)
    runners: list[tuple[str, str, object]] = []
    with tempfile.TemporaryDirectory(prefix="graphgen-bench-") as tmp:
        onnx_path = save_onnx(opt, Path(tmp) / "model.onnx")
        builds = [("graphgen", None, spec)] + ([("graphgen tuned", db_path, db_spec)] if tuned else [])
        for label, database, build_spec in builds:
            say(f"compiling {label} library for {spec.name}")
            lib = Path(tmp) / f"{label.replace(' ', '_')}.so"
            # graphgen's default schedules on whatever the environment says: the untuned row is
            # what a default build ships
            info = compile_model(opt, build_spec, lib, database=database, log=say, default_schedules=True)
            got = run_library(lib, spec, opt, inputs)
            c = compare(got, expected, out_names, DEFAULT_TOLERANCE)
            result["checks"][label] = {"ok": c.ok, "summary": c.summary(), "schedules": info.get("schedules")}
            if not c.ok:
                say(f"{label}: does not match onnxruntime ({c.summary()}); left out of the timing")
                continue
            runners.append((label, f"TVM {tvm.__version__}", _tvm_runner(lib, inputs, opt)))
        runners.append(("onnxruntime", f"onnxruntime {onnxruntime.__version__}", _ort_runner(opt, inputs, threads)))
        try:
            fn, ver = _openvino_runner(onnx_path, inputs, threads)
            runners.append(("openvino", f"OpenVINO {ver}", fn))
        except ImportError:
            result["openvino"] = "not installed"
        except Exception as e:  # noqa: BLE001 - a runtime that cannot take the model is reported, not fatal
            result["openvino"] = f"failed: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__}"

        say(f"timing {', '.join(r[0] for r in runners)} ({threads} threads, load average "
            f"{host['load_average']})")
        times: dict[str, list[float]] = {}
        per_round: dict[str, int] = {}
        orders = round_orders(len(runners), ROUNDS)
        for label, _, fn in runners:
            with _placement(label):
                _time(fn, max(1, warmup))
                probe = statistics.median(_time(fn, 3))
            n = runs if runs is not None else int(min(200, max(10, DEFAULT_SECONDS / max(probe, 1e-6))))
            per_round[label] = max(1, -(-n // len(orders)))
            times[label] = []
        for order in orders:
            for label, _, fn in (runners[i] for i in order):
                # untimed runs first: the runtime timed before this one leaves its worker threads
                # spinning for a while (TVM's and onnxruntime's pools both spin before sleeping),
                # and with as many threads as cores they take this runtime's cores (measured:
                # onnxruntime 2 threads 4.4 ms alone, 18 ms interleaved without these runs)
                with _placement(label):
                    _time(fn, SEGMENT_WARMUP)
                    times[label].extend(_time(fn, per_round[label]))
    ort_median = statistics.median(times["onnxruntime"]) if "onnxruntime" in times else None
    for label, version, _ in runners:
        ts = times[label]
        med = statistics.median(ts)
        row = {"runtime": label, "version": version, "median_ms": round(med * 1e3, 3),
               "p10_ms": round(_percentile(ts, 10) * 1e3, 3), "p90_ms": round(_percentile(ts, 90) * 1e3, 3),
               "runs": len(ts), "vs_onnxruntime": round(med / ort_median, 2) if ort_median else None}
        if macs:
            row["gflops"] = round(2 * macs / med / 1e9, 1)
        result["runtimes"].append(row)
    if macs:
        ceiling = sgemm_ceiling(threads)
        result["sgemm_gflops"] = round(ceiling, 1)
        for row in result["runtimes"]:
            row["of_sgemm"] = round(row["gflops"] / ceiling, 2)
    result["host"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") \
        else None
    return result


def round_orders(runtimes: int, rounds: int) -> list[list[int]]:
    """The order the runtimes are timed in, per round: each starts the round in turn, so every
    runtime is timed in every position equally often (``rounds`` rounded up to a multiple of
    ``runtimes``). In a fixed order the position counts: two copies of one library, timed
    first and second in every round, measured 2.6-3 % apart for ResNet-18 and 0.7-1.6 % for
    SqueezeNet (Xeon, one thread), the second the faster, which credited the tuned library
    (always second) with a gain it did not have."""
    rounds = -(-rounds // runtimes) * runtimes
    return [[(r + i) % runtimes for i in range(runtimes)] for r in range(rounds)]


def _tuned_database(spec, db, model: str, say):
    """The tuning database a ``--tuned`` row is built with, and the target spec it was tuned for:
    ``db`` when given; else the one tuned at the row's thread count; else, when none was tuned
    at that count, the one tuned at the default count (said, and recorded in the result: its
    schedules were chosen by timings at another thread count)."""
    from graphgen.compile.targets import threads_text
    from graphgen.tune import database_for, default_count_database
    from graphgen.tune.pipeline import num_cores_for

    path = database_for(spec, db)
    if path.exists():
        return path, spec
    other = default_count_database(spec) if db is None else None
    if other is not None:
        fallback, default_spec = other
        say(f"no tuning database tuned at {threads_text(num_cores_for(spec))} ({path.name}); using the one tuned "
            f"at {threads_text(num_cores_for(default_spec))} ({fallback.name})")
        return other
    threads = spec.details.get("threads")
    raise UserError(f"--tuned: no tuning database at {path}; run `graphgen tune {model} --target {spec.name}"
                    + (f" --threads {threads}" if threads else "") + "` first")


def sgemm_ceiling(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """GFLOP/s of onnxruntime's own fp32 matrix multiply (MLAS, n x n x n) at ``threads`` threads.

    A practical ceiling for fp32 convolution on this host: a direct convolution does the same
    multiply-adds as a GEMM with worse data reuse, so neither runtime can run a model's
    MACs faster than this without an algorithm that does fewer of them (Winograd, FFT).
    Reported next to each runtime's GFLOP/s so a latency ratio can be read against what the
    machine can do.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "sgemm", [a], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"a": np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)}
    _time(lambda: sess.run(None, feed), 3)
    ts: list[float] = []
    while sum(ts) < seconds or len(ts) < 5:
        ts.extend(_time(lambda: sess.run(None, feed), 1))
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def _macs(model) -> int | None:
    try:
        from graphgen.analysis import layer_table, totals

        return int(totals(layer_table(model))["macs"])
    except Exception:  # noqa: BLE001 - the table is still useful without it
        return None


def format_table(res: dict) -> str:
    h = res["host"]
    size = "x".join(map(str, res["input_size"])) if res.get("input_size") else ""
    lines = [f"{res['model']} {size} on {res['target']} ({h['cpu']}, {res['threads']} threads, load average "
             f"{h['load_average']} -> {h.get('load_average_after')})",
             f"{'runtime':<16} {'median ms':>10} {'p10':>9} {'p90':>9} {'runs':>5} {'vs ORT':>7} {'GFLOP/s':>8} "
             f"{'of sgemm':>8}"]
    for r in res["runtimes"]:
        lines.append(f"{r['runtime']:<16} {r['median_ms']:>10.3f} {r['p10_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                     f"{r['runs']:>5} {r['vs_onnxruntime'] if r['vs_onnxruntime'] is not None else '':>7} "
                     f"{r.get('gflops', ''):>8} {r.get('of_sgemm', ''):>8}")
    if res.get("sgemm_gflops"):
        lines.append(f"sgemm ceiling: onnxruntime's 1024^3 fp32 MatMul runs at {res['sgemm_gflops']} GFLOP/s with "
                     f"{res['threads']} threads here (2 x MACs / time, as the GFLOP/s column)")
    for label, c in res["checks"].items():
        s = c.get("schedules") or {}
        lines.append(f"{label}: {c['summary']}; kernels {s.get('kernels')}: {s.get('from_database', 0)} from the "
                     f"database, {s.get('default_schedule', 0)} default schedules, {s.get('plain_lowering', 0)} plain")
    if res.get("openvino"):
        lines.append(f"openvino: {res['openvino']}")
    return "\n".join(lines)


def plot(results: list[dict], path: str | Path) -> Path | None:
    """Grouped bars (median latency, p10-p90 whiskers) per model; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = []
    for res in results:
        for r in res["runtimes"]:
            if r["runtime"] not in labels:
                labels.append(r["runtime"])
    models = [r["model"] for r in results]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(models) * max(1, len(labels)) / 2), 4.0))
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        xs, ys, lo, hi = [], [], [], []
        for i, res in enumerate(results):
            row = next((r for r in res["runtimes"] if r["runtime"] == label), None)
            if row is None:
                continue
            xs.append(i + (j - (len(labels) - 1) / 2) * width)
            ys.append(row["median_ms"])
            lo.append(row["median_ms"] - row["p10_ms"])
            hi.append(row["p90_ms"] - row["median_ms"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=label)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=15)
    ax.set_ylabel("median latency, ms (whiskers p10-p90)")
    ax.set_yscale("log")
    h = results[0]["host"] if results else {}
    ax.set_title(f"batch 1, fp32, {results[0]['threads'] if results else ''} threads; {h.get('cpu', '')}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
