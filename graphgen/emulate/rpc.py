"""Running a library on a board (or an emulated one) through TVM RPC.

The board runs ``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`` (optionally
``--tracker HOST:PORT --key KEY``) with a runtime-only TVM; this side uploads ``model.so``,
loads it there, drives the Relax VM remotely and fetches the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphgen.errors import GraphgenError, UserError

CONNECT_TIMEOUT = 10.0
SESSION_TIMEOUT = 900


class RemoteError(GraphgenError):
    """The RPC server or tracker cannot be reached or refuses the session (exit code 1)."""


@dataclass(frozen=True)
class RemoteSpec:
    """Where to run: a server (``rpc``) or a tracker plus device key."""

    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None

    def describe(self) -> str:
        if self.rpc:
            return f"TVM RPC server {self.rpc}"
        return f"TVM RPC tracker {self.tracker}, key {self.key!r}"


def parse_hostport(text: str, option: str) -> tuple[str, int]:
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{option} {text!r}: expected HOST:PORT, e.g. 192.168.1.20:9090")
    return host.strip("[]"), int(port)


def remote_spec(rpc: str | None = None, tracker: str | None = None, key: str | None = None) -> RemoteSpec:
    """Validate the RPC options (UserError, one line, when they do not make sense)."""
    if rpc and tracker:
        raise UserError("give either --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key KEY, not both")
    if tracker and not key:
        raise UserError("--rpc-tracker needs --rpc-key KEY (the device key the board's server registered)")
    if key and not tracker:
        raise UserError("--rpc-key goes with --rpc-tracker HOST:PORT")
    if not rpc and not tracker:
        raise UserError("RPC verification needs --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key KEY")
    if rpc:
        parse_hostport(rpc, "--rpc")
    if tracker:
        parse_hostport(tracker, "--rpc-tracker")
    return RemoteSpec(rpc, tracker, key)


def _probe(host: str, port: int, what: str, hint: str) -> None:
    """Fail fast with one line when nothing listens (TVM itself retries for a minute)."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, (TimeoutError, socket.timeout)):
            reason = f"no answer within {CONNECT_TIMEOUT:.0f} s"
        raise RemoteError(f"cannot reach the {what} at {host}:{port} ({reason}); {hint}") from None


@contextlib.contextmanager
def _quiet_tvm_rpc_logs():
    loggers = [logging.getLogger(n) for n in ("RPCServer", "RPCTracker", "root", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def connect(spec: RemoteSpec, session_timeout: float = SESSION_TIMEOUT):
    """An RPC session, or RemoteError with one line saying what to do."""
    from tvm import rpc

    if spec.rpc:
        host, port = parse_hostport(spec.rpc, "--rpc")
        _probe(host, port, "TVM RPC server",
               f"start it on the board: python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}")
        try:
            return rpc.connect(host, port, session_timeout=session_timeout)
        except Exception as e:  # TVM raises its own error types with multi-line text
            raise RemoteError(f"the TVM RPC server at {host}:{port} refused the session: {_first_line(e)}") from None
    host, port = parse_hostport(spec.tracker, "--rpc-tracker")
    _probe(host, port, "TVM RPC tracker", f"start it: python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}")
    with _quiet_tvm_rpc_logs():
        try:
            tracker = rpc.connect_tracker(host, port)
            queue = tracker.summary().get("queue_info", {})
        except Exception as e:
            raise RemoteError(f"the TVM RPC tracker at {host}:{port} does not answer: {_first_line(e)}") from None
        if spec.key not in queue:
            known = ", ".join(sorted(queue)) or "none"
            raise RemoteError(f"no board with key {spec.key!r} is registered at the tracker {host}:{port} "
                              f"(registered keys: {known}); on the board run python -m tvm.exec.rpc_server "
                              f"--tracker {host}:{port} --key {spec.key}")
        try:
            if tracker._sock is not None:  # a busy board should not hang the build forever
                tracker._sock.settimeout(session_timeout)
            return tracker.request(spec.key, priority=1, session_timeout=session_timeout, max_retry=1)
        except Exception as e:
            raise RemoteError(f"the tracker at {host}:{port} gave no {spec.key!r} board: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:  # TVM puts "Check failed: ..." or "...Error: ..." after a traceback
        if "Error" in ln or "failed" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(e).__name__)[:300]


def run_remote(spec: RemoteSpec, lib_path: str | Path, arch: str, input_names: list[str],
               inputs: dict[str, np.ndarray], *, repeat: int = 3) -> tuple[list[np.ndarray], dict]:
    """Upload and run ``lib_path`` on the remote device; returns (outputs, facts)."""
    import tvm
    from tvm import relax

    from graphgen.artifact import sha256_file
    from graphgen.compile.tvm_build import _flatten

    t0 = time.perf_counter()
    sess = connect(spec)
    remote_name = f"graphgen-{sha256_file(Path(lib_path))[:16]}.so"
    try:
        sess.upload(str(lib_path), target=remote_name)
        rlib = sess.load_module(remote_name)
    except Exception as e:
        raise RemoteError(f"the board could not load the library ({_first_line(e)}); is it a {arch} board "
                          f"with TVM {tvm.__version__.split('.post')[0]}'s runtime?") from None
    dev = sess.cuda(0) if arch == "cuda" else sess.cpu(0)
    load_s = time.perf_counter() - t0
    try:
        vm = relax.VirtualMachine(rlib, dev)
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), dev) for n in input_names]
        out = _flatten(vm["main"](*args))
        outs = [o.numpy() for o in out]
        timer = vm.time_evaluator("main", dev, number=1, repeat=repeat)
        run_ms = float(np.min(timer(*args).results)) * 1e3
    except RemoteError:
        raise
    except Exception as e:
        raise RemoteError(f"running the library on the board failed: {_first_line(e)}") from None
    facts = {"load_s": round(load_s, 3), "run_ms": round(run_ms, 2), "remote_file": remote_name}
    return outs, facts


# ---------------------------------------------------------------- an emulated board (tests, dry runs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmulatedBoard:
    """An aarch64 TVM RPC server under qemu on 127.0.0.1: ``with EmulatedBoard(comp) as board: board.address``.

    ``tracker``: register with a tracker at HOST:PORT under ``key`` instead of only listening.
    """

    def __init__(self, component, port: int | None = None, tracker: str | None = None, key: str = "emulated-aarch64",
                 startup_timeout: float = 300.0):
        self.comp = component
        self.port = port or free_port()
        self.tracker = tracker
        self.key = key
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "EmulatedBoard":
        import tempfile

        from graphgen.emulate.env import _clean_env

        cmd = [str(self.comp.python), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(self.port),
               "--port-end", str(self.port + 1)]
        if self.tracker:
            cmd += ["--tracker", self.tracker, "--key", self.key]
        fd, log = tempfile.mkstemp(prefix="graphgen-rpc-server-", suffix=".log")
        self.log_path = Path(log)
        self.proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, env=_clean_env(),
                                     start_new_session=True)
        os.close(fd)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RemoteError(f"the emulated RPC server exited: {self._log_tail()}")
            text = self.log_path.read_text(errors="replace")
            if "bind to" in text and (not self.tracker or self._registered()):
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RemoteError(f"the emulated RPC server did not start within {self.startup_timeout:.0f} s")

    def _registered(self) -> bool:
        from tvm import rpc

        host, port = parse_hostport(self.tracker, "--rpc-tracker")
        try:
            with _quiet_tvm_rpc_logs():
                return self.key in rpc.connect_tracker(host, port).summary().get("queue_info", {})
        except Exception:
            return False

    def _log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path else []
        return lines[-1] if lines else "no output"

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # the server forks a worker per session: end the whole process group it leads
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)


class Tracker:
    """A TVM RPC tracker on 127.0.0.1 (host Python): ``with Tracker() as t: t.address``."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "Tracker":
        self.proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--port-end", str(self.port + 1)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise RemoteError("the RPC tracker did not start")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=20)
