"""The thread count a library is made for: ``--threads N`` on tune, build and bench.

A kernel's best schedule on one thread is not its best on two, so tuning times candidates at
the count the library will run at, and the tuning database is kept per count (TVM's
``num-cores`` is part of the target, and so of the database's folder name). These tests check
that plumbing and its errors with tiny trial budgets; correctness against onnxruntime as every
build is checked, never speed.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from graphgen.compile import resolve_target
from graphgen.compile.targets import at_default_threads
from graphgen.errors import UserError
from graphgen.tune import database as dbm
from graphgen.tune import database_for
from graphgen.tune.pipeline import num_cores_for

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}


def test_the_thread_count_goes_into_the_target_as_num_cores():
    spec = resolve_target("x86", threads=1)
    assert spec.tvm_json["num-cores"] == 1 and num_cores_for(spec) == 1 and spec.details["threads"] == 1
    assert num_cores_for(resolve_target("arm", threads=2)) == 2
    assert num_cores_for(resolve_target("arm")) == 4  # boards: 4 unless told
    # a JSON target's own num-cores is overridden by threads, kept without
    assert num_cores_for(resolve_target({**X86, "num-cores": 8}, threads=3)) == 3
    assert num_cores_for(resolve_target({**X86, "num-cores": 8})) == 8
    assert at_default_threads(spec) == resolve_target("x86")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_a_thread_count_that_is_not_a_positive_whole_number_is_a_user_error(bad):
    with pytest.raises(UserError, match="--threads must be a whole number of at least 1"):
        resolve_target("x86", threads=bad)


def test_threads_do_not_apply_to_the_gpu():
    with pytest.raises(UserError, match="--threads applies to CPU targets"):
        resolve_target("cuda", threads=2)


def test_each_thread_count_has_its_own_database(cache):
    default = resolve_target("x86")
    paths = {n: database_for(resolve_target("x86", threads=n)) for n in (1, 2, 3)}
    assert len(set(paths.values())) == 3 and all(p.parent == cache / "tuning" for p in paths.values())
    # naming the default count is the default database
    assert database_for(resolve_target("x86", threads=num_cores_for(default))) == database_for(default)


def test_a_database_tuned_at_another_thread_count_is_refused_and_left_in_place(tmp_path):
    path = tmp_path / "db"
    dbm.create(path, {**X86, "num-cores": 2})
    assert dbm.tuned_threads(path) == 2
    spec = resolve_target(X86, threads=1)
    with pytest.raises(UserError, match=r"tuned at 2 threads, this run is for 1 thread; pass --threads 2"):
        database_for(spec, path)
    assert (path / dbm.META).exists() and not list(tmp_path.glob("db.set-aside-*"))
    assert database_for(resolve_target(X86, threads=2), path) == path
    assert dbm.tuned_threads(tmp_path / "missing") is None


def test_tuning_at_one_thread_times_on_one_thread_and_builds_at_that_count_use_it(
        cache, tiny_onnx, tmp_path, in_tmp, monkeypatch, capsys):
    """Tune at one thread (candidates timed by a one-thread runner, into the one-thread
    database), then: a build at one thread takes its schedules and matches onnxruntime; --db
    with the wrong count is a one-line error; at a count with no database of its own a build
    is untuned and says so, and bench --tuned falls back to the default count's and says so."""
    import onnx

    from graphgen import api
    from graphgen.bench import bench
    from graphgen.cli import main
    from graphgen.tune import measure, tune_onnx

    runner_threads = []
    real_runner = measure.local_runner

    def spy(*a, **kw):
        runner_threads.append(kw.get("threads"))
        return real_runner(*a, **kw)

    monkeypatch.setattr(measure, "local_runner", spy)
    model = onnx.load(str(tiny_onnx))
    one = resolve_target("x86", threads=1)
    res = tune_onnx(model, one, trials=8, batch=4)
    assert runner_threads == [1]
    assert res.target["num-cores"] == 1 and res.database == database_for(one)
    assert json.loads((res.database / dbm.META).read_text())["target"]["num-cores"] == 1
    assert res.trials_total >= 8 and " at 1 thread in " in res.summary() and res.as_manifest()["threads"] == 1

    built = api.build(str(tiny_onnx), "x86", threads=1, out=tmp_path / "one")
    t = built.manifest["tuning"]
    assert built.manifest["verification"]["status"] == "passed"
    assert t["status"] == "database" and t["database"] == str(res.database) and t["records_used"] > 0
    assert built.manifest["target"]["tvm"]["num-cores"] == 1 and built.manifest["target"]["threads"] == 1

    capsys.readouterr()
    assert main(["build", str(tiny_onnx), "--threads", "3", "--db", str(res.database),
                 "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphgen: error: ") and len(err.splitlines()) == 1, err  # before any work
    assert "tuned at 1 thread, this run is for 3 threads; pass --threads 1" in err
    assert not (tmp_path / "bad").exists() and res.database.exists()
    assert main(["build", str(tiny_onnx), "--threads", "0", "-o", str(tmp_path / "bad")]) == 2
    assert "--threads must be a whole number of at least 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    # a count with no database of its own, where the default count has one (here the
    # one-thread database, its header made the default count's): a build is untuned and says
    # why; bench takes the default count's, says so and records it
    default = resolve_target("x86")
    if num_cores_for(default) != 1:
        import shutil

        shutil.copytree(res.database, database_for(default))
        meta_path = database_for(default) / dbm.META
        meta = json.loads(meta_path.read_text())
        meta["target"]["num-cores"] = num_cores_for(default)
        meta_path.write_text(json.dumps(meta))
    said = []
    other = api.build(str(tiny_onnx), "x86", threads=3, out=tmp_path / "three", progress=said.append)
    assert other.manifest["verification"]["status"] == "passed"
    assert other.manifest["tuning"]["status"] == "untuned" and other.manifest["tuning"]["database"] is None
    assert any(f"no tuning database tuned at 3 threads (there is one at {num_cores_for(default)} thread" in m
               for m in said), said
    said = []
    out = bench(str(tiny_onnx), "x86", tuned=True, threads=3, runs=2, warmup=1, progress=said.append)
    assert out["threads"] == 3 and out["database"]["threads"] == num_cores_for(default)
    assert out["checks"]["graphgen tuned"]["ok"]
    assert any("no tuning database tuned at 3 threads" in m for m in said), said
    spec = importlib.util.spec_from_file_location("zoo", Path(__file__).resolve().parent.parent / "benchmarks/zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    assert f"| 3 (tuned at {num_cores_for(default)}) |" in zoo.markdown([out], 1.0)
    with pytest.raises(UserError, match="--threads 3"):
        bench(str(tiny_onnx), "x86", tuned=True, threads=3, db=tmp_path / "nothing", runs=1, warmup=1)
