"""The persistent tuning database: one folder per target, shared by every model.

Layout of a database folder (TVM's own ``JSONDatabase`` files plus a header of ours)::

    <cache>/tuning/<target-key>/
        meta.json                    graphgen format, TVM version, default schedules, timing, the target
        database_workload.json       one line per workload: [structural hash, IRModule]
        database_tuning_record.json  one line per measured trial: [workload index, record]
        chosen.json                  per workload, the record the tuner's final re-measurement chose
                                     (or graphgen's default schedule, where the model ran it faster)

``<cache>`` is ``$GRAPHGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphgen``, else
``~/.cache/graphgen``. The target key names the target and its CPU and hashes the full
TVM target JSON (with ``num-cores``), so records tuned for one board never leak to another.

Kernels repeat across the zoo (the same 3x3 conv shape in SqueezeNet and ResNet), and the
workload key is TVM's structural hash of the fused kernel, so a record tuned while tuning
one model is picked up by the build of any other model that has the same kernel.

A database that cannot be trusted (unparsable lines, a TVM or format version other than
this one, other default schedules (:func:`schedules_fingerprint`), records timed another way
(:data:`graphgen.tune.measure.TIMING`), records for another target) is reported in one line
and moved aside to ``<folder>.set-aside-<time>``; the build then goes on without it. A
half-written last line (the process was killed while appending) is the one damage repaired in
place.

Which record a build applies: TVM takes the fastest record of a workload. Each record is one
timing, and the fastest of a hundred timings on a noisy host is mostly the luckiest (measured:
SqueezeNet's default classifier kernel timed 1.63 ms in the tuner, 1.14 ms standalone, so a
slower setting won). So the tuner ends by timing each workload's few fastest schedules again,
side by side, and writes its choice to ``chosen.json``; a build keeps only the chosen schedule's
records of that workload (:func:`build_record_bytes`). A choice holds while the workload has the
records it was made among; records added since (another model's tuning that did not finish)
make the build fall back to TVM's fastest record until a tuning run chooses again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = 1
META = "meta.json"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
CHOICES = "chosen.json"
CHOICES_VERSION = 1
#: run time TVM writes for a trial that failed to build or run
FAILED_SECONDS = 1e9


def cache_dir() -> Path:
    env = os.environ.get("GRAPHGEN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "graphgen"


def _canonical(target_json: dict) -> str:
    return json.dumps(target_json, sort_keys=True, separators=(",", ":"))


def target_key(name: str, target_json: dict) -> str:
    """Folder name for a target: ``<name>-<cpu or arch>-<8 hex of the target JSON>``."""
    cpu = target_json.get("mcpu") or target_json.get("arch") or target_json.get("kind", "")
    digest = hashlib.sha256(_canonical(target_json).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{name}-{cpu}")
    return f"{safe}-{digest}"


def default_db_path(name: str, target_json: dict) -> Path:
    return cache_dir() / "tuning" / target_key(name, target_json)


def tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def _code_fingerprint(source: str) -> str:
    """12 hex digits of a Python source's code: its syntax tree without docstrings, so comments
    and docstrings do not count."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:12]


def schedules_fingerprint() -> str:
    """What graphgen's default schedules are (:mod:`graphgen.tune.defaults`, its code,
    :mod:`graphgen.tune.stack_tiles`, where their register tiles live, and
    :mod:`graphgen.tune.prefetch_weights`, which changes how fast a kernel streams its weights).

    A record's trace replays the schedule decisions of the graphgen that measured it: the
    default schedule and the knob settings of that time. After the defaults change (a better
    tile, another parallel threshold) those records would still win at build time, measured
    against defaults that no longer exist, and keep the old decisions; so a database belongs to
    one version of the defaults, like one TVM version.
    """
    from graphgen.tune import defaults, prefetch_weights, stack_tiles

    # the defaults' code and how their register tiles are allocated (stack_tiles: a tile's time
    # changes with it, and so would the tuner's choice between tiles), and the weights' prefetch
    try:
        prints = [_code_fingerprint(Path(m.__file__).read_text()) for m in (defaults, stack_tiles, prefetch_weights)]
    except (OSError, SyntaxError, UnicodeDecodeError):  # no source to read: the check cannot
        return "unknown"  # tell, and passes
    return hashlib.sha256(" ".join(prints).encode()).hexdigest()[:12]


def timing() -> str:
    """How this graphgen times a trial (:data:`graphgen.tune.measure.TIMING`); records timed
    another way do not compare with its own."""
    from graphgen.tune.measure import TIMING

    return TIMING


@dataclass
class WorkloadStats:
    """Trials recorded for one workload and the best measured run time."""

    trials: int = 0
    best_seconds: float = float("inf")


@dataclass
class DatabaseInfo:
    """What a validated database folder holds, read with plain ``json`` before TVM sees it."""

    path: Path
    meta: dict
    workloads: list[str] = field(default_factory=list)  # structural hash per workload line
    stats: dict[str, WorkloadStats] = field(default_factory=dict)  # by structural hash
    repaired: str | None = None
    workload_bytes: bytes = b""  # the complete lines, for a read-only snapshot
    record_bytes: bytes = b""
    # per record line (blank lines skipped): its workload's hash, its trace's key, its median seconds
    lines: list[tuple[str, str, float]] = field(default_factory=list)
    record_texts: list[str] = field(default_factory=list)  # each record line as written
    choices: dict[str, dict] = field(default_factory=dict)  # chosen.json: workload hash -> choice

    def record_count(self, workload: str) -> int:
        return self.stats[workload].trials if workload in self.stats else 0

    def chosen_key(self, workload: str) -> str | None:
        """The trace key of the record chosen for ``workload``, when the choice still holds: it
        names a line of that workload and the workload has the records it was made among."""
        c = self.choices.get(workload)
        if not isinstance(c, dict) or not isinstance(c.get("line"), int) or not 0 <= c["line"] < len(self.lines):
            return None
        h, key, _ = self.lines[c["line"]]
        if h != workload or c.get("records") != self.record_count(workload):
            return None
        return key

    def keeps_default(self, workload: str) -> bool:
        """Whether the choice for ``workload`` is graphgen's default schedule (the tuner's check
        in the model found its tuned schedule slower there), while the choice still holds: the
        workload has the records it was made among."""
        c = self.choices.get(workload)
        return isinstance(c, dict) and c.get("default") is True and c.get("records") == self.record_count(workload)

    @property
    def records(self) -> int:
        return sum(s.trials for s in self.stats.values())


class DatabaseProblem(Exception):
    """The folder is not a database this graphgen and TVM can use; the message says why (one line)."""


def _read_lines(path: Path, what: str, repair: bool, texts: list | None = None) -> tuple[list, str | None, bytes]:
    """Parse a JSON-lines file -> (values, note, the complete lines' bytes); ``texts`` gets each
    parsed line's text.

    The only damage accepted is an unfinished last line (no newline after it): a tuning run
    appending at this moment, or one killed mid-append. ``repair`` (only while holding the
    database's lock) cuts it off the file; otherwise it is just not read.
    """
    if not path.exists():
        return [], None, b""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatabaseProblem(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    lines = text.split("\n")
    out, note, keep = [], None, len(lines)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
            if texts is not None:
                texts.append(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the append has not finished
                keep = i
                if repair:
                    note = f"dropped a half-written last line of {path.name}"
                    path.write_bytes("\n".join(lines[:i]).encode() + (b"\n" if i else b""))
                break
            raise DatabaseProblem(f"{what} line {i + 1} is not JSON ({e.msg})") from e
    complete = "\n".join(lines[:keep]).encode()
    if complete and not complete.endswith(b"\n"):
        complete += b"\n"
    return out, note, complete


def inspect(path: str | Path, *, target_json: dict | None = None, repair: bool = True) -> DatabaseInfo:
    """Validate a database folder with plain Python; raises DatabaseProblem with a one-line reason."""
    path = Path(path)
    if not path.is_dir():
        raise DatabaseProblem(f"{path} is not a folder")
    meta_path = path / META
    if not meta_path.exists():
        if (path / RECORDS).exists() or (path / WORKLOADS).exists():
            raise DatabaseProblem(f"{META} is missing, so its TVM version and target are unknown")
        raise DatabaseProblem(f"{META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        assert isinstance(meta, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as e:
        raise DatabaseProblem(f"{META} is not a JSON object") from e
    if meta.get("format") != FORMAT:
        raise DatabaseProblem(f"database format {meta.get('format')!r}, this graphgen writes format {FORMAT}")
    if meta.get("tvm") != tvm_version():
        raise DatabaseProblem(f"tuned with TVM {meta.get('tvm')}, this is TVM {tvm_version()}")
    if meta.get("schedules") != schedules_fingerprint():
        raise DatabaseProblem(f"tuned with other default schedules (graphgen defaults "
                              f"{meta.get('schedules') or 'unrecorded'}, these are {schedules_fingerprint()}): "
                              f"its records replay the old schedules")
    if meta.get("timing") != timing():
        raise DatabaseProblem(f"its records were timed {meta.get('timing') or 'with warm caches'}, this graphgen "
                              f"times {timing()}: the times do not compare")
    if target_json is not None and meta.get("target") != json.loads(_canonical(target_json)):
        raise DatabaseProblem(f"tuned for target {_canonical(meta.get('target') or {})}, "
                              f"not {_canonical(target_json)}")
    info = DatabaseInfo(path, meta)
    workloads, rep1, info.workload_bytes = _read_lines(path / WORKLOADS, WORKLOADS, repair)
    for i, w in enumerate(workloads):
        if not (isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) for x in w)):
            raise DatabaseProblem(f"{WORKLOADS} line {i + 1} is not a [hash, module] pair")
        info.workloads.append(w[0])
    records, rep2, info.record_bytes = _read_lines(path / RECORDS, RECORDS, repair, info.record_texts)
    for i, r in enumerate(records):
        if not (isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], list)
                and len(r[1]) >= 2):
            raise DatabaseProblem(f"{RECORDS} line {i + 1} is not a [workload, record] pair")
        if not 0 <= r[0] < len(workloads):
            raise DatabaseProblem(f"{RECORDS} line {i + 1} names workload {r[0]} of {len(workloads)}")
        run_secs = r[1][1]
        secs = [float(s) for s in run_secs] if isinstance(run_secs, list) and run_secs else [FAILED_SECONDS]
        st = info.stats.setdefault(info.workloads[r[0]], WorkloadStats())
        st.trials += 1
        med = sorted(secs)[len(secs) // 2]
        if med < FAILED_SECONDS:
            st.best_seconds = min(st.best_seconds, med)
        info.lines.append((info.workloads[r[0]], trace_key(r[1][0]), med))
    info.choices = read_choices(path)
    info.repaired = rep1 or rep2
    return info


def tuned_threads(path: str | Path) -> int | None:
    """The thread count (TVM's ``num-cores``) the database at ``path`` was tuned at, or None when
    it has no readable header."""
    try:
        meta = json.loads((Path(path) / META).read_text())
        return int(meta["target"]["num-cores"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def trace_key(trace_json) -> str:
    """16 hex digits naming a record's schedule (its trace as JSON)."""
    return hashlib.sha256(json.dumps(trace_json, separators=(",", ":")).encode()).hexdigest()[:16]


def read_choices(path: Path) -> dict[str, dict]:
    """``chosen.json`` of a database folder; missing or unreadable: no choices (builds then
    take TVM's fastest record, as before the file existed)."""
    try:
        d = json.loads((Path(path) / CHOICES).read_text())
        if isinstance(d, dict) and d.get("version") == CHOICES_VERSION and isinstance(d.get("workloads"), dict):
            return d["workloads"]
    except (OSError, ValueError):
        pass
    return {}


def write_choices(path: Path, choices: dict[str, dict]) -> None:
    tmp = Path(path) / (CHOICES + ".tmp")
    tmp.write_text(json.dumps({"version": CHOICES_VERSION, "workloads": dict(sorted(choices.items()))}, indent=1))
    tmp.replace(Path(path) / CHOICES)


def build_record_bytes(info: DatabaseInfo) -> bytes:
    """The record lines a build loads: for a workload with a choice that holds, only the
    records of the chosen schedule, or none where the choice is graphgen's default schedule
    (:meth:`DatabaseInfo.keeps_default`); every record of the other workloads."""
    keep = {}
    for h in info.choices:
        key = info.chosen_key(h)
        if key is not None:
            keep[h] = key
        elif info.keeps_default(h):
            keep[h] = None  # no record: the build gives the kernel its default schedule
    if not keep:
        return info.record_bytes
    out = [text for text, (h, key, _) in zip(info.record_texts, info.lines) if keep.get(h, key) == key]
    return ("\n".join(out) + "\n").encode() if out else b""


def set_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.set-aside-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.set-aside-{stamp}-{n}")
        n += 1
    path.rename(aside)
    return aside


def create(path: Path, target_json: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "tvm": tvm_version(), "schedules": schedules_fingerprint(), "timing": timing(),
            "target": json.loads(_canonical(target_json)), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(path / META)
    for name in (WORKLOADS, RECORDS):
        (path / name).touch()


@dataclass
class OpenDatabase:
    """A usable database: the folder's facts and TVM's JSONDatabase over it."""

    info: DatabaseInfo
    tvm_db: object  # tvm.s_tir.meta_schedule.database.JSONDatabase
    note: str | None = None  # one line when something was set aside or repaired

    @property
    def path(self) -> Path:
        return self.info.path

    def refresh(self) -> None:
        """Re-read the per-workload counts after tuning appended records."""
        self.info = inspect(self.info.path, repair=False)


def lock_path(path: Path) -> Path:
    """The lock file of a database folder: beside it, so it survives the folder being set aside."""
    return path.with_name(path.name + ".lock")


@contextmanager
def locked(path: str | Path):
    """Hold the database's lock for a tuning run: one writer per database.

    TVM's JSONDatabase keeps its own workload numbering in memory and appends, so two tuning
    runs appending to one folder would corrupt it. Raises UserError when another run holds it.
    """
    import fcntl

    from graphgen.errors import UserError

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock_path(path), "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UserError(f"another graphgen tune is using the tuning database {path}; one tuning run "
                            f"per database at a time (builds may read it meanwhile)") from e
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def is_locked(path: Path) -> bool:
    """Whether a tuning run holds the database's lock right now."""
    import fcntl

    lp = lock_path(Path(path))
    if not lp.exists():
        return False
    with open(lp, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def open_database(path: str | Path, target_json: dict, *, create_missing: bool = True,
                  report=None, snapshot: bool = False) -> OpenDatabase | None:
    """Open (creating when asked) the database at ``path`` for ``target_json``.

    Returns None when there is no database and ``create_missing`` is false. A database that
    cannot be used is reported through ``report`` in one line and moved aside; a fresh one is
    created in its place when ``create_missing`` (else None is returned). Never raises for a
    bad database.

    ``snapshot`` (builds): read-only; TVM loads a copy of the complete lines, so a tuning run
    appending meanwhile is neither disturbed nor mistaken for damage, and a database that
    fails while a tuning run holds its lock is reported, not moved.
    """
    import shutil
    import tempfile

    from tvm.s_tir import meta_schedule as ms

    report = report or (lambda msg: None)
    path = Path(path).expanduser()
    note = None
    for _ in range(2):
        if not path.exists():
            if not create_missing:
                return None
            create(path, target_json)
        try:
            info = inspect(path, target_json=target_json, repair=not snapshot)
            if snapshot:
                tmp = Path(tempfile.mkdtemp(prefix="graphgen-db-"))
                try:
                    (tmp / WORKLOADS).write_bytes(info.workload_bytes)
                    (tmp / RECORDS).write_bytes(build_record_bytes(info))
                    db = ms.database.JSONDatabase(str(tmp / WORKLOADS), str(tmp / RECORDS), allow_missing=False,
                                                  module_equality="structural")
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)  # loaded into memory; a build never writes
            else:
                db = ms.database.JSONDatabase(str(path / WORKLOADS), str(path / RECORDS), allow_missing=False,
                                              module_equality="structural")
            if info.repaired:
                note = f"tuning database {path}: {info.repaired}"
                report(note)
            return OpenDatabase(info, db, note)
        except DatabaseProblem as e:
            reason = str(e)
        except Exception as e:  # TVM could not load what plain JSON accepted (a module from another TVM)
            lines = str(e).strip().splitlines()
            reason = f"TVM cannot load it: {lines[-1][:160] if lines else type(e).__name__}"
        if snapshot and is_locked(path):
            note = f"tuning database {path} not used ({reason}); a tuning run is writing it"
            report(note)
            return None
        try:
            aside = set_aside(path)
            note = f"tuning database {path} set aside ({reason}); moved to {aside.name}"
        except OSError as e:
            note = f"tuning database {path} ignored ({reason}); could not move it aside: {e.strerror}"
            report(note)
            return None
        report(note)
        if not create_missing:
            return None
    return None


def workload_hash(mod) -> str:
    """The structural hash MetaSchedule's JSONDatabase files a workload under (its text form)."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod) & ((1 << 64) - 1))
