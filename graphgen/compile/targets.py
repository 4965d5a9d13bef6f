"""Named compile targets -> TVM target JSON.

TVM 0.27 takes targets as JSON dicts only (CLI-style strings are refused), so every
named target here resolves to one, and a raw JSON dict (or a path to a .json file)
is accepted as-is.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from graphgen.errors import UnknownNameError, UserError

DEFAULT_ARM_CPU = "cortex-a72"
DEFAULT_ARMV7_CPU = "cortex-a7"
DEFAULT_CUDA_ARCH = "sm_80"
CUDA_ARCHS = ["sm_70", "sm_72", "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_120"]

X86_TRIPLE = "x86_64-linux-gnu"
AARCH64_TRIPLE = "aarch64-linux-gnu"
ARMV7_TRIPLE = "armv7a-linux-gnueabihf"

#: name -> (description, what --cpu/--arch means)
TARGETS = {
    "x86": "this host's x86-64 CPU (model detected), runs and is verified here",
    "x86-64-v3": "any x86-64 with AVX2/FMA (Haswell, Zen and newer)",
    "avx512": "x86-64 with AVX-512 (Skylake-SP, Ice Lake, Zen 4 and newer)",
    "arm": f"aarch64 Linux with NEON (--cpu, default {DEFAULT_ARM_CPU})",
    "armv7": f"32-bit ARMv7-A Linux, hard-float, NEON (--cpu, default {DEFAULT_ARMV7_CPU})",
    "cuda": f"NVIDIA GPU, ahead-of-time compiled device code (--arch, default {DEFAULT_CUDA_ARCH}), x86-64 host",
}

#: host CPU feature flags (from /proc/cpuinfo) each preset needs to run here
_PRESET_FLAGS = {
    "x86-64-v3": {"avx", "avx2", "fma", "bmi1", "bmi2"},
    "avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"},
}


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: its TVM JSON and what graphgen can do with it on this host."""

    name: str
    tvm_json: dict
    arch: str  # "x86_64", "aarch64", "armv7", "cuda"
    host_runnable: bool
    details: dict = field(default_factory=dict)

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.tvm_json)

    @property
    def triple(self) -> str:
        host = self.tvm_json.get("host", self.tvm_json)
        return host.get("mtriple", X86_TRIPLE)

    @property
    def slug(self) -> str:
        """Short name used in folder names (compiled/<model>-<slug>)."""
        return self.name


def _host_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _host_is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _check_cpu(cpu: str, triple: str, target: str) -> None:
    from tvm.target import codegen

    if not codegen.llvm_is_valid_cpu(cpu, triple):
        examples = {"arm": "cortex-a53, cortex-a55, cortex-a72, cortex-a76, neoverse-n1",
                    "armv7": "cortex-a7, cortex-a9, cortex-a15, cortex-a53",
                    }.get(target, "haswell, skylake, znver3")
        raise UnknownNameError(f"unknown --cpu {cpu!r} for target {target} (LLVM {triple}); e.g. {examples}")


def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def resolve_target(target: str | dict, cpu: str | None = None, arch: str | None = None,
                   threads: int | None = None) -> TargetSpec:
    """Turn a target name (see :data:`TARGETS`), a JSON string/dict or a .json path into a TargetSpec.

    ``threads``: the thread count the library is made for, written into the target JSON as
    TVM's ``num-cores`` (CPU targets only). Tuning measures at that count and the tuning
    database is kept per count (:mod:`graphgen.tune.database`): a kernel's best schedule on one
    thread is not its best on two (measured, ShuffleNetV2's 116 -> 116 conv at 14x14, tuned at
    two threads and run at one: 913 -> 1076 us). Default: the host's physical cores for host
    targets, 4 for boards (:func:`graphgen.tune.pipeline.num_cores_for`).
    """
    spec = _resolve(target, cpu, arch)
    if threads is None:
        return spec
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"--threads must be a whole number of at least 1, not {threads!r}")
    if spec.arch == "cuda":
        raise UserError("--threads applies to CPU targets; the cuda target runs on the GPU")
    return TargetSpec(spec.name, {**spec.tvm_json, "num-cores": threads}, spec.arch, spec.host_runnable,
                      {**spec.details, "threads": threads})


def threads_text(n: int) -> str:
    """"1 thread", "2 threads"."""
    return f"{n} thread{'' if n == 1 else 's'}"


def at_default_threads(spec: TargetSpec) -> TargetSpec:
    """``spec`` without the thread count :func:`resolve_target` gave it (the default count)."""
    if "threads" not in spec.details:
        return spec
    return TargetSpec(spec.name, {k: v for k, v in spec.tvm_json.items() if k != "num-cores"}, spec.arch,
                      spec.host_runnable, {k: v for k, v in spec.details.items() if k != "threads"})


def _resolve(target: str | dict, cpu: str | None, arch: str | None) -> TargetSpec:
    if isinstance(target, dict):
        return _from_json(target)
    text = str(target).strip()
    if text.startswith("{"):
        try:
            return _from_json(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"target JSON does not parse: {e}") from e
    if text.endswith(".json"):
        p = Path(text)
        if not p.is_file():
            raise UserError(f"target file {text} does not exist")
        try:
            return _from_json(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"target file {text} is not valid JSON: {e}") from e
    name = text.lower()
    if name not in TARGETS:
        import difflib

        hint = difflib.get_close_matches(name, list(TARGETS), n=1, cutoff=0.3)
        raise UnknownNameError(
            f"unknown target {target!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; valid targets: {', '.join(TARGETS)}, or a TVM target JSON")
    if arch is not None and name != "cuda":
        raise UserError(f"--arch applies to the cuda target only, not {name}")
    if cpu is not None and name == "cuda":
        raise UserError("--cpu does not apply to the cuda target (use --arch sm_XX)")

    if name == "x86":
        mcpu = cpu or host_cpu()
        _check_cpu(mcpu, X86_TRIPLE, name)
        return TargetSpec(name, {"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": mcpu}, "x86_64",
                          _host_is_x86() and (cpu is None or cpu == host_cpu()), {"cpu": mcpu})
    if name in ("x86-64-v3", "avx512"):
        mcpu = cpu or ("x86-64-v3" if name == "x86-64-v3" else "x86-64-v4")
        _check_cpu(mcpu, X86_TRIPLE, name)
        runnable = _host_is_x86() and _PRESET_FLAGS[name] <= _host_flags()
        return TargetSpec(name, {"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": mcpu}, "x86_64", runnable,
                          {"cpu": mcpu})
    if name == "arm":
        mcpu = cpu or DEFAULT_ARM_CPU
        _check_cpu(mcpu, AARCH64_TRIPLE, name)
        return TargetSpec(name, {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": mcpu, "mattr": ["+neon"]},
                          "aarch64", False, {"cpu": mcpu})
    if name == "armv7":
        mcpu = cpu or DEFAULT_ARMV7_CPU
        _check_cpu(mcpu, ARMV7_TRIPLE, name)
        # without "mfloat-abi": "hard" LLVM emits soft-float calls and the hard-float link fails
        return TargetSpec(name, {"kind": "llvm", "mtriple": ARMV7_TRIPLE, "mcpu": mcpu, "mattr": ["+neon"],
                                 "mfloat-abi": "hard"}, "armv7", False, {"cpu": mcpu})
    # cuda
    sm = (arch or DEFAULT_CUDA_ARCH).lower()
    if not sm.startswith("sm_") or not sm[3:].rstrip("af").isdigit():
        raise UnknownNameError(f"unknown --arch {arch!r}; expected sm_XX, e.g. {', '.join(CUDA_ARCHS)}")
    return TargetSpec("cuda", {"kind": "cuda", "arch": sm,
                               "host": {"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": "x86-64"}},
                      "cuda", False, {"arch": sm})


def _from_json(d: dict) -> TargetSpec:
    import tvm

    if not isinstance(d, dict) or "kind" not in d:
        raise UserError("a target JSON must be an object with a \"kind\" (e.g. {\"kind\": \"llvm\", ...})")
    try:
        tvm.target.Target(d)
    except Exception as e:  # TVM's own message says which key is wrong
        raise UserError(f"TVM refuses the target JSON: {str(e).splitlines()[-1]}") from e
    kind = d["kind"]
    if kind == "cuda":
        sm = str(d.get("arch", DEFAULT_CUDA_ARCH))
        d = dict(d)
        d.setdefault("host", {"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": "x86-64"})
        return TargetSpec("cuda", d, "cuda", False, {"arch": sm})
    if kind != "llvm":
        raise UserError(f"target kind {kind!r} is not supported; graphgen builds llvm (CPU) and cuda targets")
    triple = d.get("mtriple", X86_TRIPLE)
    if triple.startswith("x86_64"):
        arch, name = "x86_64", "x86-custom"
    elif triple.startswith("aarch64"):
        arch, name = "aarch64", "arm-custom"
    elif triple.startswith(("armv7", "arm")):
        arch, name = "armv7", "armv7-custom"
    else:
        raise UserError(f"mtriple {triple!r} is not supported; use x86_64-*, aarch64-* or armv7*-linux-gnueabihf")
    runnable = arch == "x86_64" and _host_is_x86()
    if runnable and d.get("mcpu"):
        runnable = d["mcpu"] in (host_cpu(), "x86-64", "x86-64-v2") or (
            d["mcpu"] == "x86-64-v3" and _PRESET_FLAGS["x86-64-v3"] <= _host_flags())
    return TargetSpec(name, dict(d), arch, runnable, {"cpu": d.get("mcpu")})
