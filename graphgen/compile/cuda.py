"""Ahead-of-time CUDA device code for exported TVM libraries.

The PyPI TVM wheel has no CUDA driver to talk to on a build machine, so its CUDA
module keeps the kernels as CUDA C source (format "cuda"); loading that on a board
needs NVRTC or nvcc there. We compile that source with nvcc into a fatbin for the
requested arch (SASS for it, plus PTX for newer GPUs) and replace the module's
serialized payload in the packed import blob:

    blob    = u64 nbytes | import tree | per module: str type_key | bytes payload
    payload = str fmt | fmap | str data            (CUDAModuleNode::SaveToBytes layout)

where str/bytes are u64 length + bytes. Only ``fmt`` ("cuda" -> "fatbin") and ``data``
(source -> fatbin) change; the layout is checked before and after, and any surprise
fails the build rather than shipping something that cannot load.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from graphgen.errors import BuildError

FATBIN_MAGIC = 0xBA55ED50


def find_nvcc() -> str:
    for cand in (shutil.which("nvcc"), os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand):
            return cand
    raise BuildError("nvcc not found: cuda builds compile device code ahead of time and need the CUDA toolkit "
                     "(set CUDA_HOME or put nvcc on PATH)")


def compile_fatbin(source: str, arch: str, workdir: Path) -> bytes:
    cc = arch.split("_", 1)[1]
    src = workdir / "kernels.cu"
    out = workdir / "kernels.fatbin"
    src.write_text(source)
    cmd = [find_nvcc(), "--fatbin", "-O3", "-std=c++17", "-w",
           f"-gencode=arch=compute_{cc},code=[sm_{cc},compute_{cc}]", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BuildError(f"nvcc failed to compile the kernels for {arch}: {' | '.join(tail)}")
    return out.read_bytes()


def _u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def swap_cuda_payload(blob: bytes, source: bytes, fatbin: bytes) -> bytes:
    """Replace the CUDA module whose data is ``source`` by a fatbin module in a packed blob."""
    if _u64(blob, 0) != len(blob) - 8:
        raise BuildError("unexpected TVM import blob layout (header length)")
    key = _str(b"cuda")
    start = 8
    while True:
        idx = blob.find(key, start)
        if idx < 0:
            raise BuildError("CUDA module not found in the packed import blob")
        plen_off = idx + len(key)
        plen = _u64(blob, plen_off)
        payload = blob[plen_off + 8: plen_off + 8 + plen]
        tail = _str(source)
        if len(payload) == plen and payload.startswith(_str(b"cuda")) and payload.endswith(tail):
            break
        start = idx + 1
    fmap = payload[len(_str(b"cuda")): len(payload) - len(tail)]
    new_payload = _str(b"fatbin") + fmap + _str(fatbin)
    out = blob[:plen_off] + struct.pack("<Q", len(new_payload)) + new_payload + blob[plen_off + 8 + plen:]
    return struct.pack("<Q", len(out) - 8) + out[8:]


def fatbin_archs(data: bytes) -> list[dict]:
    """List the entries (kind ELF/PTX and sm version) of every fatbin found in ``data``."""
    found = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = data.find(magic)
    while pos >= 0:
        try:
            _, _, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
            off, end = pos + hsize, pos + hsize + fsize
            while off < end:
                kind, _, ehsize, padded = struct.unpack_from("<HHII", data, off)
                sm = struct.unpack_from("<I", data, off + 28)[0]
                found.append({"kind": {1: "ptx", 2: "elf"}.get(kind, str(kind)), "sm": sm})
                if ehsize == 0:
                    break
                off += ehsize + padded
        except struct.error:
            pass
        pos = data.find(magic, pos + 4)
    return found


def _cuda_modules(mod):
    for m in mod.imports:
        if m.kind == "cuda":
            yield m
        yield from _cuda_modules(m)


def export_cuda_library(executable, spec, out_path: Path, fcompile, log=print) -> dict:
    from tvm.runtime import _ffi_api

    arch = spec.details.get("arch") or spec.tvm_json.get("arch")
    lib = executable.mod
    cuda_mods = list(_cuda_modules(lib))
    if not cuda_mods:
        raise BuildError("the compiled CUDA executable has no CUDA kernel module")
    blob = _ffi_api.ModulePackImportsToTensor(lib).numpy().tobytes()
    entries = []
    with tempfile.TemporaryDirectory(prefix="graphgen-nvcc-") as tmp:
        for i, m in enumerate(cuda_mods):
            source = m.inspect_source()
            work = Path(tmp) / str(i)
            work.mkdir()
            log(f"nvcc: compiling {len(source) // 1024} KiB of kernels for {arch}")
            fatbin = compile_fatbin(source, arch, work)
            blob = swap_cuda_payload(blob, source.encode(), fatbin)
            entries += fatbin_archs(fatbin)
        if b"__global__" in blob:
            raise BuildError("CUDA source is still present in the library after fatbin substitution")
        bin_path = Path(tmp) / "blob.bin"
        bin_path.write_bytes(blob)
        asm = Path(tmp) / "devc.S"
        # The loader looks the blob up by this symbol (what ModulePackImportsToLLVM would emit).
        asm.write_text(
            "\t.section .rodata.__tvm_ffi__library_bin,\"a\",@progbits\n"
            "\t.globl __tvm_ffi__library_bin\n\t.type __tvm_ffi__library_bin,@object\n\t.p2align 4\n"
            f"__tvm_ffi__library_bin:\n\t.incbin \"{bin_path}\"\n"
            "\t.size __tvm_ffi__library_bin, .-__tvm_ffi__library_bin\n"
            "\t.section .note.GNU-stack,\"\",@progbits\n")
        devc = Path(tmp) / "devc.o"
        proc = subprocess.run([sys.executable, "-m", "ziglang", "cc", "-c", "-target", "x86_64-linux-gnu",
                               "-o", str(devc), str(asm)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"assembling the device-code blob failed: {proc.stderr.strip()[-300:]}")

        def fpack_imports(_mod, _is_system_lib, _prefix, _workspace):
            return str(devc)

        executable.mod.export_library(str(out_path), fcompile=fcompile, fpack_imports=fpack_imports)
    return {"device_code": "fatbin", "arch": arch, "fatbin_entries": entries, "kernel_modules": len(cuda_mods)}
