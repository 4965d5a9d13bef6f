"""Whole-model runs of an aarch64 library under qemu user-mode emulation (TVM runtime from PyPI)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from graphgen.emulate.env import Component, EmulationError, _clean_env, _last_line

GUEST_RUNNER = Path(__file__).with_name("_guest_run.py")
DEFAULT_TIMEOUT = 900


class GuestRunError(EmulationError):
    """The emulated program ran and failed (the library's fault or the environment's)."""


def run_aarch64(comp: Component, lib_path: str | Path, input_names: list[str], inputs: dict[str, np.ndarray],
                *, repeat: int = 2, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[np.ndarray], dict]:
    """Run ``lib_path`` in the Relax VM of the emulated aarch64 Python; returns (outputs, facts)."""
    with tempfile.TemporaryDirectory(prefix="graphgen-emu-") as tmp:
        tmp = Path(tmp)
        in_path, out_path = tmp / "inputs.npz", tmp / "outputs.npz"
        np.savez(in_path, __order__=np.array(input_names), **{n: inputs[n] for n in input_names})
        cmd = [str(comp.python), str(GUEST_RUNNER), str(Path(lib_path).resolve()), str(in_path), str(out_path),
               str(repeat)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_clean_env(), cwd=tmp)
        except subprocess.TimeoutExpired as e:
            raise GuestRunError(f"the emulated run did not finish within {timeout:.0f} s") from e
        if proc.returncode != 0:
            raise GuestRunError(f"the emulated aarch64 run failed (exit code {proc.returncode}): "
                                f"{_last_line(proc.stderr or proc.stdout)}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GRAPHGEN_RESULT ")]
        if not lines or not out_path.is_file():
            raise GuestRunError(f"the emulated aarch64 run wrote no result: {_last_line(proc.stderr or proc.stdout)}")
        facts = json.loads(lines[-1].split(" ", 1)[1])
        with np.load(out_path, allow_pickle=False) as z:
            outs = [z[f"arr_{i}"] for i in range(len(z.files))]
    return outs, facts
