"""Tuning a model's kernels with MetaSchedule into the persistent database."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from graphgen.compile.targets import threads_text
from graphgen.errors import BuildError, GraphgenError, UserError
from graphgen.tune import database as dbm
from graphgen.tune import knob_search, measure, pipeline
from graphgen.tune.scheduler import Plan, TaskState, make_task_scheduler

#: trials per batch (one evolutionary-search round per batch)
DEFAULT_BATCH = 8
#: the budget when neither trials nor minutes are given
DEFAULT_TRIALS_PER_TASK = 32


@dataclass
class TuneResult:
    database: Path
    target: dict
    tasks: int
    covered: int  # tasks with at least one trial recorded
    trials_run: int  # this run
    trials_total: int  # recorded for this model's tasks, this run included
    seconds: float
    interrupted: bool
    estimated_ms_before: float | None  # sum over kernels of weight x best time, before this run
    estimated_ms_after: float | None
    per_task: list[dict] = field(default_factory=list)
    note: str | None = None
    runner: str = "local"
    retimed: int = 0  # schedules timed again at the end (each one more record in the database)

    def summary(self) -> str:
        est = ""
        if self.estimated_ms_after is not None:
            est = f"; kernels' tuned time {self.estimated_ms_after:.3g} ms"
            if self.estimated_ms_before is not None and self.estimated_ms_before != self.estimated_ms_after:
                est += f" (was {self.estimated_ms_before:.3g} ms)"
        state = "interrupted" if self.interrupted else "done"
        again = f", {self.retimed} schedules timed again" if self.retimed else ""
        threads = self.target.get("num-cores")
        at = f" at {threads_text(threads)}" if threads else ""
        return (f"tuning {state}: {self.trials_run} trials{again}{at} in {self.seconds:.0f} s "
                f"({self.trials_total} recorded for this model's {self.tasks} kernels, {self.covered} covered)"
                f"{est}; database {self.database}")

    def as_manifest(self) -> dict:
        return {"trials_run": self.trials_run, "trials_recorded": self.trials_total, "tasks": self.tasks,
                "tasks_covered": self.covered, "seconds": round(self.seconds, 1), "interrupted": self.interrupted,
                "runner": self.runner, "schedules_timed_again": self.retimed, "threads": self.target.get("num-cores")}


def _quiet_logger(name: str) -> logging.Logger:
    lg = logging.getLogger(f"graphgen.tune.ms.{name}")
    lg.setLevel(logging.WARNING)
    lg.propagate = False
    if not lg.handlers:
        lg.addHandler(logging.NullHandler())
    return lg


def _silence_meta_schedule() -> None:
    """MetaSchedule logs every trial at INFO; graphgen shows its own progress bar instead."""
    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    if lg.level == logging.NOTSET or lg.level < logging.WARNING:
        lg.setLevel(logging.WARNING)


class Progress:
    """One line: trials, tasks covered, the kernels' best total time so far, time left."""

    def __init__(self, plan: Plan, enabled: bool, stream=None):
        self.plan = plan
        self.bar = None
        self.t0 = time.monotonic()
        if enabled:
            from tqdm import tqdm

            total = plan.remaining() if plan.trials_budget is not None else None
            self.bar = tqdm(total=total, unit="trial", desc="tuning", file=stream or sys.stderr, leave=True,
                            dynamic_ncols=True, bar_format="{desc}: {n_fmt}/{total_fmt} trials |{bar:20}| {postfix}"
                            if total else "{desc}: {n_fmt} trials {postfix}")
            self.update(0)

    def update(self, n: int) -> None:
        if self.bar is None:
            return
        p = self.plan
        est = p.estimated_model_seconds() * 1e3
        covered = p.covered()
        left = p.time_left()
        if left is None and p.trials_budget is not None and p.used:
            rate = (time.monotonic() - self.t0) / p.used
            left = rate * (p.remaining() or 0)
        left_s = "?" if left is None else (f"{left / 60:.1f} min" if left >= 90 else f"{left:.0f} s")
        self.bar.set_postfix_str(f"tasks {covered}/{len(p.tasks)}, best {est:.3g} ms, left {left_s}", refresh=False)
        self.bar.update(n)

    def wrap(self, report):
        """``report`` that keeps the bar on its own line."""
        def say(msg: str) -> None:
            if self.bar is not None:
                self.bar.clear()
            report(msg)
            if self.bar is not None:
                self.bar.refresh()

        return say

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _make_measure_callback(plan: Plan, progress: Progress, hook=None):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class RecordResults(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            secs = []
            for rr in runner_results:
                rs = rr.run_secs
                if rs is not None and len(rs) and rr.error_msg is None:
                    vals = sorted(float(x) for x in rs)
                    secs.append(vals[len(vals) // 2])
                else:
                    secs.append(1e10)
            plan.used += len(secs)
            plan.record(int(task_id), secs)
            progress.update(len(secs))
            if hook is not None:
                hook(plan)

    return RecordResults()


COST_MODEL_FILE = "cost_model.tar"
#: candidates each evolutionary-search round mutates and scores with the cost model
EVOLUTION_POPULATION = 128
#: the XGBoost model predicts at random below this many samples; training earlier is wasted time
WARMUP_SAMPLES = 100


def _cost_model(opened, n_threads: int, report):
    """XGBoost cost model, resumed from the database folder when a previous run saved one.

    MetaSchedule retrains whenever the data grew by 20 %, which below its warm-up size (where
    it predicts at random anyway) meant a retrain after nearly every batch: 4 s each on a
    loaded 2-core host, the largest single cost measured. Training starts at the warm-up size.
    """
    from tvm.s_tir import meta_schedule as ms

    cm = ms.cost_model.XGBModel(num_tuning_cores=n_threads, num_warmup_samples=WARMUP_SAMPLES,
                                adaptive_training=True)
    saved = opened.path / COST_MODEL_FILE
    if saved.exists():
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # xgboost's notes on the saved model's format
                cm.load(str(saved))
        except Exception as e:  # noqa: BLE001 - a stale model only costs the warm-up again
            report(f"tuning database {opened.path}: ignoring its saved cost model ({type(e).__name__})")
    if cm.data_size < WARMUP_SAMPLES:
        cm.last_train_size = int(WARMUP_SAMPLES / 1.2)
    return cm


def _save_cost_model(cm, opened) -> None:
    if cm is None:
        return
    import warnings

    tmp = opened.path / (COST_MODEL_FILE + ".tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # xgboost: "Saving model in the UBJSON format as default"
            cm.save(str(tmp))
        tmp.replace(opened.path / COST_MODEL_FILE)
    except Exception:  # noqa: BLE001 - the records are what matter; the model is a speed-up
        tmp.unlink(missing_ok=True)


def _measure_schedules(picked, target, opened, builder, runner, rounds: int = 1) -> list[float]:
    """Build and time ``[(task index, workload, traced schedule)]`` and commit each as a tuning
    record; returns each one's median seconds (1e10: it failed to build or run).

    ``rounds`` > 1 times the built batch that many times, in alternating order, and returns the
    fastest round's median of each (one record per schedule holds all its timings)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    built = builder.build([BuilderInput(sch.mod, target) for _, _, sch in picked])
    run_idx = [k for k, b in enumerate(built) if b.error_msg is None]
    # arguments as the built kernel takes them: weights already repacked (the repacking runs
    # at compile time in a build, so it is not timed), as MetaSchedule measures its candidates
    args = [ArgInfo.from_entry_func(sch.mod, remove_preproc=True) for _, _, sch in picked]
    timings: dict[int, list[list[float]]] = {}  # candidate -> each round's timings
    for r in range(rounds):
        order = run_idx if r % 2 == 0 else run_idx[::-1]  # no schedule always runs first
        futures = runner.run([RunnerInput(built[k].artifact_path, "cpu", args[k]) for k in order])
        for k, f in zip(order, futures):
            rr = f.result()
            if rr.error_msg is None and rr.run_secs:
                timings.setdefault(k, []).append([float(x) for x in rr.run_secs])
    medians = []
    for k, (i, mod, sch) in enumerate(picked):
        rounds_k = timings.get(k, [])
        secs = [x for t in rounds_k for x in t]
        workload = opened.tvm_db.commit_workload(mod)
        opened.tvm_db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, secs if secs else [1e10], target, args[k]))
        medians.append(min(sorted(t)[len(t) // 2] for t in rounds_k) if rounds_k else 1e10)
    for b in built:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    return medians


def _measure_default_schedules(extracted, plan: Plan, opened, builder, runner, bar, hook=None) -> None:
    """Measure graphgen's default schedule of every kernel the database has no trial of, and
    record it like any trial.

    The database's best record is what a build applies, so a tuned kernel can never end up
    slower than the untuned default (measured without this: 257 trials reaching 4 of 27
    SqueezeNet kernels built a slower library than no tuning). It also gives the plan a real
    time for every kernel from the start, and the search a good record to start from.
    """
    from graphgen.tune.defaults import default_schedule, isa_of

    todo = [i for i, t in enumerate(plan.tasks) if t.total_trials == 0]
    if not todo or plan.finished():
        return
    remaining = plan.remaining()
    if remaining is not None:
        todo = sorted(todo, key=lambda i: -plan.tasks[i].flop * plan.tasks[i].weight)[:remaining]
    target = extracted[0].target
    isa = isa_of(target)
    picked = []
    for i in todo:
        mod = extracted[i].dispatched[0]
        try:
            sch, _ = default_schedule(mod["main"], isa, mod=mod)
        except Exception:  # noqa: BLE001 - no default for this kernel: the search starts from scratch
            continue
        picked.append((i, mod, sch))
    if not picked:
        return
    states = knob_search.load(opened.path)
    for (i, mod, _), med in zip(picked, _measure_schedules(picked, target, opened, builder, runner)):
        states.setdefault(dbm.workload_hash(mod), knob_search.KnobState()).record({}, med)
        plan.used += 1
        plan.record(i, [med])
        bar.update(1)
    knob_search.save(opened.path, states)
    if hook is not None:
        hook(plan)


#: settings built and timed per batch of the knob search (the progress bar moves, Ctrl-C and
#: the deadline are checked, and the search state is saved between batches)
KNOB_BATCH = 12


def _search_knobs(extracted, plan: Plan, opened, builder, runner, bar, report, hook=None) -> None:
    """Coordinate search over the knobs of graphgen's default schedules, biggest kernels first
    (see :mod:`graphgen.tune.knob_search`); every setting measured is a tuning record."""
    from graphgen.tune.defaults import Knobs, default_schedule, isa_of, variants

    target = extracted[0].target
    isa = isa_of(target)
    states = knob_search.load(opened.path)
    hashes = [dbm.workload_hash(t.dispatched[0]) for t in extracted]
    active = list(range(len(extracted)))
    measured = 0
    moved: set[int] = set()
    while active and not plan.finished():
        # this round: every active kernel's neighbourhood, the kernels taking most time first
        spf = plan.seconds_per_flop()
        active.sort(key=lambda i: -plan.tasks[i].estimated_seconds(spf))
        work = []  # (task, setting, neighbourhood)
        for i in list(active):
            st = states.setdefault(hashes[i], knob_search.KnobState())
            mod = extracted[i].dispatched[0]
            knobs = Knobs(st.best)
            try:
                default_schedule(mod["main"], isa, mod=mod, knobs=knobs)
                st.reopen_if_new_knobs(knobs.seen)
            except Exception:  # noqa: BLE001 - no default schedule: nothing to search
                st.done = True
            todo = knob_search.next_round(st, knobs.seen) if not st.done else []
            if not todo:
                st.done = True
                active.remove(i)
                continue
            around = [dict(st.best), *variants(knobs.seen, st.best)]
            work += [(i, c, around) for c in todo]
        remaining = plan.remaining()
        if remaining is not None:
            work = work[:remaining]
        for at in range(0, len(work), KNOB_BATCH):
            if plan.finished():
                break
            chunk = work[at:at + KNOB_BATCH]
            picked = []
            for i, c, _ in chunk:
                mod = extracted[i].dispatched[0]
                picked.append((i, mod, default_schedule(mod["main"], isa, mod=mod, knobs=Knobs(c))[0]))
            for (i, c, _), med in zip(chunk, _measure_schedules(picked, target, opened, builder, runner)):
                states[hashes[i]].record(c, med)
                plan.used += 1
                plan.record(i, [med])
                bar.update(1)
                measured += 1
            knob_search.save(opened.path, states)
            if hook is not None:
                hook(plan)
        # settle the kernels whose whole neighbourhood is measured now
        for i in list(active):
            st = states[hashes[i]]
            around = next((a for j, _, a in work if j == i), None)
            if around is None or not all(st.is_measured(c) for c in around):
                continue
            if st.settle(around):
                moved.add(i)
            if st.done:
                active.remove(i)
        knob_search.save(opened.path, states)
    if measured:
        gains = []
        for i in moved:
            st = states[hashes[i]]
            base = st.seconds({})
            if base < knob_search.FAILED and st.best_s < base:
                gains.append(1 - st.best_s / base)
        left = sum(1 for i in range(len(extracted)) if not states[hashes[i]].done) if states else 0
        report(f"graphgen schedules: {measured} settings measured; {len(gains)} kernels faster than their default"
               + (f" (by up to {max(gains):.0%})" if gains else "")
               + (f"; {left} kernels' search not finished" if left else ""))


#: the fastest distinct schedules of a workload timed again at the end of tuning, besides the default
CONFIRM_TOP = 3
#: how often each of them is timed then (alternating order)
CONFIRM_ROUNDS = 2
#: the share of a ``--minutes`` budget kept for timing them again
CONFIRM_SHARE = 0.15
#: workloads whose candidates are built and timed together (Ctrl-C and the deadline are checked between)
CONFIRM_BATCH = 6


def _confirm_candidates(extracted, opened, isa) -> list[tuple[int, str, list]]:
    """Per task with something to choose between: (task, workload hash, [traced schedules]):
    the CONFIRM_TOP fastest distinct schedules recorded, then graphgen's default schedule
    when it is not one of them."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    from graphgen.tune.defaults import default_schedule

    info = opened.info
    out = []
    for i, t in enumerate(extracted):
        mod = t.dispatched[0]
        h = dbm.workload_hash(mod)
        fastest: dict[str, int] = {}  # trace key -> its fastest line
        for line, (wh, key, med) in sorted(enumerate(info.lines), key=lambda e: e[1][2]):
            if wh == h and med < knob_search.FAILED and key not in fastest:
                fastest[key] = line
        if not fastest:
            continue
        workload = opened.tvm_db.commit_workload(mod)
        schedules = []
        for line in list(fastest.values())[:CONFIRM_TOP]:
            try:
                rec = ms.database.TuningRecord.from_json(json.loads(info.record_texts[line])[1], workload)
                sch = Schedule(mod)
                rec.trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception:  # noqa: BLE001 - a record that no longer replays is not a candidate
                continue
            schedules.append(sch)
        try:
            default, _ = default_schedule(mod["main"], isa, mod=mod)
            if not any(tvm.ir.structural_equal(default.mod, s.mod) for s in schedules):
                schedules.append(default)
        except Exception:  # noqa: BLE001 - no default schedule: choose among the records
            pass
        if len(schedules) > 1:
            out.append((i, h, schedules))
    return out


def _needs_choices(extracted, info) -> bool:
    """Whether a kernel of the model has records of several schedules and no choice that holds
    (a tuning run that stopped before choosing)."""
    for t in extracted:
        h = dbm.workload_hash(t.dispatched[0])
        keys = {key for wh, key, med in info.lines if wh == h and med < knob_search.FAILED}
        if len(keys) > 1 and info.chosen_key(h) is None:
            return True
    return False


def _confirm_choices(extracted, plan: Plan, opened, builder, runner, report, deadline: float | None = None) -> int:
    """Time each kernel's few fastest schedules again, side by side, and choose by those times.

    Every record is one timing, and on a noisy host the fastest of many timings is mostly the
    luckiest: TVM's pick of the fastest record chose slower schedules than the default
    (SqueezeNet: the default classifier kernel timed 1.63 ms in the tuner, 1.14 standalone).
    The choice goes to ``chosen.json`` (see :mod:`graphgen.tune.database`). Returns how many
    schedules were timed (each is one more record).
    """
    from graphgen.tune.defaults import isa_of

    opened.refresh()
    cands = _confirm_candidates(extracted, opened, isa_of(extracted[0].target))
    if not cands:
        return 0
    n = sum(len(s) for _, _, s in cands)
    report(f"timing again the {n} fastest schedules of {len(cands)} kernels, {CONFIRM_ROUNDS} rounds each")
    choices = dict(opened.info.choices)
    changed = confirmed = timed = 0
    target = extracted[0].target
    for at in range(0, len(cands), CONFIRM_BATCH):
        if plan.interrupted or (deadline is not None and time.monotonic() >= deadline):
            why = "stopped" if plan.interrupted else "time up"
            report(f"{why}: {len(cands) - at} kernels keep their fastest single timing")
            break
        chunk = cands[at:at + CONFIRM_BATCH]
        picked = [(i, extracted[i].dispatched[0], sch) for i, _, schedules in chunk for sch in schedules]
        first = len(opened.info.lines)
        medians = _measure_schedules(picked, target, opened, builder, runner, rounds=CONFIRM_ROUNDS)
        timed += len(picked)
        opened.refresh()
        k = 0
        for i, h, schedules in chunk:
            mine = medians[k:k + len(schedules)]
            lines = list(range(first + k, first + k + len(schedules)))
            k += len(schedules)
            best = min(range(len(mine)), key=lambda j: mine[j])
            if mine[best] >= knob_search.FAILED or lines[-1] >= len(opened.info.lines) or \
                    any(opened.info.lines[ln][0] != h for ln in lines):
                continue  # nothing ran, or the lines are not where they were committed
            choices[h] = {"line": lines[best], "records": opened.info.record_count(h),
                          "seconds": mine[best], "candidates": len(schedules)}
            confirmed += 1
            changed += best != 0
    dbm.write_choices(opened.path, choices)
    opened.refresh()
    report(f"chose by the new timings for {confirmed} kernels: {changed} of them take another schedule than "
           f"their fastest single timing")
    return timed


#: a kernel keeps its default schedule where its tuned one takes this much longer in the model
IN_MODEL_SLOWER = 1.10
#: ... and at least this much longer per call (below it, the medians' noise)
IN_MODEL_MIN_SECONDS = 3e-6
#: rounds of IN_MODEL_RUNS runs of each library (at least; each library first in turn, so
#: rounded up to an even count: graphgen.bench.round_orders)
IN_MODEL_ROUNDS = 3
IN_MODEL_RUNS = 20
#: the suffix layout rewriting adds to a kernel's name in the library
_PREPACKED = "_prepacked"


def in_model_check_enabled() -> bool:
    """Whether tuning ends with :func:`_confirm_in_model` (``GRAPHGEN_TUNE_IN_MODEL=0``: no)."""
    return os.environ.get("GRAPHGEN_TUNE_IN_MODEL", "1") != "0"


def _kernel_workloads(fused) -> dict[str, str]:
    """Each fused kernel's name -> its workload hash (as MetaSchedule's task of it files it)."""
    import tvm
    from tvm import tirx

    return {gv.name_hint: dbm.workload_hash(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}))
            for gv, f in fused.functions.items() if isinstance(f, tirx.PrimFunc)}


def _per_kernel(rows: list[tuple[str, float]]) -> dict[str, tuple[float, int]]:
    """Per kernel name (the layout suffix dropped, the VM's builtins left out): its calls' time
    summed, and how many calls."""
    out: dict[str, tuple[float, int]] = {}
    for name, seconds in rows:
        if name.startswith("vm."):
            continue
        name = name[:-len(_PREPACKED)] if name.endswith(_PREPACKED) else name
        total, n = out.get(name, (0.0, 0))
        out[name] = (total + seconds, n + 1)
    return out


def _confirm_in_model(onnx_model, spec, fused, opened, report) -> list[str]:
    """Time each kernel in the model, untuned and tuned, and keep the default schedule of
    those the tuned library runs slower.

    The tuner times each kernel alone, and a schedule faster alone can be slower in the model
    (measured, Xeon, ShuffleNetV2: its 116 -> 116 1x1 conv at 14x14, a positions-outside
    variant, 40.3 us alone against the default's 43.9, but 54-56 us in the model against
    39-41: the tuned model 6 % slower than the untuned one). Both libraries are built and
    profiled through the VM's instrument hook (:func:`graphgen.bench.kernel_times`), in
    rounds that each library starts in turn; a kernel whose calls take IN_MODEL_SLOWER times
    as long tuned (and IN_MODEL_MIN_SECONDS more per call) gets graphgen's default schedule as
    its choice in ``chosen.json``. Returns the names of those kernels."""
    import statistics

    from graphgen.bench import kernel_times, round_orders, set_tvm_threads
    from graphgen.compile import compile_model
    from graphgen.verify import random_inputs

    report("checking the tuned kernels in the model: building it untuned and tuned")
    workloads = _kernel_workloads(fused)
    inputs = random_inputs(onnx_model, 0)
    work = Path(tempfile.mkdtemp(prefix="graphgen-tune-model-"))
    try:
        libs = {"untuned": work / "untuned.so", "tuned": work / "tuned.so"}
        compile_model(onnx_model, spec, libs["untuned"], database=None, default_schedules=True)
        compile_model(onnx_model, spec, libs["tuned"], database=opened.path, default_schedules=True)
        set_tvm_threads(pipeline.num_cores_for(spec))
        rounds: dict[str, list[dict[str, tuple[float, int]]]] = {"untuned": [], "tuned": []}
        labels = list(libs)
        for order in round_orders(len(labels), IN_MODEL_ROUNDS):  # each library first in turn
            for label in (labels[i] for i in order):
                rounds[label].append(_per_kernel(kernel_times(libs[label], inputs, onnx_model, IN_MODEL_RUNS,
                                                              warmup=3)))
    finally:
        measure.clean(work)
    opened.refresh()
    choices = dict(opened.info.choices)
    slower = []
    for name, (_, n) in rounds["untuned"][-1].items():
        h = workloads.get(name)
        if h is None or not opened.info.record_count(h) or opened.info.keeps_default(h):
            continue  # not a tuned kernel, or its default already chosen
        before = statistics.median(r.get(name, (0.0, 0))[0] for r in rounds["untuned"])
        after = statistics.median(r.get(name, (0.0, 0))[0] for r in rounds["tuned"])
        if after > before * IN_MODEL_SLOWER and after - before > IN_MODEL_MIN_SECONDS * n:
            choices[h] = {"default": True, "records": opened.info.record_count(h),
                          "in_model_us": {"default": round(before * 1e6, 1), "tuned": round(after * 1e6, 1)}}
            slower.append(f"{name} ({after * 1e6:.0f} us tuned, {before * 1e6:.0f} us default)")
    if slower:
        dbm.write_choices(opened.path, choices)
        opened.refresh()
        report(f"in the model, {len(slower)} kernel(s) ran slower tuned than with graphgen's default schedule "
               f"and keep it: {'; '.join(slower[:4])}{' ...' if len(slower) > 4 else ''}")
    else:
        report("in the model, no tuned kernel ran slower than its default schedule")
    return [s.split(" (")[0] for s in slower]


def _default_space(isa):
    """A design space of one point, graphgen's default schedule: for kernels MetaSchedule's
    generic rules cannot schedule (they are never searched; MetaSchedule still initializes them)."""
    from tvm.s_tir import meta_schedule as ms

    from graphgen.tune.defaults import default_schedule

    def space(sch):
        try:
            return default_schedule(sch.mod["main"], isa, mod=sch.mod)[0]
        except Exception:  # noqa: BLE001 - never searched anyway
            return sch

    return ms.space_generator.ScheduleFn(space)


def _unsearchable(extracted, n_threads) -> list[int]:
    """Tasks whose design space MetaSchedule's generic CPU rules fail to generate (measured:
    graphgen's Winograd kernels, "TensorRegion pattern match failed" in space generation)."""
    from tvm.s_tir import meta_schedule as ms

    bad = []
    for i, t in enumerate(extracted):
        ctx = ms.TuneContext(mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
                             search_strategy=ms.search_strategy.ReplayTrace(), task_name=t.task_name,
                             logger=_quiet_logger(f"check{i}"), num_threads=n_threads).clone()
        try:
            ctx.space_generator.generate_design_space(ctx.mod)
        except Exception:  # noqa: BLE001 - any failure: this task is not searched
            bad.append(i)
    return bad


def _contexts(extracted, warm: bool, n_threads, seed: int, unsearchable=()) -> list:
    from tvm.s_tir import meta_schedule as ms

    from graphgen.tune.defaults import isa_of

    contexts = []
    for i, t in enumerate(extracted):
        strategy = (ms.search_strategy.EvolutionarySearch(population_size=EVOLUTION_POPULATION,
                                                          init_min_unmeasured=32, genetic_num_iters=2)
                    if warm else ms.search_strategy.ReplayTrace())
        space = _default_space(isa_of(t.target)) if i in unsearchable else "post-order-apply"
        contexts.append(ms.TuneContext(mod=t.dispatched[0], target=t.target, space_generator=space,
                                       search_strategy=strategy, task_name=t.task_name,
                                       logger=_quiet_logger(f"task{i}"), rand_state=seed * 1000 + i + 1,
                                       num_threads=n_threads).clone())
    return contexts


_INTRIN = "tvm.s_tir.tensor_intrin"


def _cpu_tensor_intrinsics():
    """Register only the CPU tensor intrinsics; returns a function that undoes the shortcut.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, which parses every tensor intrinsic
    TVM has: measured 38 s on a loaded 2-core host, 27.5 s of it CUDA's (rocm 5 s, hexagon
    2 s), once per tuning process. CPU tuning needs only the x86 and ARM ones (about 4 s).
    The package's folder stays importable, so an explicit ``import
    tvm.s_tir.tensor_intrin.cuda`` still works; afterwards the stand-in is removed and a later
    plain import runs the real ``__init__``.
    """
    import importlib
    import os
    import types

    if _INTRIN in sys.modules:
        return lambda: None
    import tvm.s_tir

    folder = os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")
    stand_in = types.ModuleType(_INTRIN)
    stand_in.__path__ = [folder]
    stand_in.__package__ = _INTRIN
    stand_in.__file__ = os.path.join(folder, "__init__.py")
    sys.modules[_INTRIN] = stand_in
    try:
        for sub in ("x86", "arm_cpu"):
            importlib.import_module(f"{_INTRIN}.{sub}")
    except Exception:  # noqa: BLE001 - fall back to the full import
        del sys.modules[_INTRIN]
        importlib.import_module(_INTRIN)
        return lambda: None

    def undo():
        if sys.modules.get(_INTRIN) is stand_in:
            del sys.modules[_INTRIN]

    return undo


def _catch_sigint(plan: Plan, report):
    """First Ctrl-C: finish the batch in flight (its trials are saved) and stop. Second: abort now.

    Without this, a KeyboardInterrupt raised inside one of MetaSchedule's C++ -> Python
    callbacks comes back as a bare RuntimeError from the middle of a build.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        if plan.interrupted:
            raise KeyboardInterrupt
        plan.interrupted = True
        report("Ctrl-C: stopping after the batch in flight (Ctrl-C again to abort at once)")

    previous = signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


def _interrupted(e: BaseException) -> bool:
    return isinstance(e, KeyboardInterrupt) or "KeyboardInterrupt" in f"{type(e).__name__}: {e}"


def tune_onnx(model, spec, *, trials: int | None = None, minutes: float | None = None, db: str | Path | None = None,
              rpc_tracker: str | None = None, rpc_key: str | None = None, progress: bool = False,
              report=None, batch: int = DEFAULT_BATCH, seed: int = 0, after_batch=None) -> TuneResult:
    """Tune the kernels of an (optimized) ONNX model for ``spec`` into the target's database.

    ``trials`` is the number of trials the model's kernels should have in the database when
    this returns (trials recorded earlier, by this model or another with the same kernels,
    count: running the same command again after Ctrl-C resumes). ``minutes`` bounds this run's
    wall time. With neither, the budget is 32 trials per kernel.
    """

    report = report or (lambda msg: None)
    if trials is not None and trials < 1:
        raise UserError(f"--trials {trials}: must be at least 1")
    if minutes is not None and minutes <= 0:
        raise UserError(f"--minutes {minutes}: must be positive")
    if spec.arch == "cuda":
        raise UserError("tuning covers CPU targets (x86, arm, armv7); the cuda target builds with TVM's "
                        "default GPU schedules")
    if rpc_tracker is None and rpc_key is not None or rpc_tracker is not None and rpc_key is None:
        raise UserError("--rpc-tracker HOST:PORT and --rpc-key KEY go together")
    if rpc_tracker is None and not spec.host_runnable:
        raise UserError(f"{spec.name} code cannot run on this host; tune on the board with "
                        f"--rpc-tracker HOST:PORT --rpc-key KEY")
    if rpc_tracker is not None:
        measure.check_tracker(rpc_tracker, rpc_key)
        # the board's runtime picks its own thread count (a runtime-only TVM takes no core list
        # over RPC), so the candidates run at the count its server was started with
        report(f"candidates run on the board at its server's thread count; for {pipeline.num_cores_for(spec)}, "
               f"start it with TVM_NUM_THREADS={pipeline.num_cores_for(spec)} python -m tvm.exec.rpc_server ...")

    from graphgen.tune import database_for

    target_json = pipeline.tuning_target_json(spec)
    db_path = database_for(spec, db)  # one tuned at another thread count is refused, not set aside
    with dbm.locked(db_path):
        opened = dbm.open_database(db_path, target_json, create_missing=True, report=report)
        if opened is None:
            raise UserError(f"cannot use the tuning database at {db_path}")
        return _tune_reporting(model, spec, opened, target_json, trials=trials, minutes=minutes,
                               rpc_tracker=rpc_tracker, rpc_key=rpc_key, progress=progress, report=report,
                               batch=batch, seed=seed, after_batch=after_batch)


def _tune_reporting(model, spec, opened, target_json, **kw) -> TuneResult:
    from graphgen.compile.tvm_build import import_onnx

    try:
        return _tune(import_onnx(model), spec, opened, target_json, onnx_model=model, **kw)
    except (GraphgenError, KeyboardInterrupt):
        raise
    except Exception as e:  # one line for the user; the trials measured so far stay in the database
        lines = str(e).strip().splitlines()
        raise BuildError(f"tuning failed: {lines[-1][:200] if lines else type(e).__name__} (the trials measured "
                         f"so far are in {opened.path})") from e


def _tune(relax_mod, spec, opened: dbm.OpenDatabase, target_json: dict, *, trials, minutes, rpc_tracker, rpc_key,
          progress, report, batch, seed, after_batch, onnx_model=None) -> TuneResult:
    import tvm
    from tvm.s_tir import meta_schedule as ms

    _silence_meta_schedule()
    t_start = time.monotonic()
    target = tvm.target.Target(target_json)
    fused = pipeline.fuse(relax_mod, target)
    extracted = pipeline.extract_tasks(fused, target)
    if not extracted:
        raise UserError("the model has no kernels to tune")
    info = opened.info
    states = []
    for t in extracted:
        mod = t.dispatched[0]
        st = info.stats.get(dbm.workload_hash(mod))
        from tvm.s_tir.analysis import estimate_tir_flops

        states.append(TaskState(name=t.task_name, weight=float(t.weight), flop=max(1.0, float(estimate_tir_flops(mod))),
                                prior_trials=st.trials if st else 0,
                                prior_best=st.best_seconds if st else math.inf))
    if trials is None and minutes is None:
        trials = DEFAULT_TRIALS_PER_TASK * len(states)
    # with a time budget, the search leaves CONFIRM_SHARE of it to timing the winners again
    plan = Plan(states, trials=trials, seconds=minutes * 60 * (1 - CONFIRM_SHARE) if minutes is not None else None,
                batch=batch)
    deadline = t_start + minutes * 60 if minutes is not None else None
    before = plan.estimated_model_seconds() * 1e3 if all(s.prior_best < math.inf for s in states) else None
    runner_name = f"rpc {rpc_tracker} key {rpc_key}" if rpc_tracker else "local"

    def result(interrupted: bool, t_end: float, retimed: int = 0) -> TuneResult:
        opened.refresh()
        total = 0
        per_task = []
        for s, t in zip(states, extracted):
            st = opened.info.stats.get(dbm.workload_hash(t.dispatched[0]))
            n = st.trials if st else 0
            total += n
            per_task.append({"name": s.name, "weight": s.weight, "flop": s.flop, "trials": n,
                             "best_us": round(st.best_seconds * 1e6, 2) if st and st.best_seconds < math.inf
                             else None})
        after = (sum(p["weight"] * p["best_us"] for p in per_task) / 1e3
                 if all(p["best_us"] is not None for p in per_task) else None)
        return TuneResult(opened.path, target_json, len(states), sum(1 for p in per_task if p["trials"]),
                          plan.used, total, t_end - t_start, interrupted, before, after, per_task, opened.note,
                          runner_name, retimed)

    if plan.finished() and not _needs_choices(extracted, opened.info):
        report(f"the database already has {sum(s.total_trials for s in states)} trials for this model's "
               f"{len(states)} kernels (budget {trials}); nothing to tune")
        return result(False, time.monotonic())

    n_threads = pipeline.num_cores_for(spec) if spec.host_runnable else "physical"
    work_dir = Path(tempfile.mkdtemp(prefix="graphgen-tune-"))
    bar = Progress(plan, progress)
    interrupted = False
    cost_model = None
    retimed = 0
    restore_sigint = _catch_sigint(plan, bar.wrap(report))
    undo_intrinsics = _cpu_tensor_intrinsics()
    try:
        builder = measure.in_process_builder(spec, work_dir)
        runner = (measure.rpc_runner(rpc_tracker, rpc_key) if rpc_tracker
                  else measure.local_runner(threads=n_threads if isinstance(n_threads, int) else None))
        callbacks = [*ms.MeasureCallback.create("default"), _make_measure_callback(plan, bar, after_batch)]
        cost_model = _cost_model(opened, n_threads if isinstance(n_threads, int) else 1, report)
        _measure_default_schedules(extracted, plan, opened, builder, runner, bar, after_batch)
        _search_knobs(extracted, plan, opened, builder, runner, bar, bar.wrap(report), after_batch)
        unsearchable = _unsearchable(extracted, n_threads) if not plan.finished() else []
        for i in unsearchable:
            states[i].searchable = False
        if unsearchable:
            bar.wrap(report)(f"{len(unsearchable)} of {len(states)} kernels get no MetaSchedule search (its "
                             f"rules cannot schedule them; they keep graphgen's measured schedules): "
                             f"{', '.join(states[i].name for i in unsearchable[:4])}"
                             f"{' ...' if len(unsearchable) > 4 else ''}")
        while not plan.finished():
            # Phase 1 samples at random (ReplayTrace) until the cost model has enough data to be
            # trained: evolution guided by an untrained model (which predicts at random) costs
            # ~10 s of mutation and postprocessing per batch here and finds nothing better.
            warm = cost_model.data_size >= WARMUP_SAMPLES
            contexts = _contexts(extracted, warm, n_threads, seed + plan.used, unsearchable)
            for t in plan.tasks:
                t.done = False
            stop = None if warm else (lambda: cost_model.data_size >= WARMUP_SAMPLES)
            scheduler = make_task_scheduler(plan, stop=stop)
            remaining = plan.remaining()
            max_global = remaining if remaining is not None else 1 << 30
            used_before = plan.used
            try:
                scheduler.tune(tasks=contexts, task_weights=[s.weight for s in states],
                               max_trials_global=max_global, max_trials_per_task=max(max_global, plan.batch),
                               num_trials_per_iter=plan.batch, builder=builder, runner=runner,
                               measure_callbacks=callbacks, database=opened.tvm_db, cost_model=cost_model)
            except BaseException as e:  # noqa: BLE001
                if not (plan.interrupted or _interrupted(e)):
                    raise
                interrupted = True
                break
            if plan.interrupted:
                interrupted = True
                break
            if warm and plan.used == used_before:
                break  # every task's search space is exhausted
        interrupted = interrupted or plan.interrupted
        if not interrupted:
            plan.deadline = deadline  # the progress bar counts down the whole budget
            retimed = _confirm_choices(extracted, plan, opened, builder, runner, bar.wrap(report), deadline)
            interrupted = plan.interrupted
            if not interrupted and onnx_model is not None and rpc_tracker is None and in_model_check_enabled():
                try:
                    _confirm_in_model(onnx_model, spec, fused, opened, bar.wrap(report))
                except Exception as e:  # noqa: BLE001 - the tuning is done; the check is a refinement
                    lines = str(e).strip().splitlines()
                    bar.wrap(report)(f"the check in the model did not run ({lines[-1][:160] if lines else type(e).__name__}); "
                                     f"the tuned schedules stand as timed alone")
    finally:
        restore_sigint()
        undo_intrinsics()
        bar.close()
        measure.clean(work_dir)
        if plan.used:
            _save_cost_model(cost_model, opened)
    return result(interrupted, time.monotonic(), retimed)
