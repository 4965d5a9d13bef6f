"""The graphgen command: success paths and one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from graphgen.cli import main


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "graphgen.cli", *args], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def _error_line(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    return lines[0]


def test_list_shows_squeezenet_with_alias(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "squeezenet1_1" in out and "alias: squeezenet" in out and "squeezenet1_0" in out


def test_export_writes_the_unoptimized_graph_and_weights(tmp_path, capsys):
    out = tmp_path / "sq.onnx"
    w = tmp_path / "sq.npz"
    assert main(["export", "squeezenet", "-o", str(out), "--input-size", "64", "64", "--num-classes", "7",
                 "--save-weights", str(w)]) == 0
    m = onnx.load(str(out))
    assert any(n.op_type == "Dropout" for n in m.graph.node)  # before optimization
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 7
    # loading the saved weights and exporting again gives identical bytes
    out2 = tmp_path / "sq2.onnx"
    assert main(["export", "squeezenet", "-o", str(out2), "--input-size", "64", "64", "--num-classes", "7",
                 "--weights", str(w)]) == 0
    assert out.read_bytes() == out2.read_bytes()


@pytest.mark.parametrize("args,needle", [
    (["build", "squeezenet2"], "unknown model 'squeezenet2' (did you mean 'squeezenet'?)"),
    (["build", "squeezenet", "--target", "arn"], "unknown target 'arn' (did you mean 'arm'?)"),
    (["build", "squeezenet", "--target", "arm", "--cpu", "cortex-q1"], "unknown --cpu 'cortex-q1'"),
    (["build", "squeezenet", "--target", "cuda", "--arch", "volta"], "unknown --arch 'volta'"),
    (["build", "missing.onnx"], "does not exist"),
    (["build", "squeezenet", "--weights", "nope.npz"], "weights file nope.npz does not exist"),
    (["build", "squeezenet", "--input-size", "8", "8"], "too small"),
    (["export", "squeezenet", "-o", "x.txt"], "must end in .onnx"),
    (["export", "squeezenet", "-o", "x.onnx", "--postprocess"], "squeezenet1_1 has no option postprocess"),
    (["export", "squeezenet", "-o", "x.onnx", "--option", "depth"], "expected KEY=VALUE"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, needle):
    code, _, err = run_cli(*args, cwd=tmp_path)
    assert code == 2
    assert needle in _error_line(err)
    assert not (tmp_path / "compiled").exists() or not any((tmp_path / "compiled").iterdir())


def test_corrupt_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf model" * 10)
    code, _, err = run_cli("build", str(bad), cwd=tmp_path)
    assert code == 2
    assert "bad.onnx" in _error_line(err) and "not" in err


def test_weights_with_wrong_tensors(tmp_path):
    w = tmp_path / "w.npz"
    assert main(["export", "squeezenet", "--save-weights", str(w)]) == 0
    sd = dict(np.load(w))
    sd.pop("features.0.bias")
    sd["features.3.squeeze.weight"] = np.zeros((1, 2, 3, 4), np.float32)
    sd["extra.weight"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "bad.npz", **sd)
    code, _, err = run_cli("build", "squeezenet", "--weights", str(tmp_path / "bad.npz"), cwd=tmp_path)
    line = _error_line(err)
    assert code == 2
    assert "missing 1: features.0.bias" in line
    assert "unexpected 1: extra.weight" in line
    assert "features.3.squeeze.weight: expected [16, 64, 1, 1], got [1, 2, 3, 4]" in line
    assert not (tmp_path / "compiled").exists()


def test_build_an_onnx_file_for_x86(tmp_path):
    src = tmp_path / "net.onnx"
    assert main(["export", "squeezenet1_0", "-o", str(src), "--input-size", "64", "64"]) == 0
    code, out, err = run_cli("build", str(src), "--target", "x86", "--json", cwd=tmp_path)
    assert code == 0, err
    m = json.loads(out)
    assert m["model"]["kind"] == "file" and m["verification"]["status"] == "passed"
    assert (tmp_path / "compiled" / "net-x86" / "model.so").is_file()
    assert "[3/4] verifying" in err  # progress goes to stderr


def test_python_api_mirrors_the_cli(tmp_path):
    import graphgen

    res = graphgen.build("squeezenet", target="arm", input_size=(64, 64), out=tmp_path / "lib")
    assert res.ok and (res.path / "model.so").is_file()


def test_info_table_totals_equal_torchvision(capsys):
    assert main(["info", "squeezenet1_0"]) == 0
    out = capsys.readouterr().out
    assert "features.3.squeeze" in out and "1,248,424" in out
    assert main(["info", "squeezenet1_1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["params"] == 1235496
    assert abs(data["totals"]["macs"] / 0.349e9 - 1) < 0.01  # torchvision's 0.349 GFLOPS (multiply-adds)


def test_list_has_params_and_macs_for_every_recipe(capsys):
    from graphgen.registry import names

    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(names())
    assert rows["squeezenet1_0"]["params"] == 1248424
    for r in rows.values():
        assert r["params"] > 0 and r["family"] and r["source"]


def test_recipe_options_reach_the_recipe(tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", "mobilenet_v2", "-o", str(out), "--input-size", "32", "32",
                 "--option", "width_mult=0.5"]) == 0
    narrow = sum(int(np.prod(i.dims)) for i in onnx.load(str(out)).graph.initializer)
    assert main(["export", "mobilenet_v2", "-o", str(out), "--input-size", "32", "32"]) == 0
    full = sum(int(np.prod(i.dims)) for i in onnx.load(str(out)).graph.initializer)
    assert narrow < full
