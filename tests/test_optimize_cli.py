"""`graphgen optimize IN.onnx -o OUT.onnx` and graphgen.api.optimize_file on any ONNX file."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from graphgen import api
from graphgen.cli import main
from graphgen.optimize.graph import op_counts
from graphgen.testing import assert_onnx_equivalent


@pytest.fixture(scope="module")
def shufflenet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "shufflenet.onnx"
    api.export("shufflenet_v2_x0_5", path, input_size=(32, 32))
    return path


def test_optimize_writes_the_model_and_prints_the_report(shufflenet_file, tmp_path, capsys):
    out = tmp_path / "opt.onnx"
    assert main(["optimize", str(shufflenet_file), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "Transpose" in text and "channel_routing x" in text and f"wrote {out}" in text
    raw, opt = onnx.load(str(shufflenet_file)), onnx.load(str(out))
    assert "Transpose" not in op_counts(opt) and len(opt.graph.node) < len(raw.graph.node)
    assert_onnx_equivalent(raw, opt)


def test_passes_selects_passes(shufflenet_file, tmp_path, capsys):
    out = tmp_path / "opt.onnx"
    assert main(["optimize", str(shufflenet_file), "-o", str(out), "--passes", "fold_batchnorm,remove_identity",
                 "--no-verify", "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    assert [p["pass"] for p in rep["passes"]] == ["remove_identity", "fold_batchnorm"]  # the declared order
    ops = op_counts(onnx.load(str(out)))
    assert "BatchNormalization" not in ops and ops["Transpose"] == 16


@pytest.mark.parametrize("args,needle", [
    (["--passes", "fold_everything"], "unknown optimizer pass 'fold_everything'"),
    (["-o", "out.txt"], "must end in .onnx"),
])
def test_bad_options_are_one_line_exit_2(shufflenet_file, tmp_path, args, needle):
    if "-o" not in args:
        args = args + ["-o", "out.onnx"]
    proc = subprocess.run([sys.executable, "-m", "graphgen.cli", "optimize", str(shufflenet_file), *args],
                          capture_output=True, text=True, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_missing_file_is_exit_2(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_pass_that_breaks_the_model_fails_naming_it(shufflenet_file, tmp_path, monkeypatch, capsys):
    import graphgen.optimize.channel_routing as cr

    real = cr.run

    def broken(model):
        n = real(model)
        for init in model.graph.initializer:  # flip a weight after the real rewrite
            if init.name.endswith(".weight") and init.dims[0] > 1:
                arr = onnx.numpy_helper.to_array(init).copy()
                arr[0] = -arr[0] + 1.0
                init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
                break
        return n

    monkeypatch.setattr(cr, "run", broken)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(shufflenet_file), "-o", str(out)]) == 1
    assert "channel_routing" in capsys.readouterr().err
    assert not out.exists()


def test_optimize_file_takes_a_model_from_elsewhere_with_a_dynamic_batch(tmp_path):
    # opset 13, a symbolic batch, an explicit Pad and a shuffle spelled with 0 / -1 shapes
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((6, 8, 1, 1)).astype(np.float32), "w2")
    consts = [numpy_helper.from_array(np.asarray(v, np.int64), n) for n, v in
              [("pads", [0, 0, 1, 1, 0, 0, 1, 1]), ("s1", [0, 2, 4, -1]), ("s2", [0, 8, 6, 6])]]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
             helper.make_node("Conv", ["p", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "s1"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["t", "s2"], ["s"]),
             helper.make_node("Conv", ["s", "w2"], ["y"], kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 6, 6])],
                              [w, w2, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    src = tmp_path / "elsewhere.onnx"
    onnx.save(model, str(src))
    res = api.optimize_file(src, tmp_path / "out.onnx")
    # the Pad went into the conv, the shuffle (batch kept by its 0 entries) into the 1x1 conv
    assert res.after == {"Conv": 2, "Relu": 1}
    opt = onnx.load(str(tmp_path / "out.onnx"))
    x = rng.standard_normal((3, 4, 6, 6)).astype(np.float32)  # another batch size than the check used
    import onnxruntime as ort

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(opt), run(model), rtol=1e-4, atol=1e-4)
