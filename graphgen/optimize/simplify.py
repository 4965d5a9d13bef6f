"""General clean-up with onnxsim: constant folding, shape-op elimination, dead code."""

from __future__ import annotations

import onnx

NAME = "onnxsim"


def run(model: onnx.ModelProto) -> int:
    import onnxsim

    before = len(model.graph.node)
    simplified, _ = onnxsim.simplify(model, check_n=0, perform_optimization=True, skip_shape_inference=False)
    model.CopyFrom(simplified)
    return before - len(model.graph.node)
