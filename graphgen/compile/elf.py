"""Read an ELF header: machine, class and (for 32-bit ARM) the float ABI, without running it."""

from __future__ import annotations

import struct
from pathlib import Path

EM = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64"}
EF_ARM_ABI_FLOAT_HARD = 0x400
EF_ARM_ABI_FLOAT_SOFT = 0x200

#: what each target arch's library must be
EXPECTED = {"x86_64": ("x86_64", 64), "cuda": ("x86_64", 64), "aarch64": ("aarch64", 64), "armv7": ("arm", 32)}


def read_elf(path: str | Path) -> dict:
    data = Path(path).read_bytes()[:64]
    if data[:4] != b"\x7fELF":
        return {"elf": False}
    bits = 64 if data[4] == 2 else 32
    endian = "<" if data[5] == 1 else ">"
    e_type, e_machine = struct.unpack_from(endian + "HH", data, 16)
    flags_off = 48 if bits == 64 else 36
    (e_flags,) = struct.unpack_from(endian + "I", data, flags_off)
    info = {"elf": True, "bits": bits, "machine": EM.get(e_machine, str(e_machine)),
            "type": {2: "executable", 3: "shared object"}.get(e_type, str(e_type)), "e_flags": hex(e_flags)}
    if e_machine == 40:
        info["float_abi"] = ("hard" if e_flags & EF_ARM_ABI_FLOAT_HARD
                             else "soft" if e_flags & EF_ARM_ABI_FLOAT_SOFT else "unspecified")
        info["eabi_version"] = e_flags >> 24
    return info


def check_elf(path: str | Path, arch: str) -> tuple[bool, dict, str]:
    """Is ``path`` a shared object for ``arch``? Returns (ok, header facts, problem)."""
    info = read_elf(path)
    if not info.get("elf"):
        return False, info, "not an ELF file"
    machine, bits = EXPECTED[arch]
    problems = []
    if info["machine"] != machine or info["bits"] != bits:
        problems.append(f"ELF machine {info['machine']}/{info['bits']}-bit, expected {machine}/{bits}-bit")
    if info["type"] != "shared object":
        problems.append(f"ELF type {info['type']}, expected shared object")
    if arch == "armv7" and info.get("float_abi") != "hard":
        problems.append(f"float ABI {info.get('float_abi')}, expected hard")
    return not problems, info, "; ".join(problems)
