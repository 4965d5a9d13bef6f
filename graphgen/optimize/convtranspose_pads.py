"""ConvTranspose ``output_shape`` / ``auto_pad`` -> explicit ``pads``.

TVM 0.27's ONNX importer ignores ``output_shape`` (measured: a wrong output shape), so a
ConvTranspose that states its size that way is rewritten the way the ONNX spec defines it:

    total = stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1 - output_shape
    SAME_UPPER: pads = (total // 2, total - total // 2)
    otherwise : pads = (total - total // 2, total // 2)

(``auto_pad`` SAME_* without ``output_shape`` means ``output_shape = in * stride``). A
negative total (an output larger than the transposed convolution makes) goes into
``output_padding`` when that stays below the stride; otherwise the node is left alone.
"""

from __future__ import annotations

import onnx

from graphgen.optimize.graph import GraphView, attr, static_shapes

NAME = "convtranspose_pads"


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    nodes = [n for n in model.graph.node if n.op_type == "ConvTranspose"
             and (attr(n, "output_shape") is not None or _s(attr(n, "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"))]
    if not nodes:
        return 0
    shapes = static_shapes(model)
    done = 0
    for node in nodes:
        x = shapes.get(node.input[0])
        w = view.inits.get(node.input[1])
        if x is None or w is None or any(not isinstance(d, int) for d in x[2:]):
            continue
        n = len(x) - 2
        kernel = list(attr(node, "kernel_shape", list(w.dims[2:])))
        strides = list(attr(node, "strides", [1] * n))
        dil = list(attr(node, "dilations", [1] * n))
        out_pad = list(attr(node, "output_padding", [0] * n))
        auto = _s(attr(node, "auto_pad", "NOTSET"))
        want = attr(node, "output_shape")
        if want is None:
            want = [x[2 + i] * strides[i] for i in range(n)]
        want = list(want)[-n:]  # output_shape may or may not include N and C
        begin, end = [], []
        for i in range(n):
            total = strides[i] * (x[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 - want[i]
            if total < 0:
                if out_pad[i] - total >= max(strides[i], dil[i]):
                    break
                out_pad[i] -= total
                total = 0
            if auto == "SAME_UPPER":
                begin.append(total // 2)
                end.append(total - total // 2)
            else:
                begin.append(total - total // 2)
                end.append(total // 2)
        else:
            for a in list(node.attribute):
                if a.name in ("output_shape", "auto_pad", "pads", "output_padding"):
                    node.attribute.remove(a)
            node.attribute.append(onnx.helper.make_attribute("pads", begin + end))
            if any(out_pad):
                node.attribute.append(onnx.helper.make_attribute("output_padding", out_pad))
            done += 1
    return done
