"""Checkpoints: torchvision key names in .npz / .safetensors, round trips, and clear rejections."""

import numpy as np
import pytest

from graphgen import api
from graphgen.errors import WeightsError
from graphgen.weights import load_weights, save_weights


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_then_load_gives_identical_onnx_bytes(tmp_path, suffix):
    w = tmp_path / f"w{suffix}"
    a = api.export("resnet18", input_size=(32, 32), save_weights=w)
    sd = load_weights(w)
    # exactly torchvision's state_dict key set, buffers included
    assert "layer1.0.bn1.num_batches_tracked" in sd and "fc.weight" in sd
    assert sd["bn1.running_var"].shape == (64,)
    b = api.export("resnet18", input_size=(32, 32), weights=w)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_loaded_values_reach_the_graph(tmp_path):
    w = tmp_path / "w.npz"
    api.export("squeezenet1_1", input_size=(64, 64), save_weights=w)
    sd = load_weights(w)
    sd["classifier.1.bias"] = np.full_like(sd["classifier.1.bias"], 0.125)
    save_weights(sd, w)
    m = api.export("squeezenet1_1", input_size=(64, 64), weights=w)
    init = {i.name: i for i in m.graph.initializer}["classifier.1.bias"]
    from onnx import numpy_helper

    assert np.all(numpy_helper.to_array(init) == 0.125)


def test_saved_npz_is_byte_stable(tmp_path):
    api.export("squeezenet1_1", save_weights=tmp_path / "a.npz")
    api.export("squeezenet1_1", save_weights=tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_unreadable_and_unsupported_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_weights(bad)
    pt = tmp_path / "w.pt"
    pt.write_bytes(b"x")
    with pytest.raises(WeightsError, match="accepted: .npz, .safetensors"):
        load_weights(pt)
    z = tmp_path / "trunc.npz"
    z.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(z)


def test_classifier_with_other_num_classes_is_mis_shaped(tmp_path):
    w = tmp_path / "w.npz"
    api.export("mobilenet_v2", input_size=(32, 32), save_weights=w)
    with pytest.raises(WeightsError, match=r"classifier.1.weight: expected \[10, 1280\], got \[1000, 1280\]"):
        api.export("mobilenet_v2", input_size=(32, 32), num_classes=10, weights=w)
