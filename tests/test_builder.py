import numpy as np
import onnx
import pytest

from graphgen.builder import OPSET, GraphBuilder
from graphgen.errors import WeightsError
from graphgen.verify import random_inputs, run_onnxruntime


def _run(b, outputs):
    for i, t in enumerate(outputs):
        b.output(t, f"out{i}")
    model = b.build()
    res = run_onnxruntime(model, random_inputs(model))
    for t, r in zip(outputs, res):
        assert tuple(r.shape) == t.shape, f"{t.name}: builder shape {t.shape}, onnxruntime {r.shape}"
    return model, res


def test_every_op_runs_and_builder_shapes_match_onnxruntime():
    b = GraphBuilder("ops")
    x = b.input("input", (1, 8, 17, 15))
    outs = [
        b.conv(x, 16, 3, stride=2, padding=1, name="c1"),
        b.conv(x, 8, 3, padding=2, dilation=2, groups=8, bias=False, name="dw"),
        b.conv(x, 4, (1, 7), padding=(0, 3), name="c17"),
        b.conv_transpose(x, 4, 4, stride=2, padding=1, name="up"),
        b.batch_norm(x, name="bn"),
        b.relu(x), b.relu6(x), b.hardswish(x), b.hardsigmoid(x), b.sigmoid(x), b.swish(x), b.tanh(x),
        b.max_pool(x, 3, 2, ceil_mode=True), b.max_pool(x, 3, 2, padding=1), b.avg_pool(x, 2, 2),
        b.avg_pool(x, 3, 1, padding=1, count_include_pad=False),
        b.global_avg_pool(x), b.global_max_pool(x), b.adaptive_avg_pool(x, (6, 6)), b.adaptive_max_pool(x, 4),
        b.concat([x, x], axis=1), *b.split(x, [3, 5]), b.reshape(x, [1, -1]), b.transpose(x, [0, 2, 3, 1]),
        b.flatten(x), b.channel_shuffle(x, 2), b.add(x, x), b.mul(x, 0.5), b.sub(x, 1.0), b.div(x, 2.0),
        b.resize(x, scale=2.0), b.resize(x, size=(20, 30), mode="bilinear", align_corners=True),
        b.resize(x, scale=2, mode="bilinear"), b.dropout(x, 0.2), b.reduce_mean(x, [2, 3]),
        b.slice(x, [1], [5], [1]), b.leaky_relu(x, 0.1), b.softmax(x, axis=1),
    ]
    f = b.flatten(b.global_avg_pool(x))
    outs.append(b.linear(f, 10, name="fc"))
    model, _ = _run(b, outs)
    assert model.opset_import[0].version == OPSET
    onnx.checker.check_model(model, full_check=True)


def test_adaptive_avg_pool_uneven_bins_match_numpy():
    b = GraphBuilder("ap")
    x = b.input("input", (1, 2, 7, 5))
    y = b.adaptive_avg_pool(x, (3, 2))
    b.output(y, "y")
    m = b.build()
    inp = random_inputs(m)
    got = run_onnxruntime(m, inp)[0]
    a = inp["input"]
    ref = np.zeros((1, 2, 3, 2), np.float32)
    for i in range(3):
        for j in range(2):
            h0, h1 = (i * 7) // 3, -(-((i + 1) * 7) // 3)
            w0, w1 = (j * 5) // 2, -(-((j + 1) * 5) // 2)
            ref[:, :, i, j] = a[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_scoped_names_follow_module_nesting():
    b = GraphBuilder("n")
    x = b.input("input", (1, 3, 8, 8))
    with b.scope("features", 3):
        y = b.conv(x, 4, 1, name="squeeze")
        y = b.batch_norm(y, name="bn")
    b.output(y, "y")
    m = b.build()
    names = {i.name for i in m.graph.initializer}
    assert {"features.3.squeeze.weight", "features.3.squeeze.bias", "features.3.bn.running_var"} <= names
    assert "features.3.bn.num_batches_tracked" in b.state_dict()
    assert b.parameter_count() == 4 * 3 + 4 + 4 + 4  # conv w, conv b, bn weight, bn bias


def test_initial_values_depend_on_name_not_call_order():
    def make(extra_first):
        b = GraphBuilder("d", seed=7)
        x = b.input("input", (1, 3, 8, 8))
        if extra_first:
            b.conv(x, 5, 3, name="extra")
        b.conv(x, 4, 3, name="conv")
        return b.initializers["conv.weight"]

    np.testing.assert_array_equal(make(False), make(True))
    b = GraphBuilder("d", seed=8)
    x = b.input("input", (1, 3, 8, 8))
    b.conv(x, 4, 3, name="conv")
    assert not np.array_equal(b.initializers["conv.weight"], make(False))


def test_weights_replace_seeded_values_and_errors_list_every_problem():
    def make(weights):
        b = GraphBuilder("w", weights=weights)
        x = b.input("input", (1, 3, 8, 8))
        y = b.conv(x, 4, 3, name="conv")
        b.output(b.batch_norm(y, name="bn"), "y")
        return b

    w = np.full((4, 3, 3, 3), 0.25, np.float32)
    full = dict(make(None).state_dict())
    full["conv.weight"] = w
    b = make(full)
    b.build()
    np.testing.assert_array_equal(b.initializers["conv.weight"], w)

    bad = dict(full)
    del bad["bn.running_mean"]
    bad["conv.bias"] = np.zeros(5, np.float32)
    bad["head.weight"] = np.zeros(1, np.float32)
    with pytest.raises(WeightsError) as e:
        make(bad).build()
    msg = str(e.value)
    assert "missing 1: bn.running_mean" in msg
    assert "unexpected 1: head.weight" in msg
    assert "conv.bias: expected [4], got [5]" in msg
    assert "\n" not in msg


def test_too_small_input_is_a_clear_error():
    b = GraphBuilder("s")
    x = b.input("input", (1, 3, 4, 4))
    with pytest.raises(ValueError, match="too small"):
        b.conv(x, 4, 7, name="conv")
