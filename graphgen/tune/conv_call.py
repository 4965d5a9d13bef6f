"""What graphgen's own conv kernels (Winograd, pointwise) need to know of a ``relax.nn.conv2d``."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

#: TIR op pattern of a convolution: FuseOps fuses elementwise / broadcast consumers (bias,
#: ReLU, residual add) into a kernel that carries it
OUT_ELEMWISE_FUSABLE = 4


#: the ISA graphgen's kernels are legalized for, where it is not the target's own (see
#: :func:`legalizing_for`)
_LEGALIZE_ISA: ContextVar = ContextVar("graphgen_legalize_isa", default=None)


@contextmanager
def legalizing_for(isa):
    """Kernels legalized inside take their vector widths and weight blocks from ``isa`` (a
    :class:`graphgen.tune.defaults.Isa`; None: the current target's). A build scheduled like
    another target (the armv7 kernel check's x86 reference) must give its kernels the same
    argument shapes as that target's library."""
    token = _LEGALIZE_ISA.set(isa)
    try:
        yield
    finally:
        _LEGALIZE_ISA.reset(token)


def legalize_isa():
    """The ISA (:class:`graphgen.tune.defaults.Isa`) kernels are legalized for:
    :func:`legalizing_for`'s, else the current target's (LegalizeOps runs under it), else None."""
    isa = _LEGALIZE_ISA.get()
    if isa is None:
        import tvm

        from graphgen.tune.defaults import isa_of

        target = tvm.target.Target.current(allow_none=True)
        if target is None:
            return None
        isa = isa_of(target)
    return isa


def legalize_lanes() -> int | None:
    """fp32 lanes of the ISA kernels are legalized for (:func:`legalize_isa`), else None."""
    isa = legalize_isa()
    return None if isa is None else isa.lanes


def legalize_threads() -> int:
    """Threads the kernels being legalized are scheduled for (:func:`legalize_isa`), else 1."""
    isa = legalize_isa()
    return 1 if isa is None else isa.threads


@dataclass(frozen=True)
class StaticConv:
    data_shape: tuple[int, int, int, int]  # NCHW
    weight: np.ndarray  # OIHW float32
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    strides: tuple[int, int] = (1, 1)


def static_conv(call, kernel: tuple[int, int] | None, *, strided: bool = False,
                depthwise: bool = False) -> StaticConv | None:
    """The facts of a stride-1 (``strided``: any stride), dilation-1, one-group (``depthwise``:
    one group per channel, one output channel per group) NCHW fp32 conv with a
    ``kernel``-sized (None: any size) constant weight and static shapes; None for any other
    conv (weights passed at run time, with ``params_as_inputs``, among them: those keep TVM's
    conv)."""
    import tvm
    from tvm import relax

    attrs = call.attrs
    data, weight = call.args
    if not isinstance(weight, tvm.ir.expr.Constant):
        return None
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None
    strides = tuple(int(s) for s in attrs.strides)
    if len(strides) != 2 or (strides != (1, 1) and not strided) or [int(d) for d in attrs.dilation] != [1, 1]:
        return None
    groups = int(attrs.groups)
    if str(attrs.out_dtype) not in ("", "float32", "void", "None"):
        return None
    ty = data.ty  # TVM 0.27's Relax types (struct_info before)
    if not isinstance(ty, relax.type.TensorType) or str(ty.dtype) != "float32" or ty.shape is None:
        return None
    try:
        shape = tuple(int(x) for x in ty.shape)
    except TypeError:  # symbolic dimensions
        return None
    w = weight.value.numpy()
    if w.dtype != np.float32 or w.ndim != 4 or len(shape) != 4 or \
            (kernel is not None and tuple(w.shape[2:]) != tuple(kernel)):
        return None
    if groups != (shape[1] if depthwise else 1) or (depthwise and w.shape[:2] != (shape[1], 1)):
        return None
    pads = [int(p) for p in attrs.padding]
    if len(pads) == 2:
        pads = pads * 2
    if len(pads) != 4:
        return None
    return StaticConv(shape, w, tuple(pads), strides)
