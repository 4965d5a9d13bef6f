"""A BatchNormalization no layer could take becomes one Mul and one Add.

    y = x * s + t,   s = gamma / sqrt(var + eps),  t = beta - mean * s

with ``s`` and ``t`` shaped [C, 1, ..., 1] to broadcast over [N, C, ...]. Runs after
``fold_batchnorm`` (into the layer before) so only BNs after an activation, a residual Add
or a Concat reach it (pre-activation ResNet, DenseNet). The Mul / Add pair is what the
next passes and TVM's fusion take: ``fold_affine_forward`` moves it into the following
convolution where that is exact, and TVM fuses what is left into the neighbouring kernels.
A factor of exactly 1 or a shift of exactly 0 is left out.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphgen.optimize.fold_batchnorm import bn_scale_shift, inference_batchnorms
from graphgen.optimize.graph import add_const, add_node, toposort

NAME = "batchnorm_to_mul_add"


def run(model: onnx.ModelProto) -> int:
    found = inference_batchnorms(model)
    if found is None:
        return 0
    view, shapes, bns = found
    done = 0
    for bn in bns:
        ss = bn_scale_shift(view, bn)
        rank = len(shapes.get(bn.input[0], ()))
        if ss is None or rank < 2:
            continue
        scale, shift = ss
        shape = (len(scale),) + (1,) * (rank - 2)
        x, y, base = bn.input[0], bn.output[0], bn.name or bn.output[0]
        view.remove_nodes([bn])
        need_mul, need_add = not np.all(scale == 1.0), not np.all(shift == 0.0)
        if need_mul and need_add:
            mid = view.unique_name(f"{base}.scaled")
            view.producer[mid] = None
            add_node(view, "Mul", [x, add_const(view, scale.reshape(shape).astype(np.float32), f"{base}.scale")],
                     [mid], name=f"{base}.mul")
            add_node(view, "Add", [mid, add_const(view, shift.reshape(shape).astype(np.float32), f"{base}.shift")],
                     [y], name=f"{base}.add")
        elif need_mul:
            add_node(view, "Mul", [x, add_const(view, scale.reshape(shape).astype(np.float32), f"{base}.scale")],
                     [y], name=f"{base}.mul")
        else:
            add_node(view, "Add", [x, add_const(view, shift.reshape(shape).astype(np.float32), f"{base}.shift")],
                     [y], name=f"{base}.add")
        done += 1
    toposort(model)
    view.refresh()
    view.remove_unused_initializers()
    return done
