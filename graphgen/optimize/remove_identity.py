"""Drop inference no-ops: Identity, and Dropout whose mask output is unused."""

from __future__ import annotations

import onnx

from graphgen.optimize.graph import GraphView, bypass_node

NAME = "remove_identity"


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    changed = 0
    for node in list(model.graph.node):
        if node.op_type == "Identity" or (
                node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1]
                                               or not view.consumers.get(node.output[1]))
                and (len(node.input) < 3 or not node.input[2])):  # training_mode input absent: inference
            before = len(model.graph.node)
            bypass_node(view, node)
            changed += before - len(model.graph.node)
    view.remove_unused_initializers()
    return changed
