"""Building and timing MetaSchedule candidates.

Builder: :class:`InProcessBuilder` compiles every candidate in the tuning process itself.
MetaSchedule's ``LocalBuilder`` starts a fresh pool of worker processes for every batch and
each worker re-imports ``tvm.s_tir.tensor_intrin`` (about 20 s on a loaded 2-core host); with
its 30 s timeout that measured 0 trials in 14 minutes here. In-process building pays the
import once. Candidates are linked into a shared object with the ``ziglang`` wheel's
``ld.lld`` (called directly, not through ``python -m ziglang``), so the same builder serves
cross targets whose board loads the ``.so`` over RPC.

Runner: MetaSchedule's ``LocalRunner`` (one long-lived worker process, so a candidate that
crashes or hangs cannot take the tuner down) or its ``RPCRunner`` through a TVM RPC tracker
for boards.

Timing (:data:`DEFAULT_EVALUATOR`): each run starts with the kernel's weights and output
flushed from the caches (TVM's ``cache_flush_cpu_non_first_arg``; the first argument, the
input, is left in cache, where the previous kernel of a model leaves it; TVM's runtime
flushes on x86 and aarch64, and on an armv7 board the runs stay warm). Back-to-back runs
on hot caches ranked some schedules the wrong way round. Measured on SqueezeNet 1.1 (ms, two
threads; warm -> flushed standalone; in the model): stem conv default 0.44 -> 0.44, 0.50;
a searched schedule 0.48 -> 0.80, 0.92. The search picked the second on its warm timing and
the tuned library was slower than the untuned one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from graphgen.compile.targets import TargetSpec

#: per-candidate timing: ``repeat`` single runs, each after flushing its weights and output
#: from the caches (a flush per run needs ``number`` 1 and no ``min_repeat_ms``)
DEFAULT_EVALUATOR = {"number": 1, "repeat": 10, "min_repeat_ms": 0, "enable_cpu_cache_flush": True}
#: how a database's records were timed (``meta.json`` "timing"); records timed otherwise do
#: not compare with these, so such a database is set aside
TIMING = "cache-flushed, 10 single runs"


def zig_binary() -> str:
    import ziglang

    return os.path.join(os.path.dirname(ziglang.__file__), "zig")


def make_fcompile(triple: str):
    """export_library fcompile linking objects into a shared library with lld (no system toolchain)."""
    zig = zig_binary()

    def fcompile(output, objects, options=None, **_):
        cmd = [zig, "ld.lld", "-shared", "-o", str(output), *[str(o) for o in objects]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError("ld.lld failed: " + (proc.stderr or proc.stdout).strip()[-300:])

    fcompile.output_format = "so"
    fcompile.get_target_triple = lambda: triple
    return fcompile


def _make_builder_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Compile candidates one after another in this process; artifacts are ``.so`` files."""

        def __init__(self, triple: str, work_dir: str):
            super().__init__()
            self.triple = triple
            self.work_dir = work_dir
            self.count = 0

        def build(self, build_inputs):
            import tvm
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

            from graphgen.tune import stack_tiles

            fcompile = make_fcompile(self.triple)
            results = []
            for bi in build_inputs:
                self.count += 1
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(bi.mod)
                    # the TIR pipeline the library is built with (compile_cpu), so a candidate is
                    # timed as it will run
                    rt_mod = tvm.compile(mod, target=bi.target, tir_pipeline=stack_tiles.register())
                    d = tempfile.mkdtemp(prefix=f"cand{self.count}-", dir=self.work_dir)
                    path = os.path.join(d, "cand.so")
                    rt_mod.export_library(path, fcompile=fcompile)
                    results.append(BuilderResult(path, None))
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - one candidate's failure is a measured fact
                    msg = str(e).strip().splitlines()
                    results.append(BuilderResult(None, "InProcessBuilder: " + (msg[-1] if msg else repr(e))))
            return results

    return InProcessBuilder


_BUILDER_CLASS = None


def in_process_builder(spec: TargetSpec, work_dir: str | Path):
    global _BUILDER_CLASS
    if _BUILDER_CLASS is None:
        _BUILDER_CLASS = _make_builder_class()
    return _BUILDER_CLASS(spec.triple, str(work_dir))


def evaluator_config(**overrides):
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    return EvaluatorConfig(**{**DEFAULT_EVALUATOR, **overrides})


def ignore_sigint() -> None:
    """Runner workers leave Ctrl-C to the tuner, which finishes the batch in flight and stops."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _init_runner_worker(threads: int | None) -> None:
    ignore_sigint()
    if threads:
        # candidates must run on as many threads as the built library will: TVM's default pool
        # halves the core count on x86 (assumed hyper-threads), which left a 2-core VM timing
        # every candidate on one thread
        from graphgen.bench import pin_caller_to_pool, set_tvm_threads

        set_tvm_threads(threads)
        pin_caller_to_pool()  # the worker only runs candidates: it stays on the pool's first core


def local_runner(timeout_s: float = 120.0, threads: int | None = None):
    """MetaSchedule's LocalRunner: a single worker process that lives for the whole session,
    its TVM thread pool set to ``threads``."""
    import functools

    from tvm.s_tir.meta_schedule.runner import LocalRunner

    return LocalRunner(timeout_sec=timeout_s, evaluator_config=evaluator_config(),
                       initializer=functools.partial(_init_runner_worker, threads))


def rpc_alloc_argument(session, device, args_info, alloc_repeat: int):
    """Allocate a candidate's arguments on the board, filled with random data.

    MetaSchedule fills them on the board with ``tvm.contrib.random.random_fill_for_measure``,
    which a runtime-only TVM (what a board installs; PyPI's aarch64 runtime trimmed to
    ``libtvm_runtime``) lacks: every trial then failed. The data is generated here and
    copied over instead when the board has no such function.
    """
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    try:
        fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
    except Exception:  # noqa: BLE001 - runtime-only board
        rng = np.random.default_rng(0)

        def fill(arg):
            shape = [int(x) for x in arg.shape]
            dtype = str(arg.dtype)
            if dtype.startswith("float"):
                data = rng.uniform(-1, 1, size=shape).astype(dtype)
            else:
                data = rng.integers(0, 8, size=shape).astype(dtype)
            arg.copyfrom(data)

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def parse_tracker(text: str) -> tuple[str, int]:
    from graphgen.errors import UserError

    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--rpc-tracker {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def rpc_runner(tracker: str, key: str, session_timeout_s: int = 120):
    """MetaSchedule's RPCRunner: candidates go to a board registered at a TVM RPC tracker."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    host, port = parse_tracker(tracker)
    cfg = RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=session_timeout_s)
    return RPCRunner(rpc_config=cfg, evaluator_config=evaluator_config(), max_workers=1, initializer=ignore_sigint,
                     f_alloc_argument=rpc_alloc_argument)


def check_tracker(tracker: str, key: str, timeout_s: float = 10.0) -> int:
    """How many servers with ``key`` the tracker lists; a one-line UserError when none or unreachable."""
    import threading

    from tvm import rpc

    from graphgen.errors import UserError

    host, port = parse_tracker(tracker)
    try:  # a plain connect first: TVM's own client retries every 5 s for a minute
        socket.create_connection((host, port), timeout=min(timeout_s, 5.0)).close()
    except OSError as e:
        raise UserError(f"cannot reach the RPC tracker at {host}:{port} ({e.strerror or e})") from e
    box: dict = {}

    def _query():
        try:
            box["summary"] = rpc.connect_tracker(host, port).summary()
        except Exception as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=_query, daemon=True)
    t.start()
    t.join(timeout_s)
    if "summary" not in box:
        why = str(box.get("error", "no answer")).strip().splitlines()
        raise UserError(f"cannot reach the RPC tracker at {host}:{port} ({why[-1][:120] if why else 'timeout'})")
    servers = [s for s in box["summary"].get("server_info", []) if str(s.get("key", "")).split(":")[-1] == key]
    queue = box["summary"].get("queue_info", {})
    if not servers and key not in queue:
        keys = sorted({str(s.get("key", "")).split(":")[-1] for s in box["summary"].get("server_info", [])})
        raise UserError(f"the RPC tracker at {host}:{port} has no server with key {key!r}"
                        + (f" (keys there: {', '.join(keys)})" if keys else " (no servers registered)"))
    return max(len(servers), int(queue.get(key, {}).get("free", 0)))


def clean(work_dir: str | Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
