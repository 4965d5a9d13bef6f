import numpy as np
import onnx
import pytest

from graphgen.registry import build_recipe, get
from graphgen.testing import assert_tvm_matches_ort
from graphgen.verify import random_inputs, run_onnxruntime

# torchvision's parameter counts (shared/reference/model_facts.tsv)
PARAMS = {"squeezenet1_0": 1248424, "squeezenet1_1": 1235496}
# indices of the Fire modules inside torchvision's `features` Sequential
FIRE_INDICES = {"squeezenet1_0": [3, 4, 5, 7, 8, 9, 10, 12], "squeezenet1_1": [3, 4, 6, 7, 9, 10, 11, 12]}


def torchvision_keys(name):
    keys = ["features.0.weight", "features.0.bias"]
    for i in FIRE_INDICES[name]:
        for conv in ("squeeze", "expand1x1", "expand3x3"):
            keys += [f"features.{i}.{conv}.weight", f"features.{i}.{conv}.bias"]
    return keys + ["classifier.1.weight", "classifier.1.bias"]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_and_state_dict_keys_equal_torchvision(name):
    g = build_recipe(name)
    assert g.parameter_count == PARAMS[name]
    assert list(g.state_dict) == torchvision_keys(name)
    init_names = {i.name for i in g.model.graph.initializer}
    assert set(torchvision_keys(name)) <= init_names


def test_family_alias_is_squeezenet1_1():
    assert get("squeezenet").name == "squeezenet1_1"


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_runs_on_onnxruntime_with_options(name):
    g = build_recipe(name, input_size=(96, 128), num_classes=10)
    onnx.checker.check_model(g.model, full_check=True)
    out = run_onnxruntime(g.model, random_inputs(g.model))[0]
    assert out.shape == (1, 10)
    assert np.all(np.isfinite(out))


def test_export_is_byte_identical_across_runs():
    from graphgen.api import export

    a = export("squeezenet1_0", input_size=(64, 64)).SerializeToString(deterministic=True)
    b = export("squeezenet1_0", input_size=(64, 64)).SerializeToString(deterministic=True)
    assert a == b


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_tvm_x86_matches_onnxruntime(name):
    assert_tvm_matches_ort(build_recipe(name, input_size=(64, 64)).model)
