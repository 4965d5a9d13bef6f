"""ARM libraries run without a board (qemu user-mode) and on a "board" over TVM RPC (an emulated one here).

The emulation environment (~1 min, ~210 MB: Debian's arm64 python3.11 + aarch64 TVM runtime
wheel, armhf glibc + kernel driver, qemu-user-static) is set up once per test session by the
``emulation`` fixture into the normal cache (~/.cache/graphgen/emulation, or
$GRAPHGEN_CACHE_DIR/emulation) and reused by later CI runs on the same machine.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphgen import api
from graphgen.cli import main
from graphgen.compile import resolve_target
from graphgen.emulate import check_component, ensure
from graphgen.emulate.env import EmulationError
from graphgen.emulate.rpc import EmulatedBoard, Tracker, free_port
from graphgen.verify import random_inputs, run_onnxruntime

pytestmark = pytest.mark.slow

SMALL = (64, 64)
REPO = Path(__file__).resolve().parents[1]


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def emulation():
    return ensure(["aarch64", "armv7"], progress=_log)


@pytest.fixture(scope="session")
def arm_squeezenet(emulation, tmp_path_factory):
    out = tmp_path_factory.mktemp("emu") / "squeezenet1_1-arm"
    return api.build("squeezenet", "arm", input_size=SMALL, out=out, verify="emulate", progress=_log)


@pytest.fixture(scope="session")
def armv7_squeezenet(emulation, tmp_path_factory):
    out = tmp_path_factory.mktemp("emu") / "squeezenet1_1-armv7"
    return api.build("squeezenet", "armv7", input_size=SMALL, out=out, verify="emulate", progress=_log)


def _copy_build(res, dest: Path) -> Path:
    shutil.copytree(res.path, dest)
    return dest


def _error_line(err: str) -> str:
    """The CLI's error is exactly one line, the last one, and no traceback was printed."""
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("graphgen: ")]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0]
    return lines[0]


def _perturbed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with one weight changed by 5%: a library built from the original must not match it."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(init) * np.float32(1.05)
    init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
    return m


# ------------------------------------------------------------------------------ emulated aarch64


def test_squeezenet_arm_runs_whole_model_under_qemu(arm_squeezenet):
    m = arm_squeezenet.manifest
    v = m["verification"]
    assert v["status"] == "passed", v["summary"]
    assert v["mode"] == "emulate" and v["scope"] == "whole model"
    assert v["emulator"]["guest_machine"] == "aarch64"  # the guest really was aarch64
    assert "qemu-aarch64" in v["ran_on"] and "runtime only" in v["ran_on"]
    assert max(v["rel_l2"]) < 1e-5 and v["timing"]["run_ms"] > 0
    assert v["elf"]["machine"] == "aarch64"
    on_disk = json.loads((arm_squeezenet.path / "manifest.json").read_text())
    assert on_disk["verification"] == json.loads(json.dumps(v))


def test_second_recipe_verified_under_qemu_from_the_cli(emulation, tmp_path, capsys):
    out = tmp_path / "shufflenet-arm"
    rc = main(["verify", "shufflenet_v2_x0_5", "--target", "arm", "--emulate", "--input-size", "32", "32",
               "-o", str(out)])
    assert rc == 0
    assert "whole model under qemu-aarch64 emulation: match" in capsys.readouterr().out
    v = json.loads((out / "manifest.json").read_text())["verification"]
    assert v["status"] == "passed" and v["mode"] == "emulate" and max(v["rel_l2"]) < 1e-5


def test_emulated_run_catches_a_library_that_does_not_match(arm_squeezenet):
    model = _perturbed(onnx.load(str(arm_squeezenet.path / "model.onnx")))
    v = api.verify_library(arm_squeezenet.path / "model.so", resolve_target("arm"), model, mode="emulate", seed=0)
    assert v["status"] == "failed" and max(v["rel_l2"]) > 1e-3, v["summary"]


def test_a_library_that_fails_under_emulation_is_a_failed_verification(arm_squeezenet):
    """The guest's own error comes back in one line; the intact environment is not blamed."""
    from graphgen.optimize import optimize

    other_size = optimize(api.load_model("squeezenet", input_size=(32, 32)).model).model
    v = api.verify_library(arm_squeezenet.path / "model.so", resolve_target("arm"), other_size, mode="emulate")
    assert v["status"] == "failed"
    assert v["summary"].startswith("the library failed under qemu-aarch64 emulation")
    assert "32 vs. 64" in v["summary"] and "\n" not in v["summary"]


# ------------------------------------------------------------------------------ armv7 kernels


def test_armv7_kernel_errors_come_back_from_the_driver(emulation, armv7_squeezenet):
    import dataclasses

    from graphgen.emulate import kernels as K

    model = onnx.load(str(armv7_squeezenet.path / "model.onnx"))
    trace = K.trace_host(model, random_inputs(model, 0), like=resolve_target("armv7"),
                         schedules=armv7_squeezenet.manifest["build"]["schedules"])
    first = trace.calls[0]
    a = first.args[0]
    first.args[0] = dataclasses.replace(a, shape=(a.shape[0], a.shape[1], a.shape[2] // 2, a.shape[3] * 2))
    stream, _ = K.build_stream(trace)
    with pytest.raises(EmulationError) as e:
        K.run_driver(emulation["armv7"], armv7_squeezenet.path / "model.so", stream)
    msg = str(e.value)
    assert f"{first.name} returned -1" in msg and "shape" in msg and "\n" not in msg


def test_armv7_every_kernel_checked_under_qemu_arm(armv7_squeezenet):
    v = armv7_squeezenet.manifest["verification"]
    assert v["status"] == "passed", v["summary"]
    assert v["mode"] == "emulate" and v["scope"] == "kernels"
    k = v["kernels"]
    assert k["compiled"] >= 20 and k["run"] == k["compiled"] and k["calls"] >= k["run"]
    assert not k["not_exercised"] and k["worst_rel_l2"] < 1e-5
    kinds = " ".join(k["per_kernel"])
    assert all(op in kinds for op in ("conv2d", "max_pool2d", "mean"))  # every kind of layer ran
    # the fire modules' concats cost no kernel: their pieces are written in place, and the
    # kernels doing that (on views of the concat's output) are among those checked
    assert armv7_squeezenet.manifest["build"]["schedules"]["concats_in_place"] == 8
    assert "concatenate" not in kinds
    assert max(v["chained"]["rel_l2"]) < 1e-5 and v["chained"]["reference"] == "onnxruntime"
    assert v["weights"]["found_in_library"] == v["weights"]["total"] > 20
    # what did not run is said plainly
    assert any("Relax VM" in s and "no armv7 TVM runtime" in s for s in v["not_executed"])
    assert "not run" in v["summary"] and "qemu-arm" in v["ran_on"]


def test_armv7_check_catches_a_library_built_from_other_weights(armv7_squeezenet):
    model = _perturbed(onnx.load(str(armv7_squeezenet.path / "model.onnx")))
    v = api.verify_library(armv7_squeezenet.path / "model.so", resolve_target("armv7"), model, mode="emulate",
                           seed=0, build_info=armv7_squeezenet.manifest["build"])
    assert v["status"] == "failed"
    assert v["weights"]["found_in_library"] == v["weights"]["total"] - 1
    assert any("weight tensors" in e for e in v["errors"])


# ------------------------------------------------------------------------------ verify an existing build


def test_verify_build_folder_records_the_result(arm_squeezenet, tmp_path, capsys):
    folder = _copy_build(arm_squeezenet, tmp_path / "b")
    before = json.loads((folder / "manifest.json").read_text())
    before["verification"] = {"status": "not_executed", "mode": "host", "summary": "ELF only"}
    (folder / "manifest.json").write_text(json.dumps(before))
    assert main(["verify", str(folder), "--emulate"]) == 0
    assert "verified" in capsys.readouterr().out
    v = json.loads((folder / "manifest.json").read_text())["verification"]
    assert v["status"] == "passed" and v["mode"] == "emulate"
    assert v["previous"][0] == {"mode": "host", "status": "not_executed", "summary": "ELF only", "ran_on": None}


def test_verify_refuses_a_changed_library(arm_squeezenet, tmp_path, capsys):
    folder = _copy_build(arm_squeezenet, tmp_path / "b")
    with open(folder / "model.so", "ab") as f:
        f.write(b"\0")
    assert main(["verify", str(folder), "--emulate"]) == 1
    assert "differs from the manifest" in _error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------ TVM RPC


def test_rpc_server_and_tracker_against_an_emulated_board(emulation, arm_squeezenet, tmp_path, capsys):
    folder = _copy_build(arm_squeezenet, tmp_path / "b")
    with EmulatedBoard(emulation["aarch64"]) as board:
        assert main(["verify", str(folder), "--rpc", board.address]) == 0
    v = json.loads((folder / "manifest.json").read_text())["verification"]
    assert v["status"] == "passed" and v["mode"] == "rpc" and v["remote"]["rpc"] == board.address
    assert max(v["rel_l2"]) < 1e-5
    with Tracker() as tracker, EmulatedBoard(emulation["aarch64"], tracker=tracker.address, key="emu-a72"):
        res = api.verify(folder, mode="rpc", rpc_tracker=tracker.address, rpc_key="emu-a72")
        assert res.manifest["verification"]["status"] == "passed"
        assert res.manifest["verification"]["remote"]["key"] == "emu-a72"
        assert main(["verify", str(folder), "--rpc-tracker", tracker.address, "--rpc-key", "nope"]) == 1
        line = _error_line(capsys.readouterr().err)
        assert "no board with key 'nope'" in line and "emu-a72" in line


def test_unreachable_rpc_server_is_one_line(arm_squeezenet, capsys):
    port = free_port()
    assert main(["verify", str(arm_squeezenet.path), "--rpc", f"127.0.0.1:{port}"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert f"cannot reach the TVM RPC server at 127.0.0.1:{port}" in line and "tvm.exec.rpc_server" in line


@pytest.mark.parametrize("argv,msg", [
    (["build", "squeezenet", "--target", "x86", "--verify", "emulate"], "runs on this host"),
    (["build", "squeezenet", "--target", "cuda", "--verify", "emulate"], "cannot be emulated"),
    (["build", "squeezenet", "--target", "arm", "--verify", "rpc"], "needs --rpc"),
    (["build", "squeezenet", "--target", "arm", "--rpc", "board"], "expected HOST:PORT"),
    (["build", "squeezenet", "--target", "arm", "--rpc-tracker", "127.0.0.1:9190"], "needs --rpc-key"),
    (["verify", "squeezenet", "--target", "arm", "--emulate", "--rpc", "127.0.0.1:9090"], "not both"),
])
def test_bad_verification_options_are_user_errors(argv, msg, capsys, in_tmp):
    assert main(argv) == 2
    assert msg in _error_line(capsys.readouterr().err)
    assert not (in_tmp / "compiled").exists()


# ------------------------------------------------------------------------------ the cache


def test_no_network_to_fetch_the_environment_is_one_line(arm_squeezenet, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("GRAPHGEN_DEBIAN_MIRROR", f"http://127.0.0.1:{free_port()}/debian")
    manifest_before = (arm_squeezenet.path / "manifest.json").read_text()
    assert main(["verify", str(arm_squeezenet.path), "--emulate"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert "Debian package lists" in line and "network access" in line
    assert (arm_squeezenet.path / "manifest.json").read_text() == manifest_before


def _link_copy(src: Path, dst: Path) -> Path:
    """A copy of a component that shares file data (replace files by rename, never write into them)."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, symlinks=True, copy_function=link)
    return dst


def test_damaged_cache_is_detected_and_rebuilding_is_reported(emulation, tmp_path, monkeypatch):
    comp = emulation["aarch64"]
    root = tmp_path / "emulation"
    copy = _link_copy(comp.path, root / comp.path.name)
    assert check_component(copy, "aarch64", deep=True) is None
    lib = copy / "site" / "tvm" / "lib" / "libtvm_runtime.so"
    data = lib.read_bytes()
    # same size, different bytes: only the deep check (after a failed run) sees it
    (tmp_path / "flipped").write_bytes(data[:4096] + bytes(b ^ 0xFF for b in data[4096:4160]) + data[4160:])
    os.replace(tmp_path / "flipped", lib)
    assert check_component(copy, "aarch64") is None
    assert "libtvm_runtime.so is corrupt" in check_component(copy, "aarch64", deep=True)
    # truncated: the quick check before every use sees it, and ensure() rebuilds (here: cannot, no network)
    (tmp_path / "short").write_bytes(data[:1000])
    os.replace(tmp_path / "short", lib)
    assert "changed size" in check_component(copy, "aarch64")
    monkeypatch.setenv("GRAPHGEN_DEBIAN_MIRROR", f"http://127.0.0.1:{free_port()}/debian")
    with pytest.raises(EmulationError) as e:
        ensure(["aarch64"], root=root)
    msg = str(e.value)
    assert "\n" not in msg and "was damaged" in msg and "libtvm_runtime.so" in msg
    assert "rebuilding it failed" in msg and "Debian package lists" in msg
    assert not copy.exists()  # the damaged copy was removed, not left half-used
    assert check_component(comp.path, "aarch64") is None  # the real cache is untouched


# ------------------------------------------------------------------------------ deploy examples


def test_deploy_python_loader_runs_under_emulated_aarch64(emulation, arm_squeezenet):
    script = REPO / "examples" / "deploy" / "run_model.py"
    from graphgen.emulate.env import _clean_env

    proc = subprocess.run([str(emulation["aarch64"].python), str(script), str(arm_squeezenet.path)],
                          capture_output=True, text=True, timeout=600, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(arm_squeezenet.path / "model.onnx"))
    x = np.random.default_rng(0).standard_normal([1, 3, *SMALL]).astype(np.float32)
    top1 = int(np.argmax(run_onnxruntime(model, {"input": x})[0]))
    assert "output [1, 1000]" in proc.stdout
    assert proc.stdout.split("top-5:")[1].split()[0] == str(top1)


def test_deploy_python_loader_says_when_the_runtime_runs_another_thread_count(monkeypatch):
    import importlib.util

    import tvm  # noqa: F401 - the whole TVM, before the script's own import could load a runtime-only one
    import tvm_ffi

    # the script sets TVM_USE_RUNTIME_LIB=1 when imported: kept to this test, or every process
    # this worker starts later (the tuner's runners, RPC servers) loads a runtime-only TVM
    monkeypatch.setenv("TVM_USE_RUNTIME_LIB", "1")
    spec = importlib.util.spec_from_file_location("run_model", REPO / "examples" / "deploy" / "run_model.py")
    run_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_model)
    running = tvm_ffi.get_global_func("runtime.NumThreads")()
    manifest = {"model": {"name": "squeezenet1_1"}, "target": {}, "build": {"schedules": {"threads": running + 1}}}
    note = run_model.thread_count_note(manifest)
    assert note and f"built for {running + 1} threads" in note and f"TVM_NUM_THREADS={running + 1}" in note
    assert "\n" not in note
    manifest["build"]["schedules"]["threads"] = running
    assert run_model.thread_count_note(manifest) is None
    manifest["target"]["threads"] = running + 2  # an explicit --threads is what the library was made for
    assert f"built for {running + 2} threads" in run_model.thread_count_note(manifest)


def test_deploy_cpp_loader_builds_and_matches_onnxruntime(tmp_path):
    """The C++ loader against this host's x86 build (the same code a board compiles against its runtime)."""
    import tvm
    import tvm_ffi

    res = api.build("squeezenet", "x86", input_size=SMALL, out=tmp_path / "x86")
    tvm_lib = Path(tvm.__file__).parent / "lib"
    ffi_dir = Path(tvm_ffi.__file__).parent
    exe = tmp_path / "run_model"
    cxx = [shutil.which("c++")] if shutil.which("c++") else [sys.executable, "-m", "ziglang", "c++"]
    build = subprocess.run([*cxx, "-O1", "-std=c++17", f"-I{ffi_dir / 'include'}",
                            str(REPO / "examples" / "deploy" / "run_model.cc"), f"-L{tvm_lib}", f"-L{ffi_dir / 'lib'}",
                            "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi",
                            f"-Wl,-rpath,{tvm_lib}:{ffi_dir / 'lib'}", "-o", str(exe)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-2000:]
    model = onnx.load(str(res.path / "model.onnx"))
    x = random_inputs(model, 0)["input"]
    x.tofile(tmp_path / "x.bin")
    run = subprocess.run([str(exe), str(res.path / "model.so"), str(tmp_path / "x.bin"), "1", "3", *map(str, SMALL)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    y = run_onnxruntime(model, {"input": x})[0].reshape(-1)
    checksum = float(run.stdout.split("checksum (sum):")[1].split()[0])
    assert abs(checksum - float(y.sum())) < 1e-3 * max(1.0, abs(float(y.sum())))
    assert run.stdout.split("top-5:")[1].split()[0] == str(int(np.argmax(y)))
