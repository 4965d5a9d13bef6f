"""Fast CPU kernels: MetaSchedule tuning into a per-target database, and default schedules.

    import graphgen.tune
    res = graphgen.tune.tune("squeezenet1_1", "x86", trials=500)
    print(res.summary())

Every later ``graphgen build`` for the same target picks the database up automatically; a
kernel the database lacks gets graphgen's default schedule. See ``docs/tuning.md``.
"""

from __future__ import annotations

from pathlib import Path

from graphgen.tune.database import cache_dir, default_db_path, open_database
from graphgen.tune.tuner import TuneResult, tune_onnx

__all__ = ["TuneResult", "build_database", "cache_dir", "database_for", "default_count_database", "default_db_path",
           "manifest_section",
           "open_database", "tune", "tune_onnx"]


def database_for(spec, db: str | Path | None = None) -> Path:
    """Where the tuning database of ``spec`` lives (``db`` when given).

    A ``db`` tuned at another thread count than ``spec``'s is refused with a UserError naming
    both counts: its target would not match, and the database would be set aside as foreign.
    """
    from graphgen.compile.targets import threads_text
    from graphgen.errors import UserError
    from graphgen.tune.database import tuned_threads
    from graphgen.tune.pipeline import num_cores_for, tuning_target_json

    if db is None:
        return default_db_path(spec.name, tuning_target_json(spec))
    path = Path(db).expanduser()
    theirs, ours = tuned_threads(path), num_cores_for(spec)
    if theirs is not None and theirs != ours:
        raise UserError(f"--db {db} was tuned at {threads_text(theirs)}, this run is for {threads_text(ours)}; "
                        f"pass --threads {theirs}, or tune at {ours} into another folder")
    return path


def tune(model: str, target: str | dict = "x86", *, cpu: str | None = None, trials: int | None = None,
         minutes: float | None = None, db: str | Path | None = None, rpc_tracker: str | None = None,
         rpc_key: str | None = None, input_size=None, num_classes: int | None = None, options: dict | None = None,
         progress: bool = False, report=None, batch: int | None = None, seed: int = 0,
         threads: int | None = None) -> TuneResult:
    """Tune ``model`` (a recipe name or an .onnx path) for ``target``; see :func:`tune_onnx`.

    The model is optimized exactly as ``graphgen build`` optimizes it, so the kernels tuned
    here are the kernels the build compiles. ``threads``: the count candidates are timed at
    and whose database they go into (default: the host's physical cores, 4 for boards); a
    build with the same ``threads`` uses it.
    """
    from graphgen.api import load_model
    from graphgen.compile import resolve_target
    from graphgen.optimize import optimize
    from graphgen.tune.tuner import DEFAULT_BATCH

    spec = resolve_target(target, cpu=cpu, threads=threads)
    src = load_model(model, input_size=input_size, num_classes=num_classes, options=options)
    opt = optimize(src.model)
    return tune_onnx(opt.model, spec, trials=trials, minutes=minutes, db=db, rpc_tracker=rpc_tracker,
                     rpc_key=rpc_key, progress=progress, report=report, batch=batch or DEFAULT_BATCH, seed=seed)


def build_database(model, spec, *, tune: bool = False, trials: int | None = None, minutes: float | None = None,
                   db: str | Path | None = None, rpc_tracker: str | None = None, rpc_key: str | None = None,
                   progress=None, report=None) -> tuple[Path | None, TuneResult | None]:
    """For ``graphgen build``: tune first when asked, then say which database the compile uses.

    Without ``tune`` the target's database is used when it exists (every build reuses what
    any earlier tuning measured); ``db`` names another folder. CUDA builds use none.
    ``report`` hears that a build at a thread count with no database of its own has one at the
    default count. Returns (database folder or None, the tuning run's result or None).
    """
    from graphgen.errors import UserError

    if not tune and (trials is not None or minutes is not None):
        raise UserError("--trials and --minutes set the tuning budget; add --tune")
    if spec.arch == "cuda":
        if tune or db is not None:
            raise UserError("tuning and --db apply to CPU targets; the cuda target builds with TVM's GPU schedules")
        return None, None
    path = database_for(spec, db)
    result = None
    if tune:
        say = progress or (lambda msg: None)
        result = tune_onnx(model, spec, trials=trials, minutes=minutes, db=path, rpc_tracker=rpc_tracker,
                           rpc_key=rpc_key, progress=progress is not None, report=lambda m: say("      " + m))
        say("      " + result.summary())
        if result.interrupted:
            raise KeyboardInterrupt
    elif db is not None and not path.exists():
        raise UserError(f"--db {db}: no tuning database there (create one with graphgen tune ... --db {db})")
    elif not path.exists() and report is not None:
        _say_other_thread_count(spec, report)
    return (path if path.exists() else None), result


def default_count_database(spec):
    """(database, spec) tuned at the default thread count, where ``spec`` asks for another
    count and that default database exists; else None."""
    from graphgen.compile.targets import at_default_threads

    default = at_default_threads(spec)
    path = database_for(default)
    if path != database_for(spec) and path.exists():
        return path, default
    return None


def _say_other_thread_count(spec, say) -> None:
    """A build at a thread count with no database of its own, where the default count has one:
    say so (its schedules were chosen at another count, so the build does not take them)."""
    from graphgen.compile.targets import threads_text
    from graphgen.tune.pipeline import num_cores_for

    other = default_count_database(spec)
    if other is not None:
        n = num_cores_for(spec)
        say(f"      no tuning database tuned at {threads_text(n)} (there is one at "
            f"{threads_text(num_cores_for(other[1]))}): untuned; `graphgen tune MODEL --threads {n}` tunes one")


def manifest_section(build_info: dict, tune_result: TuneResult | None) -> dict:
    """The manifest's "tuning" section from what the compile and the tuning run reported."""
    sched = build_info.get("schedules")
    if sched is None or sched.get("pipeline") == "tvm-default":
        return {"status": "untuned", "note": "TVM's default pipeline for this target; no tuning database"}
    used = sched.get("from_database", 0)
    if tune_result is not None:
        status = "tuned"
    elif used:
        status = "database"
    else:
        status = "untuned"
    out = {"status": status, "database": sched.get("database"), "records_used": used,
           "kernels": sched.get("kernels"), "default_schedules": sched.get("default_schedule"),
           "plain_lowering": sched.get("plain_lowering")}
    if sched.get("database_records") is not None:
        out["database_records"] = sched["database_records"]
        out["database_choices"] = sched.get("database_choices", 0)
    if sched.get("database_note"):
        out["note"] = sched["database_note"]
    if tune_result is not None:
        out["trials"] = tune_result.as_manifest()
    return out
