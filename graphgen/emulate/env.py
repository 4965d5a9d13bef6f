"""The emulation environment: qemu user-mode plus an ARM userland, fetched once into a cache folder.

Everything comes from the two registries a CI machine can reach, with no root and no change
to the host's dpkg configuration:

* Debian packages (bookworm) through ``apt-get`` with a *private* state folder (its own
  sources list, package lists and empty dpkg status): ``qemu-user-static`` for the host, and
  for the guest ``python3.11:arm64`` with its libraries (aarch64) or ``libc6:armhf`` (armv7).
  The ``.deb`` files are unpacked in Python (an ``ar`` archive holding ``data.tar.xz``), with
  absolute symlinks made relative so that ``qemu -L SYSROOT`` resolves them inside the sysroot.
* PyPI aarch64 wheels of apache-tvm, apache-tvm-ffi and numpy, installed with
  ``pip install --target DIR --platform manylinux_2_28_aarch64 --only-binary=:all:``. TVM is
  trimmed to its runtime (``libtvm_compiler.so`` and the bundled sources/headers deleted) and
  loaded with ``TVM_USE_RUNTIME_LIB=1`` — the same runtime-only install a board gets.
* armv7 has no TVM runtime on PyPI: its component holds a small C kernel driver
  (:mod:`graphgen.emulate._kernel_driver`) compiled with the ``ziglang`` wheel.

Layout (one folder per component, named by a key over everything that decides its content)::

    ~/.cache/graphgen/emulation/          ($GRAPHGEN_CACHE_DIR/emulation)
      aarch64-<key>/  bin/python3 (qemu wrapper)  bin/qemu-aarch64-static  sysroot/  site/  shim/
      armv7-<key>/    bin/graphgen-kernel-driver  bin/qemu-arm-static      sysroot/
      */graphgen-env.json                 what was installed, sizes of every file, setup time

A component is built in a temporary folder and renamed into place when complete, under a file
lock, so concurrent test sessions share one build. Before each use the stamp is checked
(every file present with its recorded size); a damaged component is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from graphgen.errors import GraphgenError

#: bump when the layout or the way a component is built changes (invalidates every cache)
LAYOUT = 1
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
GUEST_PYTHON = "3.11"
STAMP = "graphgen-env.json"

#: guest Debian architecture, qemu binary, what apt installs for it
ARCHES = {
    "aarch64": {"deb_arch": "arm64", "qemu": "qemu-aarch64-static", "packages": [f"python{GUEST_PYTHON}", "libstdc++6"]},
    "armv7": {"deb_arch": "armhf", "qemu": "qemu-arm-static", "packages": ["libc6", "libgcc-s1"]},
}
#: bulky parts of the TVM wheel a runtime-only install does not need
_TVM_TRIM = ["lib/libtvm_compiler.so", "3rdparty", "src", "include", "web"]
#: unpacked .deb content the emulation does not need
_DEB_SKIP = ("usr/share/doc/", "usr/share/man/", "usr/share/locale/", "usr/share/lintian/", "usr/share/info/")


class EmulationError(GraphgenError):
    """The emulation environment could not be set up or the emulated run failed to start (exit 1)."""


def cache_root() -> Path:
    """``$GRAPHGEN_CACHE_DIR/emulation``, default ``~/.cache/graphgen/emulation`` (XDG_CACHE_HOME honoured)."""
    base = os.environ.get("GRAPHGEN_CACHE_DIR")
    if base:
        root = Path(base).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "graphgen"
    return root / "emulation"


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def guest_wheels() -> list[str]:
    """The aarch64 wheels: the host's exact TVM / TVM-FFI / numpy versions, plus what the RPC server needs."""
    return [f"apache-tvm=={_dist_version('apache-tvm')}", f"apache-tvm-ffi=={_dist_version('apache-tvm-ffi')}",
            f"numpy=={_dist_version('numpy')}", "cloudpickle", "psutil", "tornado"]


def component_key(arch: str) -> str:
    from graphgen.emulate._kernel_driver import SOURCE

    parts = [str(LAYOUT), DEBIAN_SUITE, arch, *ARCHES[arch]["packages"]]
    if arch == "aarch64":
        parts += guest_wheels()
    else:
        parts.append(hashlib.sha256(SOURCE.encode()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


@dataclass
class Component:
    """One ready guest environment (``aarch64`` or ``armv7``) in the cache."""

    arch: str
    path: Path
    stamp: dict

    @property
    def qemu(self) -> Path:
        return self.path / "bin" / ARCHES[self.arch]["qemu"]

    @property
    def sysroot(self) -> Path:
        return self.path / "sysroot"

    @property
    def python(self) -> Path:
        """aarch64: the wrapper that runs the guest Python under qemu (usable as sys.executable)."""
        return self.path / "bin" / "python3"

    @property
    def driver(self) -> Path:
        """armv7: the kernel driver executable."""
        return self.path / "bin" / "graphgen-kernel-driver"

    def describe(self) -> dict:
        s = self.stamp
        return {"arch": self.arch, "cache": str(self.path), "qemu": s.get("qemu_version"),
                "guest": s.get("guest"), "packages": s.get("python_packages", {}),
                "setup_seconds": s.get("setup_seconds"), "megabytes": s.get("megabytes")}


# ----------------------------------------------------------------------------------------- checks


def _walk_files(root: Path) -> dict[str, int]:
    """relative path -> size for every regular file and symlink (symlinks: size -1) under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root)
            if rel == STAMP:
                continue
            out[rel] = -1 if os.path.islink(full) else os.lstat(full).st_size
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_component(path: Path, arch: str, *, deep: bool = False) -> str | None:
    """None when the component at ``path`` is complete and intact, else why not (one line).

    The quick check compares every file's presence and size with the stamp; ``deep`` also
    compares the sha256 of the executables and shared libraries that a run depends on.
    """
    stamp_path = path / STAMP
    if not stamp_path.is_file():
        return "its stamp file is missing (an interrupted setup?)"
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError) as e:
        return f"its stamp file is unreadable ({type(e).__name__})"
    if stamp.get("layout") != LAYOUT or stamp.get("key") != component_key(arch):
        return "it was made for another graphgen version"
    files = stamp.get("files") or {}
    if not files:
        return "its stamp lists no files"
    for rel, size in files.items():
        full = path / rel
        if size == -1:
            if not full.is_symlink():
                return f"{rel} is missing"
            continue
        try:
            st = full.lstat()
        except OSError:
            return f"{rel} is missing"
        if st.st_size != size:
            return f"{rel} has changed size ({st.st_size} bytes, expected {size})"
    if deep:
        for rel, digest in (stamp.get("sha256") or {}).items():
            full = path / rel
            if not full.is_file() or _sha256(full) != digest:
                return f"{rel} is corrupt (sha256 differs)"
    return None


def _find_ready(root: Path, arch: str) -> tuple[Path, str | None]:
    path = root / f"{arch}-{component_key(arch)}"
    if not path.exists():
        return path, "absent"
    return path, check_component(path, arch)


# ----------------------------------------------------------------------------------------- setup


@contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(arches, progress=None, *, root: Path | None = None) -> dict[str, Component]:
    """Ready components for ``arches`` (e.g. ``{"aarch64"}``), building or repairing what is needed.

    Raises :class:`EmulationError` (one line) when a component cannot be built.
    """
    progress = progress or (lambda msg: None)
    root = Path(root) if root is not None else cache_root()
    arches = sorted(set(arches))
    for a in arches:
        if a not in ARCHES:
            raise EmulationError(f"no emulation for {a!r}; emulated targets: {', '.join(ARCHES)}")
    _check_host()
    with _locked(root):
        need, damaged = [], {}
        for a in arches:
            path, problem = _find_ready(root, a)
            if problem is None:
                continue
            if problem != "absent":
                damaged[a] = problem
                progress(f"[emulation] {path} is damaged ({problem}); rebuilding it")
                shutil.rmtree(path, ignore_errors=True)
            need.append(a)
        if need:
            try:
                _build(root, need, progress)
            except EmulationError as e:
                if damaged:
                    a = next(iter(damaged))
                    raise EmulationError(f"the emulation environment in {root} was damaged ({damaged[a]}) and "
                                         f"rebuilding it failed: {e}") from e
                raise
        out = {}
        for a in arches:
            path, problem = _find_ready(root, a)
            if problem is not None:
                raise EmulationError(f"the emulation environment {path} is not usable after setup: {problem}")
            out[a] = Component(a, path, json.loads((path / STAMP).read_text()))
        return out


def repair(component: Component, progress=None) -> Component | None:
    """Deep-check a component after a failed run; rebuild it if it is corrupt. None when it was intact."""
    problem = check_component(component.path, component.arch, deep=True)
    if problem is None:
        return None
    progress = progress or (lambda msg: None)
    root = component.path.parent
    with _locked(root):
        progress(f"[emulation] {component.path} is damaged ({problem}); rebuilding it")
        shutil.rmtree(component.path, ignore_errors=True)
        try:
            _build(root, [component.arch], progress)
        except EmulationError as e:
            raise EmulationError(f"the emulation environment {component.path} was damaged ({problem}) and "
                                 f"rebuilding it failed: {e}") from e
    return ensure([component.arch], progress, root=root)[component.arch]


def _check_host() -> None:
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise EmulationError(f"ARM emulation is set up for x86-64 hosts; this host is {machine} "
                             f"(use --rpc with a board instead)")
    if sys.platform != "linux":
        raise EmulationError("ARM emulation needs a Linux host (qemu user-mode)")
    if shutil.which("apt-get") is None:
        raise EmulationError("setting up the emulation environment needs apt-get (a Debian or Ubuntu host) to "
                             "fetch Debian's packages; nothing is installed system-wide")


def _build(root: Path, arches: list[str], progress) -> None:
    t0 = time.perf_counter()
    progress(f"[emulation] setting up {' + '.join(arches)} emulation in {root} "
             f"(once; about a minute and ~{sum(240 if a == 'aarch64' else 30 for a in arches)} MB)")
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        apt = _Apt(work / "apt", [ARCHES[a]["deb_arch"] for a in arches])
        progress(f"      apt: Debian {DEBIAN_SUITE} package lists from {apt.mirror} (private apt state, no root)")
        apt.update()
        debs = work / "debs"
        progress("      apt: qemu-user-static")
        qemu_deb = apt.download(["qemu-user-static"], debs / "host", arch=apt.host_arch)[0]
        extract_deb(qemu_deb, work / "qemu", only={f"usr/bin/{ARCHES[a]['qemu']}" for a in arches})
        for a in arches:
            t_arch = time.perf_counter()
            spec = ARCHES[a]
            dest = work / f"{a}-{component_key(a)}"
            (dest / "bin").mkdir(parents=True)
            shutil.move(str(work / "qemu" / "usr" / "bin" / spec["qemu"]), dest / "bin" / spec["qemu"])
            os.chmod(dest / "bin" / spec["qemu"], 0o755)
            progress(f"      apt: {' '.join(spec['packages'])} for {spec['deb_arch']} and their dependencies")
            files = apt.install_download(spec["packages"], debs / a, arch=spec["deb_arch"])
            progress(f"      unpacking {len(files)} Debian packages into {dest.name}/sysroot")
            for f in files:
                extract_deb(f, dest / "sysroot")
            qemu_version = _qemu_version(dest / "bin" / spec["qemu"])
            stamp = {"layout": LAYOUT, "key": component_key(a), "arch": a, "debian_suite": DEBIAN_SUITE,
                     "mirror": apt.mirror, "qemu_version": qemu_version,
                     "debian_packages": sorted(p.name for p in files)}
            if a == "aarch64":
                stamp.update(_setup_aarch64(dest, progress))
            else:
                stamp.update(_setup_armv7(dest, work, progress))
            shutil.rmtree(debs / a, ignore_errors=True)
            files_now = _walk_files(dest)
            stamp["files"] = files_now
            stamp["sha256"] = {rel: _sha256(dest / rel) for rel in files_now
                               if files_now[rel] > 0 and _is_binary_of_interest(rel)}
            stamp["megabytes"] = round(sum(s for s in files_now.values() if s > 0) / 2**20, 1)
            stamp["setup_seconds"] = round(time.perf_counter() - t_arch, 1)
            stamp["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            (dest / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
            final = root / dest.name
            if final.exists():
                shutil.rmtree(final)
            os.rename(dest, final)
            # older components of the same arch (other graphgen/TVM versions) are dead weight
            for old in root.glob(f"{a}-*"):
                if old != final and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            progress(f"      {a} ready: {final} ({stamp['megabytes']:.0f} MB, {stamp['setup_seconds']:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"[emulation] set up in {time.perf_counter() - t0:.0f} s; reused from now on")


def _is_binary_of_interest(rel: str) -> bool:
    return rel.startswith("bin/") or rel.endswith((".so", f"/python{GUEST_PYTHON}")) or ".so." in rel


def _qemu_version(qemu: Path) -> str:
    try:
        out = subprocess.run([str(qemu), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise EmulationError(f"{qemu.name} does not run on this host: {e}") from e
    first = out.strip().splitlines()[0] if out.strip() else qemu.name
    return first


def _setup_aarch64(dest: Path, progress) -> dict:
    site = dest / "site"
    wheels = guest_wheels()
    progress(f"      pip: aarch64 wheels {' '.join(wheels[:3])} (+ RPC server needs)")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
           "--target", str(site), "--platform", "manylinux_2_28_aarch64", "--python-version", GUEST_PYTHON,
           "--implementation", "cp", "--abi", "cp" + GUEST_PYTHON.replace(".", ""), "--only-binary=:all:", *wheels]
    env = dict(os.environ, PIP_NO_WARN_SCRIPT_LOCATION="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise EmulationError("pip could not fetch the aarch64 wheels from the package index "
                             f"({_last_line(proc.stderr or proc.stdout)})")
    trimmed = 0
    for rel in _TVM_TRIM:
        p = site / "tvm" / rel
        if p.exists():
            trimmed += _tree_size(p)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with the host's shebang
    progress(f"      trimmed TVM to its runtime ({trimmed / 2**20:.0f} MB of compiler and sources removed)")
    (dest / "shim").mkdir()
    # sys.executable must be something the host can exec (there is no binfmt_misc to run an
    # aarch64 binary directly): TVM's RPC server and popen pool start workers with it.
    (dest / "shim" / "sitecustomize.py").write_text(
        "import os, sys\n_w = os.environ.get('GRAPHGEN_GUEST_PYTHON')\nif _w:\n    sys.executable = _w\n")
    wrapper = dest / "bin" / "python3"
    wrapper.write_text(f"""#!/bin/sh
# aarch64 Python {GUEST_PYTHON} (Debian {DEBIAN_SUITE}) under qemu user-mode emulation, with a runtime-only TVM
here=$(cd "$(dirname "$0")/.." && pwd -P)
unset PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE PYTHONEXECUTABLE
export PYTHONPATH="$here/shim:$here/site" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
export TVM_USE_RUNTIME_LIB=1 GRAPHGEN_GUEST_PYTHON="$here/bin/python3"
exec "$here/bin/qemu-aarch64-static" -L "$here/sysroot" "$here/sysroot/usr/bin/python{GUEST_PYTHON}" -s "$@"
""")
    os.chmod(wrapper, 0o755)
    progress("      precompiling Python bytecode")
    dirs = [str(dest / "sysroot" / "usr" / "lib" / f"python{GUEST_PYTHON}"), str(site)]
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == GUEST_PYTHON:
        # .pyc files are architecture-independent: the host's 3.11 writes what the guest's reads
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs], capture_output=True,
                       env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))
    else:
        subprocess.run([str(wrapper), "-m", "compileall", "-q", *dirs], capture_output=True,
                       env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))
    progress("      checking that the emulated Python imports the TVM runtime")
    probe = ("import json, platform, sys, numpy, tvm, tvm_ffi; from tvm.runtime.vm import VirtualMachine; "
             "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
             "'tvm': tvm.__version__, 'numpy': numpy.__version__}))")
    proc = subprocess.run([str(wrapper), "-c", probe], capture_output=True, text=True, timeout=600,
                          env=_clean_env())
    if proc.returncode != 0:
        raise EmulationError(f"the emulated aarch64 Python cannot import the TVM runtime: "
                             f"{_last_line(proc.stderr or proc.stdout)}")
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    if facts["machine"] != "aarch64":
        raise EmulationError(f"the emulated Python reports machine {facts['machine']!r}, expected aarch64")
    return {"guest": f"Debian {DEBIAN_SUITE} arm64, Python {facts['python']}",
            "python_packages": {"apache-tvm": facts["tvm"], "numpy": facts["numpy"],
                                "apache-tvm-ffi": _dist_version("apache-tvm-ffi")},
            "tvm_trimmed": _TVM_TRIM}


def _setup_armv7(dest: Path, work: Path, progress) -> dict:
    from graphgen.emulate._kernel_driver import SOURCE

    progress("      compiling the armv7 kernel driver with zig cc (arm-linux-gnueabihf, glibc 2.36)")
    src = work / "graphgen-kernel-driver.c"
    src.write_text(SOURCE)
    zig_cache = work / "zig-cache"
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(zig_cache), ZIG_LOCAL_CACHE_DIR=str(zig_cache))
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", "arm-linux-gnueabihf.2.36", "-mcpu=cortex_a7", "-O2",
           "-rdynamic", "-o", str(dest / "bin" / "graphgen-kernel-driver"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise EmulationError(f"compiling the armv7 kernel driver failed: {_last_line(proc.stderr or proc.stdout)}")
    shutil.rmtree(zig_cache, ignore_errors=True)
    comp = Component("armv7", dest, {})
    proc = subprocess.run([str(comp.qemu), "-L", str(comp.sysroot), str(comp.driver)], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 2 or "usage" not in proc.stderr:
        raise EmulationError(f"the armv7 kernel driver does not start under qemu-arm: "
                             f"{_last_line(proc.stderr or proc.stdout) or f'exit code {proc.returncode}'}")
    return {"guest": f"Debian {DEBIAN_SUITE} armhf glibc + graphgen kernel driver (no TVM runtime)"}


def _clean_env(extra: dict | None = None) -> dict:
    """The host environment without the host Python's settings (they would point the guest at x86 code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k not in ("VIRTUAL_ENV",)}
    env.setdefault("TVM_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def _tree_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    # apt and pip put the reason on "E:" / "ERROR:" lines; prefer those
    for prefix in ("E: ", "ERROR: ", "error: "):
        hits = [ln for ln in lines if ln.startswith(prefix)]
        if hits:
            return re.sub(r"\s+", " ", hits[0][len(prefix):])[:300]
    return lines[-1][:300] if lines else "no output"


# ----------------------------------------------------------------------------------------- apt


def _host_mirror() -> str:
    """The Debian mirror the host already uses (it is reachable), else deb.debian.org."""
    env = os.environ.get("GRAPHGEN_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.suffix in (".list", ".sources") or p.name == "sources.list":
            try:
                texts.append(p.read_text())
            except OSError:
                pass
    for text in texts:
        for m in re.finditer(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            uri = m.group(1).rstrip("/")
            if re.search(r"/debian$", uri) and uri.startswith(("http://", "https://")):
                return uri
    return DEFAULT_MIRROR


class _Apt:
    """apt-get with its own sources, lists, cache and an empty dpkg status: touches nothing of the host's."""

    def __init__(self, folder: Path, guest_archs: list[str]):
        self.dir = folder
        self.mirror = _host_mirror()
        self.keyring = os.environ.get("GRAPHGEN_DEBIAN_KEYRING", DEFAULT_KEYRING)
        if not Path(self.keyring).is_file():
            raise EmulationError(f"the Debian archive keyring {self.keyring} is missing (package "
                                 f"debian-archive-keyring); set GRAPHGEN_DEBIAN_KEYRING to its path")
        self.host_arch = "amd64"
        self.archs = [self.host_arch, *guest_archs]
        for sub in ("state/lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "state" / "status").write_text("")
        (folder / "sources.list").write_text(
            f"deb [signed-by={self.keyring}] {self.mirror} {DEBIAN_SUITE} main\n")

    def _opts(self, native: str) -> list[str]:
        d = self.dir
        opts = ["-o", f"Dir::State={d}/state", "-o", f"Dir::State::status={d}/state/status",
                "-o", f"Dir::Cache={d}/cache", "-o", f"Dir::Etc::SourceList={d}/sources.list",
                "-o", f"Dir::Etc::SourceParts={d}/sources.list.d", "-o", f"Dir::Etc::Preferences={d}/preferences",
                "-o", f"Dir::Etc::PreferencesParts={d}/preferences.d", "-o", "Debug::NoLocking=1",
                "-o", "Acquire::Languages=none", "-o", "Acquire::Retries=2", "-o", "APT::Get::List-Cleanup=0",
                "-o", f"APT::Architecture={native}", "-o", "APT::Architectures::=" + native]
        for a in self.archs:
            if a != native:
                opts += ["-o", f"APT::Architectures::={a}"]
        if os.geteuid() == 0:
            opts += ["-o", "APT::Sandbox::User=root"]  # the private folders are not the _apt user's
        return opts

    def _run(self, args: list[str], native: str, what: str, cwd: Path | None = None) -> str:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        try:
            proc = subprocess.run(["apt-get", *self._opts(native), *args], capture_output=True, text=True,
                                  env=env, cwd=cwd, timeout=1800)
        except subprocess.TimeoutExpired as e:
            raise EmulationError(f"{what} from {self.mirror} timed out") from e
        if proc.returncode != 0:
            raise EmulationError(f"{what} from {self.mirror} failed ({_last_line(proc.stderr or proc.stdout)}); "
                                 f"network access to the Debian archive is needed once to set up emulation "
                                 f"(set GRAPHGEN_DEBIAN_MIRROR for another mirror)")
        return proc.stdout

    def update(self) -> None:
        # --error-on=any: a list that could not be fetched is an error, not a warning
        self._run(["--error-on=any", "update"], self.host_arch, "downloading the Debian package lists")
        if not any((self.dir / "state" / "lists").glob("*_Packages*")):
            raise EmulationError(f"apt fetched no package lists from {self.mirror}")

    def download(self, packages: list[str], dest: Path, arch: str) -> list[Path]:
        """The named packages only (no dependencies)."""
        dest.mkdir(parents=True, exist_ok=True)
        self._run(["download", *[f"{p}:{arch}" for p in packages]], arch, f"downloading {' '.join(packages)}",
                  cwd=dest)
        files = sorted(dest.glob("*.deb"))
        if len(files) < len(packages):
            raise EmulationError(f"apt downloaded {len(files)} of {len(packages)} packages into {dest}")
        return files

    def install_download(self, packages: list[str], dest: Path, arch: str) -> list[Path]:
        """The named packages and their dependencies, resolved as if installing on an empty ``arch`` system."""
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "partial").mkdir(exist_ok=True)
        self._run(["install", "--download-only", "--yes", "--no-install-recommends",
                   "-o", f"Dir::Cache::archives={dest}", *packages], arch, f"downloading {' '.join(packages)}")
        files = sorted(dest.glob("*.deb"))
        if not files:
            raise EmulationError(f"apt resolved no packages for {' '.join(packages)} ({arch})")
        return files


# ----------------------------------------------------------------------------------------- .deb


def _ar_members(data: bytes):
    if data[:8] != b"!<arch>\n":
        raise EmulationError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        hdr = data[pos:pos + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)


def extract_deb(deb: Path, dest: Path, only: set[str] | None = None) -> int:
    """Unpack a .deb's data archive into ``dest`` (like ``dpkg -x``); returns the number of entries.

    Absolute symlink targets are rewritten relative to ``dest`` so they stay inside the sysroot.
    ``only``: the member paths to extract (e.g. ``{"usr/bin/qemu-arm-static"}``).
    """
    data = Path(deb).read_bytes()
    payload = next((blob for name, blob in _ar_members(data) if name.startswith("data.tar")), None)
    if payload is None:
        raise EmulationError(f"{Path(deb).name} has no data archive")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    wanted = set(only) if only is not None else None
    try:
        tar = tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
    except tarfile.TarError as e:
        raise EmulationError(f"cannot read {Path(deb).name} ({e}); is it zstd-compressed?") from e
    with tar:
        for m in tar:
            name = m.name[2:] if m.name.startswith("./") else m.name
            rel = os.path.normpath(name.lstrip("/")) if name.strip("./") else ""
            if not rel or rel == "." or rel.startswith(".."):
                continue
            if only is not None and rel not in only:
                continue
            if only is None and rel.startswith(_DEB_SKIP):
                continue
            target = dest / rel
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                if target.is_dir() and not target.is_symlink():
                    continue
                target.unlink()
            if m.issym():
                link = m.linkname
                if link.startswith("/"):
                    link = os.path.relpath(dest / link.lstrip("/"), target.parent)
                os.symlink(link, target)
            elif m.islnk():
                src_name = m.linkname[2:] if m.linkname.startswith("./") else m.linkname
                src = dest / os.path.normpath(src_name.lstrip("/"))
                if src.exists():
                    shutil.copy2(src, target)
            elif m.isfile():
                with tar.extractfile(m) as fsrc, open(target, "wb") as fdst:
                    shutil.copyfileobj(fsrc, fdst)
                os.chmod(target, m.mode & 0o777)
            else:
                continue  # device nodes, fifos: not in the packages we use
            count += 1
            if wanted is not None:
                wanted.discard(rel)
                if not wanted:
                    break  # the rest of a big archive (qemu-user-static: ~370 MB) need not be decompressed
    return count
