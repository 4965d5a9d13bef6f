"""graphgen bench and benchmarks/zoo.py: the table, the plot and the README markers.

Correctness only: every number must be a positive, finite time and every library must have
matched onnxruntime; how fast anything is gets reported by the benchmark, never asserted.
"""

import importlib.util
import json
import math
from pathlib import Path

import onnx
import pytest

from graphgen.builder import GraphBuilder

ROOT = Path(__file__).resolve().parent.parent


def _small_model(path: Path) -> Path:
    b = GraphBuilder("benchnet")
    x = b.input("input", (1, 3, 16, 16))
    x = b.relu(b.conv(x, 8, 3, padding=1, name="c1"))
    x = b.max_pool(x, 2, 2)
    x = b.linear(b.flatten(b.global_avg_pool(x)), 4, name="fc")
    b.output(x, "out")
    onnx.save(b.build(), str(path))
    return path


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    from graphgen.bench import bench

    model = _small_model(tmp_path_factory.mktemp("bench") / "benchnet.onnx")
    return bench(str(model), "x86", runs=5, warmup=1)


def test_bench_times_graphgen_and_onnxruntime_in_one_process(bench_result):
    from graphgen.bench import ROUNDS, round_orders

    res = bench_result
    names = [r["runtime"] for r in res["runtimes"]]
    assert names[0] == "graphgen" and "onnxruntime" in names
    assert res["checks"]["graphgen"]["ok"], res["checks"]["graphgen"]["summary"]
    rounds = len(round_orders(len(names), ROUNDS))  # each runtime starts a round in turn
    for r in res["runtimes"]:
        assert r["runs"] == rounds * -(-5 // rounds)  # 5 asked, spread over the interleaved rounds
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and math.isfinite(r["p90_ms"])
    ort = next(r for r in res["runtimes"] if r["runtime"] == "onnxruntime")
    assert ort["vs_onnxruntime"] == 1.0
    assert res["host"]["cpu"] and res["threads"] >= 1
    # the host's fp32 ceiling (onnxruntime's own MatMul) and each runtime's share of it
    assert res["sgemm_gflops"] > 0 and math.isfinite(res["sgemm_gflops"])
    for r in res["runtimes"]:
        assert r["of_sgemm"] == round(r["gflops"] / res["sgemm_gflops"], 2)
    if "openvino" not in names:
        assert res["openvino"] == "not installed" or res["openvino"].startswith("failed")


@pytest.mark.parametrize("runtimes", [1, 2, 3, 4])
def test_every_runtime_is_timed_in_every_position_of_a_round_equally_often(runtimes):
    from graphgen.bench import ROUNDS, round_orders

    orders = round_orders(runtimes, ROUNDS)
    assert len(orders) >= ROUNDS and len(orders) % runtimes == 0
    assert all(sorted(o) == list(range(runtimes)) for o in orders)  # each runtime once a round
    for position in range(runtimes):
        at = [o[position] for o in orders]
        assert all(at.count(i) == len(orders) // runtimes for i in range(runtimes))


def test_bench_table_and_plot(bench_result, tmp_path):
    from graphgen.bench import format_table, plot

    text = format_table(bench_result)
    assert "graphgen" in text and "onnxruntime" in text and "median ms" in text
    png = plot([bench_result], tmp_path / "b.png")
    pytest.importorskip("matplotlib")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_targets_this_host_cannot_run_and_missing_databases(tmp_path, monkeypatch):
    from graphgen.bench import bench
    from graphgen.errors import UserError

    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(tmp_path / "cache"))
    model = _small_model(tmp_path / "m.onnx")
    with pytest.raises(UserError, match="does not run here"):
        bench(str(model), "arm")
    with pytest.raises(UserError, match="no tuning database"):
        bench(str(model), "x86", tuned=True)


def test_zoo_writes_the_table_between_the_readme_markers(bench_result, tmp_path):
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "benchmarks" / "zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    table = zoo.markdown([bench_result], 12.0)
    assert table.startswith("| model |") and bench_result["host"]["cpu"] in table and "load average" in table
    assert "of sgemm" in table and f"{bench_result['sgemm_gflops']:.0f} GFLOP/s" in table
    ort = next(r for r in bench_result["runtimes"] if r["runtime"] == "onnxruntime")
    assert "0.8x ORT needs" in table and f"{ort['of_sgemm'] / 0.8:.0%} of sgemm" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Speed\n\n{zoo.START}\nold\n{zoo.END}\n\nafter\n")
    assert zoo.write_readme(readme, table)
    text = readme.read_text()
    assert "old" not in text and table in text and text.endswith("after\n")
    (tmp_path / "nomarkers.md").write_text("no markers\n")
    assert not zoo.write_readme(tmp_path / "nomarkers.md", table)
    json.dumps(bench_result, default=str)  # the zoo's JSON dump


def test_cli_bench_prints_the_table_and_writes_the_png(tmp_path, capsys):
    from graphgen.cli import main

    model = _small_model(tmp_path / "m.onnx")
    png = tmp_path / "plot.png"
    assert main(["bench", str(model), "--runs", "5", "--warmup", "1", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "graphgen" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert png.exists()


def test_tvm_threads_one_core_each_and_the_caller_pinned_only_while_timing():
    """The timing thread takes the first core of TVM's pool inside ``tvm_caller_pinned`` and
    gets its own affinity back after (onnxruntime's pool, created outside, keeps every core)."""
    import os

    from graphgen import bench

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no thread affinity on this OS")
    before = os.sched_getaffinity(0)
    bench.set_tvm_threads(len(before))
    try:
        with bench.tvm_caller_pinned():
            assert os.sched_getaffinity(0) == {min(before)}
        assert os.sched_getaffinity(0) == before
        with pytest.raises(RuntimeError):
            with bench.tvm_caller_pinned():
                raise RuntimeError("a failing run")
        assert os.sched_getaffinity(0) == before  # restored on errors too
    finally:
        os.sched_setaffinity(0, before)


def test_profile_kernels_lists_each_runtimes_kernels_with_their_times(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("profile_kernels", ROOT / "benchmarks" / "profile_kernels.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    model = _small_model(tmp_path / "benchnet.onnx")
    assert prof.main([str(model), "--runs", "3", "--top", "50"]) == 0
    out = capsys.readouterr().out
    graphgen_part, ort_part = out.split("onnxruntime ")
    rows = [line.split() for line in graphgen_part.splitlines()[1:] if line.strip()]
    # the conv (with its fused ReLU), the pool, the mean and the dense layer: one call each
    assert any("conv2d" in r[-1] for r in rows) and any("matmul" in r[-1] or "dense" in r[-1] for r in rows), out
    for r in rows:
        assert r[1] == "us" and math.isfinite(float(r[0])) and float(r[0]) >= 0, r
    assert "Conv " in ort_part and "Gemm " in ort_part, out


def test_profile_kernels_side_by_side_pairs_layers_in_run_order(tmp_path, capsys):
    """``--side-by-side``: one row per layer, graphgen's kernel next to onnxruntime's node in run
    order with the difference of their times; the totals row adds up the rows."""
    spec = importlib.util.spec_from_file_location("profile_kernels", ROOT / "benchmarks" / "profile_kernels.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    rows = prof.side_by_side([("vm.builtin.alloc_storage", 1e-6), ("fused_conv2d_relu", 3e-4), ("fused_matmul", 2e-4)],
                             [("ReorderInput a", 1e-5), ("Conv conv", 2e-4), ("Gemm fc", 2.5e-4)])
    lines = rows.splitlines()
    assert "fused_conv2d_relu | Conv conv" in lines[1] and "+100.0 us" in lines[1], rows
    assert "fused_matmul | Gemm fc" in lines[2] and "-50.0 us" in lines[2], rows
    assert lines[3].split()[:4] == ["0.500", "ms", "0.450", "ms"] and "+0.050 ms" in lines[3], rows
    assert prof.side_by_side([("fused_conv2d", 1e-4)], [("Conv a", 1e-4), ("Gemm b", 1e-4)]) is None
    model = _small_model(tmp_path / "benchnet.onnx")
    assert prof.main([str(model), "--runs", "3", "--side-by-side"]) == 0
    out = capsys.readouterr().out
    assert "run order" in out or "do not pair up" in out, out
    if "run order" in out:
        assert any("conv2d" in line and "| Conv " in line for line in out.splitlines()), out
