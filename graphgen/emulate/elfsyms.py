"""The dynamic symbols of an ELF shared object (32/64-bit, little-endian), read without running it."""

from __future__ import annotations

import struct
from pathlib import Path

STT_OBJECT, STT_FUNC = 1, 2


def dynamic_symbols(path: str | Path) -> dict[str, dict]:
    """name -> {"type": "func"|"object"|..., "defined": bool} from ``.dynsym``."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF file")
    is64 = data[4] == 2
    if is64:
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    else:
        shoff, = struct.unpack_from("<I", data, 0x20)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x2E)
    sections = []
    for i in range(shnum):
        off = shoff + i * shentsize
        if is64:
            _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize = struct.unpack_from(
                "<IIQQQQIIQQ", data, off)
        else:
            _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize = struct.unpack_from(
                "<IIIIIIIIII", data, off)
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_entsize))
    out: dict[str, dict] = {}
    for sh_type, sh_offset, sh_size, sh_link, sh_entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        str_off = sections[sh_link][1]
        entsize = sh_entsize or (24 if is64 else 16)
        for j in range(1, sh_size // entsize):
            e = sh_offset + j * entsize
            if is64:
                st_name, st_info, _other, st_shndx, _value, _size = struct.unpack_from("<IBBHQQ", data, e)
            else:
                st_name, _value, _size, st_info, _other, st_shndx = struct.unpack_from("<IIIBBH", data, e)
            end = data.index(b"\0", str_off + st_name)
            name = data[str_off + st_name:end].decode("utf-8", "replace")
            kind = {STT_OBJECT: "object", STT_FUNC: "func"}.get(st_info & 0xF, str(st_info & 0xF))
            out[name] = {"type": kind, "defined": st_shndx != 0}
    return out


#: runtime hooks (function-pointer variables the TVM runtime fills when it loads a library)
#: that graphgen's kernel driver provides
DRIVER_HOOKS = {"__TVMBackendAllocWorkspace", "__TVMBackendFreeWorkspace", "__TVMBackendParallelLaunch",
                "__TVMBackendParallelBarrier", "__TVMFFIErrorSetRaisedFromCStr"}
KERNEL_PREFIX = "__tvm_ffi_"


def kernel_names(symbols: dict[str, dict]) -> list[str]:
    """Names of the compiled kernels (``__tvm_ffi_<name>`` functions, not ``__tvm_ffi__`` metadata)."""
    return sorted(n[len(KERNEL_PREFIX):] for n, s in symbols.items()
                  if n.startswith(KERNEL_PREFIX) and not n.startswith("__tvm_ffi__") and s["defined"]
                  and s["type"] == "func")


def unsupported_hooks(symbols: dict[str, dict]) -> list[str]:
    """Runtime hooks the library needs that the kernel driver does not provide (calls into other modules)."""
    return sorted(n for n, s in symbols.items()
                  if s["defined"] and s["type"] == "object" and n.startswith(("__TVM", "__tvm_ffi__library_ctx"))
                  and n not in DRIVER_HOOKS)
