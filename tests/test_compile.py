"""TVM builds for every named target, the artifact folder, and the manifest."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from graphgen import api
from graphgen.artifact import sha256_file
from graphgen.compile import resolve_target
from graphgen.compile.cuda import fatbin_archs
from graphgen.compile.elf import read_elf
from graphgen.errors import UnknownNameError, UserError, VerificationError

SMALL = (64, 64)


def test_named_targets_resolve_to_tvm_json():
    assert resolve_target("arm").tvm_json == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                                              "mattr": ["+neon"]}
    assert resolve_target("arm", cpu="cortex-a53").tvm_json["mcpu"] == "cortex-a53"
    assert resolve_target("armv7").tvm_json["mfloat-abi"] == "hard"
    assert resolve_target("cuda").tvm_json["arch"] == "sm_80"
    assert resolve_target("cuda", arch="sm_90").tvm_json["arch"] == "sm_90"
    assert resolve_target("x86-64-v3").tvm_json["mcpu"] == "x86-64-v3"
    assert resolve_target("avx512").tvm_json["mcpu"] == "x86-64-v4"
    raw = resolve_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}')
    assert raw.arch == "aarch64" and not raw.host_runnable
    for t in ("arm", "armv7", "cuda", "x86", "x86-64-v3", "avx512"):
        resolve_target(t).tvm_target()  # TVM accepts every one


@pytest.mark.parametrize("bad,msg", [("arn", "did you mean 'arm'"), ("riscv", "valid targets"),
                                     ('{"kind": "nope"}', "TVM refuses"), ("{not json", "does not parse")])
def test_bad_targets_are_one_line_errors(bad, msg):
    with pytest.raises(UserError, match=msg) as e:
        resolve_target(bad)
    assert "\n" not in str(e.value)


def test_bad_cpu_and_arch():
    with pytest.raises(UnknownNameError, match="cortex-a53"):
        resolve_target("arm", cpu="cortex-z9")
    with pytest.raises(UnknownNameError, match="sm_XX"):
        resolve_target("cuda", arch="ampere")
    with pytest.raises(UserError, match="cuda target only"):
        resolve_target("arm", arch="sm_90")


def _check_manifest(res):
    m = res.manifest
    on_disk = json.loads((res.path / "manifest.json").read_text())
    assert on_disk["files"] == m["files"]
    for name, rec in m["files"].items():
        assert sha256_file(res.path / name) == rec["sha256"]
    assert m["tvm_version"].startswith("0.27")
    assert m["io"]["inputs"][0]["name"] == "input" and m["io"]["inputs"][0]["shape"] == [1, 3, *SMALL]
    assert m["io"]["outputs"][0]["dtype"] == "float32"
    assert m["tuning"]["status"] == "untuned"
    assert m["optimizer"]["nodes_after"] <= m["optimizer"]["nodes_before"]
    assert sorted(p.name for p in res.path.iterdir()) == ["manifest.json", "model.onnx", "model.so"]
    return m


def test_x86_build_is_verified_against_onnxruntime(in_tmp):
    res = api.build("squeezenet", target="x86", input_size=SMALL)
    assert res.path == (in_tmp / "compiled" / "squeezenet1_1-x86").resolve()
    m = _check_manifest(res)
    v = m["verification"]
    assert v["status"] == "passed" and v["tolerance"] == 1e-5
    assert max(v["rel_l2"]) < 1e-5
    assert read_elf(res.path / "model.so")["machine"] == "x86_64"


def test_arm_build_is_an_aarch64_elf(in_tmp):
    res = api.build("squeezenet", target="arm", input_size=SMALL)
    m = _check_manifest(res)
    elf = read_elf(res.path / "model.so")
    assert elf["machine"] == "aarch64" and elf["bits"] == 64 and elf["type"] == "shared object"
    assert m["verification"]["status"] == "not_executed"
    assert m["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"


def test_armv7_build_is_a_hard_float_arm_elf(in_tmp):
    res = api.build("squeezenet1_0", target="armv7", input_size=SMALL, out=in_tmp / "v7")
    _check_manifest(res)
    elf = read_elf(res.path / "model.so")
    assert elf["machine"] == "arm" and elf["bits"] == 32 and elf["float_abi"] == "hard"


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc (CUDA toolkit) is not installed on this machine")
def test_cuda_build_embeds_sm90_device_code_and_no_source(in_tmp):
    res = api.build("squeezenet", target="cuda", arch="sm_90", input_size=SMALL)
    m = _check_manifest(res)
    data = (res.path / "model.so").read_bytes()
    entries = fatbin_archs(data)
    assert {"kind": "elf", "sm": 90} in entries
    assert b"__global__" not in data and b"extern \"C\"" not in data
    assert m["verification"]["device_code"] == entries
    assert m["verification"]["status"] in ("not_executed", "passed")


def test_onnx_output_is_deterministic(in_tmp):
    a = api.build("squeezenet", target="arm", input_size=SMALL, out=in_tmp / "a")
    b = api.build("squeezenet", target="arm", input_size=SMALL, out=in_tmp / "b")
    assert (a.path / "model.onnx").read_bytes() == (b.path / "model.onnx").read_bytes()


def test_a_mismatch_fails_the_build_and_publishes_nothing(in_tmp, monkeypatch):
    import graphgen.compile as gc

    real = gc.run_library

    def off_by_a_bit(*args, **kwargs):
        return [o + 1e-3 * np.abs(o).max() for o in real(*args, **kwargs)]

    monkeypatch.setattr(gc, "run_library", off_by_a_bit)
    with pytest.raises(VerificationError, match="verification failed"):
        api.build("squeezenet", target="x86", input_size=SMALL)
    root = in_tmp / "compiled"
    assert not root.exists() or list(root.iterdir()) == []


def test_rebuild_replaces_the_previous_artifact(in_tmp):
    first = api.build("squeezenet", target="arm", input_size=SMALL)
    second = api.build("squeezenet", target="arm", input_size=(96, 96))
    assert first.path == second.path
    m = json.loads((second.path / "manifest.json").read_text())
    assert m["model"]["input_size"] == [96, 96]
    assert [p.name for p in second.path.parent.iterdir()] == [second.path.name]
