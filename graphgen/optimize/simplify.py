"""General clean-up with onnxsim: constant folding, shape-op elimination, dead code.

Runs last in each round; the patterns earlier in the order see its folded constants in the
next round (an exporter's Shape -> Gather -> Concat shape computation becomes a constant,
which the reshape and shuffle passes need).

onnxsim serializes the model and runs it through onnxruntime; with a VGG's 500 MB of
weights that dominates the optimizer's time. So it gets a light copy: a large initializer
that only meets runtime data (every node reading it has a non-constant input, so nothing
can fold it) becomes a graph input of the same shape, and gets its values back afterwards.
"""

from __future__ import annotations

import numpy as np
import onnx

NAME = "simplify"

LIGHT_ABOVE = 1024  # elements


def run(model: onnx.ModelProto) -> int:
    import onnxsim

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    const_names = set(inits)
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    light = set()
    for name, init in inits.items():
        if int(np.prod(init.dims)) <= LIGHT_ABOVE or name in outputs or not readers.get(name):
            continue
        if all(any(i and i not in const_names for i in n.input) for n in readers[name]):
            light.add(name)
    work = onnx.ModelProto()
    if light:
        _light_copy(model, light, work)
    else:
        work.CopyFrom(model)
    before = len(g.node)
    simplified, _ = onnxsim.simplify(work, check_n=0, perform_optimization=True, skip_shape_inference=False)
    sg = simplified.graph
    if list(sg.node) == list(g.node) and {i.name for i in sg.initializer} | light == set(inits):
        return 0  # nothing changed: keep the model (and its weights) as they are
    # move the result into the model without copying the light weights back and forth
    del g.node[:]
    g.node.extend(sg.node)
    used = {i for n in sg.node for i in n.input} | {o.name for o in sg.output}
    for k in reversed(range(len(g.initializer))):
        if g.initializer[k].name not in light or g.initializer[k].name not in used:
            del g.initializer[k]
    g.initializer.extend(sg.initializer)
    del g.input[:]
    g.input.extend(v for v in sg.input if v.name not in light)
    del g.output[:]
    g.output.extend(sg.output)
    del g.value_info[:]
    g.value_info.extend(sg.value_info)
    return before - len(g.node)


def _light_copy(model: onnx.ModelProto, light: set, work: onnx.ModelProto) -> None:
    g = model.graph
    work.ir_version = model.ir_version
    work.opset_import.extend(model.opset_import)
    work.producer_name = model.producer_name
    work.producer_version = model.producer_version
    work.doc_string = model.doc_string
    work.metadata_props.extend(model.metadata_props)
    wg = work.graph
    wg.name = g.name
    wg.doc_string = g.doc_string
    wg.node.extend(g.node)
    wg.input.extend(g.input)
    for init in g.initializer:
        if init.name in light:
            wg.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            wg.initializer.append(init)
    wg.output.extend(g.output)
    wg.value_info.extend(g.value_info)
