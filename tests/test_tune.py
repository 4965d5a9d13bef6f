"""Tuning: the budget plan, the persistent database (and what happens when it is bad), Ctrl-C and
resume, RPC measurement through a tracker, builds that reuse the database, default schedules.

Trial budgets are tiny (a handful of trials on a 6-kernel model): these tests check the
machinery and correctness against onnxruntime, never speed.
"""

import json
import math
import os
import signal
from pathlib import Path

import pytest

from graphgen.builder import GraphBuilder
from graphgen.compile import compile_model, resolve_target, run_library
from graphgen.errors import UserError
from graphgen.tune import database as dbm
from graphgen.tune.scheduler import Plan, TaskState
from graphgen.verify import compare, random_inputs, run_onnxruntime


# -- the plan ---------------------------------------------------------------------------------

def _tasks(n, flop=1e6, weight=1.0):
    return [TaskState(name=f"t{i}", weight=weight, flop=flop * (i + 1)) for i in range(n)]


def test_plan_covers_every_task_before_any_second_batch():
    tasks = _tasks(27)
    plan = Plan(tasks, trials=27 * 8, seconds=None, batch=8)
    seen = []
    while True:
        i = plan.next_task()
        if i < 0:
            break
        if len(seen) < 27:
            assert i not in seen, "a task got a second batch before every task had one"
        seen.append(i)
        plan.used += plan.batch
        plan.record(i, [1e-3 / (1 + len(seen))] * plan.batch)
    assert sorted(set(seen)) == list(range(27))
    assert sum(t.total_trials for t in tasks) == 27 * 8
    # largest estimated time (FLOPs x weight) first
    assert seen[0] == 26


def test_plan_shrinks_the_batch_so_a_small_budget_still_reaches_every_task():
    plan = Plan(_tasks(27), trials=60, seconds=None, batch=8)
    assert plan.batch == 2  # 60 // 27
    covered = set()
    while (i := plan.next_task()) >= 0:
        covered.add(i)
        plan.used += plan.batch
        plan.record(i, [1e-3] * plan.batch)
    assert len(covered) == 27


def test_plan_counts_trials_already_in_the_database_and_weighs_time_and_gain():
    tasks = _tasks(3)
    tasks[0].prior_trials, tasks[0].prior_best = 40, 1e-3
    plan = Plan(tasks, trials=48, seconds=None, batch=4)
    assert plan.remaining() == 8
    first = plan.next_task()
    assert first in (1, 2) and tasks[first].total_trials == 0  # uncovered before anything else
    # after coverage the task with most time x gain wins: task 2 (slow kernel that keeps improving)
    tasks = _tasks(3)
    plan = Plan(tasks, trials=1000, seconds=None, batch=4)
    for i, best in ((0, 1e-4), (1, 1e-4), (2, 5e-3)):
        plan.record(i, [best] * 4)
    assert plan.next_task() == 2


def test_plan_stops_at_the_deadline_and_when_interrupted():
    now = [0.0]
    plan = Plan(_tasks(2), trials=None, seconds=10, batch=4, clock=lambda: now[0])
    assert plan.next_task() >= 0
    now[0] = 11.0
    assert plan.next_task() == -1
    plan = Plan(_tasks(2), trials=100, seconds=None, batch=4)
    plan.interrupted = True
    assert plan.next_task() == -1


# -- the database -----------------------------------------------------------------------------

TARGET = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64", "num-cores": 2}


def test_default_database_location_is_per_target_under_the_user_cache(cache):
    p1 = dbm.default_db_path("arm", {"kind": "llvm", "mcpu": "cortex-a72", "num-cores": 4})
    p2 = dbm.default_db_path("arm", {"kind": "llvm", "mcpu": "cortex-a53", "num-cores": 4})
    assert p1.parent == cache / "tuning" and p1 != p2 and "cortex-a72" in p1.name


def _messages():
    out = []
    return out, out.append


def test_corrupt_database_is_reported_in_one_line_and_set_aside(tmp_path):
    path = tmp_path / "db"
    dbm.create(path, TARGET)
    (path / dbm.RECORDS).write_text('[0, ["trace"]]\n{not json\n[1, 2]\n')
    msgs, say = _messages()
    opened = dbm.open_database(path, TARGET, report=say)
    assert opened is not None and opened.info.records == 0  # a fresh one in its place
    assert len(msgs) == 1 and "\n" not in msgs[0] and "set aside" in msgs[0] and "line 2" in msgs[0]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("db.set-aside-")]
    assert len(aside) == 1 and "{not json" in (aside[0] / dbm.RECORDS).read_text()


def test_database_from_another_tvm_version_is_set_aside(tmp_path):
    path = tmp_path / "db"
    dbm.create(path, TARGET)
    meta = json.loads((path / dbm.META).read_text())
    meta["tvm"] = "0.19.0"
    (path / dbm.META).write_text(json.dumps(meta))
    msgs, say = _messages()
    assert dbm.open_database(path, TARGET, create_missing=False, report=say) is None
    assert len(msgs) == 1 and "TVM 0.19.0" in msgs[0]
    assert not path.exists()


def test_database_made_with_other_default_schedules_is_set_aside(tmp_path):
    path = tmp_path / "db"
    dbm.create(path, TARGET)
    meta = json.loads((path / dbm.META).read_text())
    assert meta["schedules"] == dbm.schedules_fingerprint()
    meta["schedules"] = "0123456789ab"
    (path / dbm.META).write_text(json.dumps(meta))
    msgs = []
    assert dbm.open_database(path, TARGET, create_missing=False, report=msgs.append) is None
    assert len(msgs) == 1 and "default schedules" in msgs[0] and "0123456789ab" in msgs[0], msgs
    assert not path.exists() and any(p.name.startswith("db.set-aside-") for p in tmp_path.iterdir())


def test_database_timed_another_way_is_set_aside(tmp_path):
    """Records timed on warm caches (before the timing flushed them) do not compare with new ones."""
    path = tmp_path / "db"
    dbm.create(path, TARGET)
    meta = json.loads((path / dbm.META).read_text())
    assert meta["timing"] == dbm.timing()
    del meta["timing"]  # a database made before the timing was recorded
    (path / dbm.META).write_text(json.dumps(meta))
    msgs = []
    assert dbm.open_database(path, TARGET, create_missing=False, report=msgs.append) is None
    assert len(msgs) == 1 and "timed with warm caches" in msgs[0] and dbm.timing() in msgs[0], msgs


def _record_line(workload: int, trace: str, seconds: float) -> str:
    return json.dumps([workload, [[[trace]], [seconds], {"kind": "llvm"}, []]])


def _two_workload_db(path):
    """Workload 0 has three records of two schedules ("fast" timed once at 1 us, "slow" at
    2 us and 3 us); workload 1 has one record."""
    dbm.create(path, TARGET)
    (path / dbm.WORKLOADS).write_text('["111", "bW9k"]\n["222", "bW9k"]\n')
    lines = [_record_line(0, "fast", 1e-6), _record_line(0, "slow", 2e-6), _record_line(1, "other", 5e-6),
             _record_line(0, "slow", 3e-6)]
    (path / dbm.RECORDS).write_text("\n".join(lines) + "\n")
    return lines


def test_a_build_keeps_only_the_chosen_schedules_records_while_the_choice_holds(tmp_path):
    path = tmp_path / "db"
    lines = _two_workload_db(path)
    info = dbm.inspect(path)
    assert [k for _, k, _ in info.lines][1] == [k for _, k, _ in info.lines][3]  # one key per schedule
    assert dbm.build_record_bytes(info) == info.record_bytes  # no choices: every record
    # the re-timing chose "slow" (line 1) among workload 0's three records
    dbm.write_choices(path, {"111": {"line": 1, "records": 3, "seconds": 2e-6}})
    info = dbm.inspect(path)
    assert info.chosen_key("111") == info.lines[1][1] and info.chosen_key("222") is None
    kept = dbm.build_record_bytes(info).decode().splitlines()
    assert kept == [lines[1], lines[2], lines[3]]  # "fast" dropped, workload 1 untouched
    # a record added since the choice (a run that stopped before choosing): all records again
    (path / dbm.RECORDS).write_text("\n".join(lines + [_record_line(0, "new", 0.5e-6)]) + "\n")
    info = dbm.inspect(path)
    assert info.chosen_key("111") is None and dbm.build_record_bytes(info) == info.record_bytes
    # a choice naming another workload's line, or a line past the end, or an unreadable file: ignored
    for bad in ({"111": {"line": 2, "records": 4}}, {"111": {"line": 40, "records": 4}}):
        dbm.write_choices(path, bad)
        assert dbm.inspect(path).chosen_key("111") is None
    (path / dbm.CHOICES).write_text("{not json")
    assert dbm.inspect(path).choices == {}


def test_a_workload_whose_choice_is_the_default_schedule_gets_no_record_while_the_choice_holds(tmp_path):
    """The tuner's check in the model can choose graphgen's default schedule for a workload: a
    build then loads none of its records (the kernel gets the default schedule), until records
    are added after the choice."""
    path = tmp_path / "db"
    lines = _two_workload_db(path)
    dbm.write_choices(path, {"111": {"default": True, "records": 3, "in_model_us": {"default": 5.0, "tuned": 9.0}}})
    info = dbm.inspect(path)
    assert info.keeps_default("111") and not info.keeps_default("222") and info.chosen_key("111") is None
    assert dbm.build_record_bytes(info).decode().splitlines() == [lines[2]]  # workload 1's record only
    (path / dbm.RECORDS).write_text("\n".join(lines + [_record_line(0, "new", 0.5e-6)]) + "\n")
    info = dbm.inspect(path)
    assert not info.keeps_default("111") and dbm.build_record_bytes(info) == info.record_bytes


def test_schedules_fingerprint_follows_the_code_not_its_comments():
    src = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    same = '# header\ndef f(x):\n    """Another doc."""\n    return x + 1\n'
    other = 'def f(x):\n    """Doc."""\n    return x + 2\n'
    assert dbm._code_fingerprint(src) == dbm._code_fingerprint(same)
    assert dbm._code_fingerprint(src) != dbm._code_fingerprint(other)


def test_database_tvm_cannot_load_is_set_aside(tmp_path):
    path = tmp_path / "db"
    dbm.create(path, TARGET)
    (path / dbm.WORKLOADS).write_text('["123", "bm90IGEgbW9kdWxl"]\n')  # valid JSON, not a module
    msgs, say = _messages()
    assert dbm.open_database(path, TARGET, create_missing=False, report=say) is None
    assert len(msgs) == 1 and "TVM cannot load it" in msgs[0]


def test_half_written_last_line_is_repaired_in_place(tmp_path):
    path = tmp_path / "db"
    dbm.create(path, TARGET)
    (path / dbm.RECORDS).write_text('[0, [')  # killed mid-append
    info = dbm.inspect(path, target_json=TARGET)
    assert info.repaired and info.records == 0
    assert (path / dbm.RECORDS).read_text() == ""


def test_a_build_reads_a_snapshot_while_a_tuning_run_appends(tmp_path):
    """A half-written last line during a build is a tuning run mid-append: read around, never cut
    off or set aside; a second tuning run on the same database is refused in one line."""
    path = tmp_path / "db"
    dbm.create(path, TARGET)
    (path / dbm.RECORDS).write_text('[0, [')
    with dbm.locked(path):
        assert dbm.is_locked(path)
        opened = dbm.open_database(path, TARGET, create_missing=False, snapshot=True)
        assert opened is not None and opened.info.records == 0
        assert (path / dbm.RECORDS).read_text() == "[0, ["  # untouched
        with pytest.raises(UserError, match="another graphgen tune is using") as e:
            with dbm.locked(path):
                pass
        assert "\n" not in str(e.value)
    assert not dbm.is_locked(path)


def test_database_for_another_target_is_not_used(tmp_path):
    path = tmp_path / "db"
    dbm.create(path, TARGET)
    other = {**TARGET, "mcpu": "skylake"}
    msgs, say = _messages()
    assert dbm.open_database(path, other, create_missing=False, report=say) is None
    assert "tuned for target" in msgs[0]


def test_build_with_a_corrupt_default_database_still_builds_and_says_why(cache, tiny_onnx, tmp_path, in_tmp):
    from graphgen import api
    from graphgen.tune import database_for

    spec = resolve_target("x86")
    path = database_for(spec)
    path.mkdir(parents=True)
    (path / dbm.META).write_text("garbage")
    logs = []
    res = api.build(str(tiny_onnx), "x86", out=tmp_path / "out", progress=logs.append)
    t = res.manifest["tuning"]
    assert res.manifest["verification"]["status"] == "passed"
    assert t["status"] == "untuned" and t["database"] is None
    assert "set aside" in t["note"] and any("set aside" in m for m in logs)


# -- tuning, Ctrl-C, resume, builds that reuse the database ---------------------------------

def test_tune_interrupt_resume_and_every_later_build_reuses_the_database(cache, tiny_onnx, tmp_path, in_tmp):
    """One flow (TVM start-up is paid once): Ctrl-C after the first batch keeps its trials; the
    same call resumes to the budget; a plain build of the model then takes every kernel's
    schedule from the default database and still matches onnxruntime."""
    import onnx

    from graphgen import api
    from graphgen.tune import tune_onnx

    spec = resolve_target("x86")
    model = onnx.load(str(tiny_onnx))
    batches = []

    def ctrl_c_after_first_batch(plan):
        batches.append(plan.used)
        if len(batches) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: finish the batch, then stop

    # the first round measures graphgen's default schedule of each kernel (5 or 6, depending
    # on whether the optimizer leaves the flatten as a kernel of its own)
    first = tune_onnx(model, spec, trials=12, batch=2, after_batch=ctrl_c_after_first_batch)
    n = first.tasks
    assert n in (5, 6)
    assert first.interrupted and first.trials_run == n and first.trials_total == n and first.covered == n
    assert first.database == dbm.default_db_path("x86", {**spec.tvm_json, "num-cores": first.target["num-cores"]})
    defaults = {p["name"]: p["best_us"] for p in first.per_task}
    said = []
    second = tune_onnx(model, spec, trials=12, batch=2, report=said.append)
    assert not second.interrupted
    assert second.trials_run >= 12 - n and second.trials_total >= 12  # resumed, not restarted
    assert second.trials_run < 12 - n + 2  # within one batch of the budget
    assert second.tasks == n and second.covered == n
    # the database keeps the best record per kernel: never worse than the default schedule
    assert all(p["best_us"] <= defaults[p["name"]] for p in second.per_task)
    assert all(p["best_us"] is not None and p["best_us"] > 0 for p in second.per_task)
    assert second.estimated_ms_after is not None and math.isfinite(second.estimated_ms_after)
    # the run ends by timing each kernel's fastest schedules again and choosing by those times
    assert any(m.startswith("timing again the ") for m in said), said
    info = dbm.inspect(second.database)
    chosen = {h for h in info.choices if info.chosen_key(h)}
    assert chosen and all(info.lines[c["line"]][0] == h for h, c in info.choices.items())
    # a chosen record is what a build's database answers, even where it is not the fastest timing
    _assert_builds_take_the_chosen_records(second.database, spec, model, info, chosen)
    # nothing left to do: the budget is already in the database, and the choices are made
    third = tune_onnx(model, spec, trials=second.trials_total)
    assert third.trials_run == 0 and third.retimed == 0
    # a run that stopped before choosing (here: the choices lost) is chosen again by the next
    # run, although its trial budget is met
    (second.database / dbm.CHOICES).unlink()
    fourth = tune_onnx(model, spec, trials=second.trials_total)
    assert fourth.trials_run == 0 and fourth.retimed > 0
    info = dbm.inspect(second.database)
    chosen = {h for h in info.choices if info.chosen_key(h)}
    assert chosen

    res = api.build(str(tiny_onnx), "x86", out=tmp_path / "built")
    t = res.manifest["tuning"]
    assert res.manifest["verification"]["status"] == "passed"
    assert t["status"] == "database" and t["records_used"] == t["kernels"] == n
    assert t["database"] == str(first.database) and t["database_records"] == second.trials_total + fourth.retimed
    assert t["database_choices"] == len(chosen)

    # --tune in the build: budget already met, the manifest records the (empty) run
    res = api.build(str(tiny_onnx), "x86", out=tmp_path / "built2", tune=True, trials=second.trials_total)
    assert res.manifest["tuning"]["status"] == "tuned" and res.manifest["tuning"]["trials"]["trials_run"] == 0


def _assert_builds_take_the_chosen_records(path, spec, model, info, chosen):
    """For every kernel with a choice, point it at its slowest record instead; the database a
    build opens must then answer that record, not the fastest."""
    import tvm

    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune import pipeline

    target_json = json.loads((path / dbm.META).read_text())["target"]
    target = tvm.target.Target(target_json)
    tasks = pipeline.extract_tasks(pipeline.fuse(import_onnx(model), target), target)
    slowest = {}
    for h in chosen:
        mine = [(med, line) for line, (wh, _, med) in enumerate(info.lines) if wh == h and med < 1e9]
        slowest[h] = max(mine)[1]
    dbm.write_choices(path, {h: {**info.choices[h], "line": slowest[h]} for h in chosen})
    try:
        opened = dbm.open_database(path, target_json, create_missing=False, snapshot=True)
        checked = 0
        for t in tasks:
            mod = t.dispatched[0]
            h = dbm.workload_hash(mod)
            if h not in chosen:
                continue
            rec = opened.tvm_db.query_tuning_record(mod, target, "main")
            key = info.lines[slowest[h]][1]
            allowed = {tuple(round(float(x), 12) for x in json.loads(text)[1][1])
                       for text, (wh, k, _) in zip(info.record_texts, info.lines) if wh == h and k == key}
            assert tuple(round(float(x), 12) for x in rec.run_secs) in allowed
            checked += 1
        assert checked == len(chosen)
        # the check can fail: some kernel's slowest schedule is not its fastest one
        fastest = {h: min((med, line) for line, (wh, _, med) in enumerate(info.lines) if wh == h)[1] for h in chosen}
        assert any(info.lines[fastest[h]][1] != info.lines[slowest[h]][1] for h in chosen)
    finally:
        dbm.write_choices(path, info.choices)


def test_rpc_tracker_measures_on_a_registered_server(cache, tiny_onnx, tmp_path):
    """A TVM RPC tracker and server on 127.0.0.1 stand in for a board farm."""
    import onnx
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    from graphgen.tune import measure, tune_onnx

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9390, silent=True)
    server = Server(host="127.0.0.1", port=9400, port_end=9600, key="graphgen-test",
                    tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        addr = f"127.0.0.1:{tracker.port}"
        import time

        for _ in range(40):  # the server registers asynchronously
            try:
                measure.check_tracker(addr, "graphgen-test")
                break
            except UserError:
                time.sleep(0.25)
        with pytest.raises(UserError, match="no server with key 'nope'"):
            measure.check_tracker(addr, "nope")
        said = []
        res = tune_onnx(onnx.load(str(tiny_onnx)), resolve_target("x86", threads=1), trials=8, batch=2,
                        db=tmp_path / "rpcdb", rpc_tracker=addr, rpc_key="graphgen-test", report=said.append)
        # the board's thread count is its server's: the run says how to make it the one asked for
        assert any("TVM_NUM_THREADS=1 python -m tvm.exec.rpc_server" in m for m in said), said
        assert res.target["num-cores"] == 1
        # a default schedule per kernel, then MetaSchedule batches, all timed on the RPC server
        assert res.runner.startswith("rpc") and res.trials_run >= 8 and res.trials_total == res.trials_run + res.retimed
        assert res.covered == res.tasks and all(p["best_us"] for p in res.per_task)
        assert any(p["trials"] > 1 for p in res.per_task)  # the search ran too
    finally:
        server.terminate()
        tracker.terminate()


def test_tuning_argument_errors_are_one_line_user_errors(tiny_onnx, tmp_path):
    import onnx

    from graphgen.tune import build_database, tune_onnx

    model = onnx.load(str(tiny_onnx))
    with pytest.raises(UserError, match="HOST:PORT"):
        tune_onnx(model, resolve_target("x86"), trials=2, db=tmp_path / "d", rpc_tracker="nohost", rpc_key="k")
    with pytest.raises(UserError, match="go together"):
        tune_onnx(model, resolve_target("x86"), trials=2, db=tmp_path / "d", rpc_tracker="127.0.0.1:1")
    with pytest.raises(UserError, match="cannot reach the RPC tracker"):
        tune_onnx(model, resolve_target("x86"), trials=2, db=tmp_path / "d", rpc_tracker="127.0.0.1:1", rpc_key="k")
    with pytest.raises(UserError, match="--rpc-tracker"):
        tune_onnx(model, resolve_target("arm"), trials=2, db=tmp_path / "d")
    with pytest.raises(UserError, match="add --tune"):
        build_database(model, resolve_target("x86"), trials=5)
    with pytest.raises(UserError, match="CPU targets"):
        build_database(model, resolve_target("cuda"), tune=True)


def test_cli_tune_and_build_flags(cache, tiny_onnx, tmp_path, capsys):
    from graphgen.cli import main

    assert main(["build", str(tiny_onnx), "--trials", "4", "-o", str(tmp_path / "x")]) == 2
    assert "add --tune" in capsys.readouterr().err
    assert main(["tune", str(tiny_onnx), "--rpc-tracker", "bad", "--rpc-key", "k"]) == 2
    assert main(["build", str(tiny_onnx), "--db", str(tmp_path / "none"), "-o", str(tmp_path / "y")]) == 2
    assert "no tuning database there" in capsys.readouterr().err


# -- default schedules ------------------------------------------------------------------------

def _conv_zoo_model():
    """Each kernel class the default schedules cover: regular, strided, grouped, depthwise and
    1x1 convs with their fused tails (bias, relu, relu6, residual add), pooling, dense."""
    b = GraphBuilder("kinds")
    x = b.input("input", (1, 3, 30, 30))
    x = b.relu(b.conv(x, 16, 3, stride=2, padding=1, name="stem"))           # 15x15, odd widths
    y = b.relu6(b.conv(x, 16, 3, padding=1, groups=16, name="dw"))            # depthwise
    y = b.conv(y, 24, 1, name="pw")                                           # 1x1
    g = b.relu(b.conv(y, 24, 3, padding=1, groups=4, name="grouped"))         # grouped
    y = b.add(y, g)                                                           # residual tail
    y = b.max_pool(y, 3, 2, padding=1)
    y = b.avg_pool(y, 2, 2)
    y = b.relu(b.conv(y, 32, 3, padding=1, bias=False, name="nobias"))
    y = b.linear(b.flatten(b.global_avg_pool(y)), 10, name="fc")
    b.output(y, "out")
    return b.build()


@pytest.mark.parametrize("target", ["x86"])
def test_default_schedules_cover_every_kernel_class_and_match_onnxruntime(tmp_path, target):
    from graphgen.optimize import optimize

    model = optimize(_conv_zoo_model()).model
    spec = resolve_target(target)
    info = compile_model(model, spec, tmp_path / "m.so", default_schedules=True)
    s = info["schedules"]
    assert s["from_database"] == 0 and s["default_schedule"] >= 8, s
    assert not s.get("default_schedule_failures"), s
    x = random_inputs(model)
    c = compare(run_library(tmp_path / "m.so", spec, model, x), run_onnxruntime(model, x), ["out"], 1e-5)
    assert c.ok, c.summary()


def test_a_class_schedule_that_raises_falls_back_to_generic_and_says_so(tmp_path, monkeypatch):
    """A bug in a class's schedule (anything but NotMatched) must not pass unnoticed as a slower
    build: the kernel gets the generic schedule (still correct), the build records which class
    raised what, and the log says it."""
    from graphgen.testing import single_conv_model
    from graphgen.tune import defaults

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setitem(defaults._MAIN, "phase_depthwise", broken)
    model = single_conv_model(16, 16, 28, groups=16)
    spec = resolve_target("x86")
    said: list[str] = []
    info = compile_model(model, spec, tmp_path / "m.so", default_schedules=True, log=said.append)
    s = info["schedules"]
    assert s["default_schedule_kinds"] == {"generic": 1}, s
    assert s["default_schedule_fallbacks"] == ["broken (phase_depthwise): IndexError: list index out of range"], s
    assert any("generic schedule" in m and "IndexError" in m for m in said), said
    x = random_inputs(model)
    c = compare(run_library(tmp_path / "m.so", spec, model, x), run_onnxruntime(model, x), ["out"], 1e-5)
    assert c.ok, c.summary()


def test_a_kernel_outside_its_class_falls_back_quietly(tmp_path, monkeypatch):
    from graphgen.testing import single_conv_model
    from graphgen.tune import defaults

    def not_this_class(*args, **kwargs):
        raise defaults.NotMatched("two outputs")

    monkeypatch.setitem(defaults._MAIN, "phase_depthwise", not_this_class)
    info = compile_model(single_conv_model(16, 16, 28, groups=16), resolve_target("x86"), tmp_path / "m.so",
                         default_schedules=True)
    assert info["schedules"]["default_schedule_kinds"] == {"generic": 1}
    assert "default_schedule_fallbacks" not in info["schedules"]


def _classifier_model(features: int, classes: int, batch: int = 1):
    b = GraphBuilder(f"fc_{features}_{classes}_{batch}")
    x = b.input("input", (batch, features))
    b.output(b.linear(x, classes, name="fc"), "out")
    return b.build()


def test_dense_chains_are_blocks_of_output_features_that_leave_tiles_for_the_cores():
    from graphgen.tune.defaults import _dense_chains

    assert _dense_chains(1, 125, 1) == [5, 1]      # 1000 classes in 8-lane blocks: 25 tiles of 5
    assert _dense_chains(1, 64, 1) == [8, 4, 2, 1]  # 1024 in 16-lane blocks
    assert _dense_chains(1, 125, 3) == [1]          # 3-register blocks: 5 x 3 > FMA_CHAINS
    assert _dense_chains(1, 7, 1) == [1]            # a prime block count: one block a tile
    assert _dense_chains(8, 125, 1) == [1, 5]       # batches: the rows are the chains


@pytest.mark.parametrize("option", [0, 1])
@pytest.mark.parametrize("batch", [1, 2])
def test_every_dense_chain_count_matches_onnxruntime(option, batch, tmp_path, monkeypatch):
    """A classifier at batch 1 runs several blocks of output features a tile, each block its own
    accumulator (one block alone is a chain of FMAs as long as the input: latency-bound); the
    weights are repacked to match. Every option against onnxruntime, the default's layout read
    off the kernel."""
    from graphgen.compile.tvm_build import import_onnx
    from graphgen.testing import every_knob_at
    from graphgen.tune.pipeline import fuse, schedule_kernels
    from tvm import tirx

    model = _classifier_model(256, 1000, batch)
    if option == 0 and batch == 1:
        target = resolve_target("avx512").tvm_target()
        with target:
            mod = schedule_kernels(fuse(import_onnx(model), target), target)
        (f,) = [f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and "matmul" in gv.name_hint]
        text = f.script()
        # 25 tiles of 5 blocks of 8 classes, the weights repacked [25, 256, 5, 8]
        assert "T.unroll(T.int64(5))" in text, text
        assert "param_0_global[v_i1 // T.int64(40), v_k, v_i1 % T.int64(40) // T.int64(8), v_i1 % T.int64(8)]" in text
    seen = every_knob_at(option, monkeypatch)
    spec = resolve_target("x86")
    info = compile_model(model, spec, tmp_path / "m.so")
    assert info["schedules"]["default_schedule_kinds"] == {"dense": 1}, info["schedules"]
    x = random_inputs(model)
    c = compare(run_library(tmp_path / "m.so", spec, model, x), run_onnxruntime(model, x), ["out"], 1e-5)
    assert c.ok, c.summary()
    assert seen["dense.chains"] == 2, seen


@pytest.mark.parametrize("c,hw", [(40, 13), (24, 7), (8, 3)])
def test_global_average_pools_sum_in_independent_chains_and_match_onnxruntime(c, hw, tmp_path):
    """A mean over rows and columns sums each column position apart (rfactor: ``hw``
    independent chains of adds, the rows outside them), then adds those sums; 3 columns are too
    few to split. Against onnxruntime."""
    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune.pipeline import fuse, schedule_kernels
    from tvm import tirx

    b = GraphBuilder(f"gap_{c}_{hw}")
    x = b.input("input", (1, c, hw, hw))
    b.output(b.flatten(b.global_avg_pool(b.relu(x))), "out")
    model = b.build()
    target = resolve_target("x86").tvm_target()
    with target:
        mod = schedule_kernels(fuse(import_onnx(model), target), target)
    texts = [f.script() for _, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    assert any("_rf" in t for t in texts) == (hw >= 4), texts
    if hw >= 4:
        (t,) = [t for t in texts if "_rf" in t]
        assert f"in T.unroll(T.int64({hw})):" in t, t
    spec = resolve_target("x86")
    info = compile_model(model, spec, tmp_path / "m.so")
    assert not info["schedules"].get("default_schedule_failures"), info["schedules"]
    xs = random_inputs(model)
    cmp = compare(run_library(tmp_path / "m.so", spec, model, xs), run_onnxruntime(model, xs), ["out"], 1e-5)
    assert cmp.ok, cmp.summary()


def _split_add_model(c: int, hw: int):
    """A channel split whose halves are added: two kernels with no reduction (split, add)."""
    b = GraphBuilder(f"split_add_{c}_{hw}")
    x = b.input("input", (1, c, hw, hw))
    lo, hi = b.split(x, [c // 2, c // 2])
    b.output(b.relu(b.add(lo, hi)), "out")
    return b.build()


def _parallel_loops(func) -> int:
    return func.script().count("T.parallel(")


@pytest.mark.parametrize("c, hw, parallel", [(16, 16, False), (64, 64, True)])
def test_small_copies_and_elementwise_kernels_stay_on_one_thread(c, hw, parallel, tmp_path):
    """Handing a parallel loop to a second thread costs microseconds: kernels of a few thousand
    elements (ShuffleNetV2's splits) run serial, big ones parallel; both match onnxruntime."""
    from tvm import tirx

    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune.defaults import PARALLEL_MIN_ITERATIONS, isa_of, schedule_func
    from graphgen.tune.pipeline import fuse

    model = _split_add_model(c, hw)
    spec = resolve_target("x86")
    assert (c * hw * hw // 2 >= PARALLEL_MIN_ITERATIONS) == parallel
    mod = fuse(import_onnx(model), spec.tvm_target())
    kernels = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert kernels
    for f in kernels:
        scheduled, kind = schedule_func(f, isa_of(spec.tvm_target()))
        assert kind == "generic"
        assert (_parallel_loops(scheduled) > 0) == parallel, scheduled.script()
    compile_model(model, spec, tmp_path / "m.so")
    x = random_inputs(model)
    c_ = compare(run_library(tmp_path / "m.so", spec, model, x), run_onnxruntime(model, x), ["out"], 1e-5)
    assert c_.ok, c_.summary()


@pytest.mark.parametrize("target", ["arm", "avx512"])
def test_default_schedules_compile_for_neon_and_avx512(tmp_path, target):
    from graphgen.compile.elf import check_elf
    from graphgen.optimize import optimize

    model = optimize(_conv_zoo_model()).model
    spec = resolve_target(target)
    info = compile_model(model, spec, tmp_path / "m.so", default_schedules=True)
    assert info["schedules"]["default_schedule"] >= 8 and not info["schedules"].get("default_schedule_failures")
    ok, _, problem = check_elf(tmp_path / "m.so", spec.arch)
    assert ok, problem


@pytest.mark.parametrize("target", ["x86-64-v3", "avx512", "arm"])
@pytest.mark.parametrize("c, k, h, stride", [(128, 128, 28, 1), (64, 128, 56, 2), (128, 256, 28, 2)])
def test_direct_conv_tiles_leave_llvm_registers_to_spare(target, c, k, h, stride, monkeypatch):
    """Every register tile a direct conv may take keeps at most ``Isa.tile_limit`` accumulators
    (AVX-512: 24 of 32 registers; 2 vectors x 14 positions spilled and ran 2.1x slower), and
    the default is one of the fastest measured (4 vectors x 4 or 2 x 7 positions)."""
    from tvm import tirx

    from graphgen.compile.tvm_build import import_onnx
    from graphgen.testing import single_conv_model
    from graphgen.tune import defaults
    from graphgen.tune.pipeline import fuse

    monkeypatch.setenv("GRAPHGEN_WINOGRAD", "0")
    picked = {}
    original = defaults.Knobs.pick

    def pick(self, name, options):
        choice = original(self, name, options)
        if name == "conv.tile":
            picked["options"], picked["choice"] = list(options), choice
        return choice

    monkeypatch.setattr(defaults.Knobs, "pick", pick)
    tvm_target = resolve_target(target).tvm_target()
    isa = defaults.isa_of(tvm_target)
    mod = fuse(import_onnx(single_conv_model(c, k, h, stride=stride)), tvm_target)
    convs = [f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert len(convs) == 1
    _, kind = defaults.schedule_func(convs[0], isa)
    assert kind == "conv2d", kind
    accumulators = [o[1] for o in picked["options"]]   # (score, accumulators, ..., vk, wb, hb)
    assert accumulators and max(accumulators) <= isa.tile_limit, picked["options"]
    if isa.registers > 16:
        assert isa.tile_limit == 24 and picked["choice"][1] in (14, 16), picked["choice"]


@pytest.mark.parametrize("stride", [1, 2])
def test_direct_conv_with_the_default_tile_matches_onnxruntime(stride, tmp_path, monkeypatch):
    from graphgen.testing import compile_and_compare, single_conv_model

    monkeypatch.setenv("GRAPHGEN_WINOGRAD", "0")
    kinds, c = compile_and_compare(single_conv_model(64, 128, 28, stride=stride), tmp_path)
    assert kinds == {"conv2d": 1}, kinds
    assert c is not None and c.ok, c.summary()


def _emulated_aarch64_python():
    """The aarch64 Python + runtime-only TVM that ``graphgen build --verify emulate`` sets up
    under qemu (graphgen.emulate), if this machine already has it; None otherwise."""
    from pathlib import Path

    from graphgen.emulate.env import check_component

    base = os.environ.get("GRAPHGEN_CACHE_DIR")
    root = (Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphgen")
    for comp in sorted((root / "emulation").glob("aarch64-*")):
        if check_component(comp, "aarch64") is None and (comp / "bin" / "python3").exists():
            return comp / "bin" / "python3"
    return None


def test_arm_tuning_over_rpc_on_an_emulated_board(tiny_onnx, tmp_path):
    """The whole board path: aarch64 candidates cross-linked here, uploaded through the tracker to
    a runtime-only TVM RPC server (an aarch64 Python under qemu stands in for the board), timed
    there. Timings under emulation mean nothing; that every trial ran is what is checked."""
    import subprocess
    import time

    import onnx
    from tvm.rpc.tracker import Tracker

    from graphgen.tune import measure, tune_onnx

    guest = _emulated_aarch64_python()
    if guest is None:
        pytest.skip("no aarch64 emulation environment on this machine (graphgen build --verify emulate sets it up)")
    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9390, silent=True)
    # its own process group: the server forks a worker per session, which must go with it
    server = subprocess.Popen([str(guest), "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{tracker.port}",
                               "--key", "emulated-a72", "--host", "127.0.0.1", "--port", "9600", "--port-end", "9800"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    addr = f"127.0.0.1:{tracker.port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                measure.check_tracker(addr, "emulated-a72")
                break
            except UserError:
                assert server.poll() is None and time.monotonic() < deadline, "the emulated RPC server did not come up"
                time.sleep(0.5)
        res = tune_onnx(onnx.load(str(tiny_onnx)), resolve_target("arm"), trials=8, batch=2,
                        db=tmp_path / "armdb", rpc_tracker=addr, rpc_key="emulated-a72")
        assert res.runner.startswith("rpc") and res.covered == res.tasks
        assert all(p["best_us"] for p in res.per_task), res.per_task  # every kernel ran on the "board"
        assert res.target["mtriple"].startswith("aarch64")
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the group this test created, nothing else
        except ProcessLookupError:
            pass
        server.wait(timeout=30)
        tracker.terminate()



def test_tuning_ends_by_keeping_the_default_schedule_of_kernels_slower_tuned_in_the_model(
        cache, tiny_onnx, tmp_path, monkeypatch):
    """The last step of a tuning run builds the model untuned and tuned and profiles both
    (here the profile is made up: the 1x1 conv's kernel twice as slow tuned); that kernel's
    choice becomes graphgen's default schedule, so a later build takes it from no record, and
    the library still matches onnxruntime."""
    import onnx
    import tvm

    from graphgen import bench
    from graphgen.compile.tvm_build import import_onnx
    from graphgen.tune import pipeline, tune_onnx, tuner

    monkeypatch.setenv("GRAPHGEN_TUNE_IN_MODEL", "1")
    spec = resolve_target("x86")
    model = onnx.load(str(tiny_onnx))
    target = tvm.target.Target(pipeline.tuning_target_json(spec))
    workloads = tuner._kernel_workloads(pipeline.fuse(import_onnx(model), target))
    conv = next(name for name in workloads if "conv2d" in name and "pointwise" in name)
    profiled = []

    def made_up(lib_path, inputs, model, runs, warmup=10):
        profiled.append(Path(lib_path).name)
        slow = Path(lib_path).name == "tuned.so"
        return [("vm.builtin.alloc_storage", 1e-6), (conv + "_prepacked", 40e-6 if slow else 20e-6),
                ("some_other_kernel", 5e-6)]

    monkeypatch.setattr(bench, "kernel_times", made_up)
    said = []
    res = tune_onnx(model, spec, trials=8, batch=2, report=said.append)
    assert not res.interrupted
    assert sorted(set(profiled)) == ["tuned.so", "untuned.so"]
    assert len(profiled) == 2 * len(bench.round_orders(2, tuner.IN_MODEL_ROUNDS))
    firsts = profiled[0::2]  # each library profiled first in as many rounds as the other
    assert firsts.count("tuned.so") == firsts.count("untuned.so")
    assert any("keep it: " + conv in m for m in said), said
    info = dbm.inspect(res.database)
    h = workloads[conv]
    assert info.keeps_default(h), info.choices.get(h)
    assert info.choices[h]["in_model_us"] == {"default": 20.0, "tuned": 40.0}
    assert [k for k, c in info.choices.items() if c.get("default")] == [h]  # only the slower kernel
    built = compile_model(model, spec, tmp_path / "m.so", database=res.database)
    assert built["schedules"]["from_database"] == res.tasks - 1, built["schedules"]
    x = random_inputs(model)
    c = compare(run_library(tmp_path / "m.so", spec, model, x), run_onnxruntime(model, x),
                [o.name for o in model.graph.output], 1e-5)
    assert c.ok, c.summary()
    # with the check off, a tuning run leaves the choices as the re-timing made them
    monkeypatch.setenv("GRAPHGEN_TUNE_IN_MODEL", "0")
    assert not tuner.in_model_check_enabled()
