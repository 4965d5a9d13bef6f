"""Kernel calls on constants evaluated with one build (graphgen.tune.fold_constant_calls): the
same constants as Relax's FoldConstant, before fusion (bias reshapes) and after the default
schedules (weight repacking), and nothing left for FoldConstant to build."""

import numpy as np

from graphgen.builder import GraphBuilder
from graphgen.compile import resolve_target
from graphgen.compile.tvm_build import import_onnx


def _model():
    b = GraphBuilder("folds")
    x = b.input("input", (1, 8, 12, 12))
    x = b.relu(b.conv(x, 16, 3, padding=1, name="c3"))
    x = b.relu(b.conv(x, 16, 3, padding=1, groups=16, name="dw"))
    x = b.relu(b.conv(x, 24, 1, name="pw"))
    x = b.relu(b.conv(x, 24, 3, stride=2, padding=1, name="s2"))
    b.output(b.linear(b.flatten(b.global_avg_pool(x)), 10, name="fc"), "out")
    return b.build()


def _constants(mod):
    import tvm
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(e.value.numpy())
                                    if isinstance(e, tvm.ir.expr.GenericConst) and e.value.ndim > 0 else None)
    return found


def _both(mod):
    from tvm import relax

    from graphgen.tune import fold_constant_calls

    ours = relax.transform.FoldConstant()(fold_constant_calls.fold(mod))
    theirs = relax.transform.FoldConstant()(mod)
    assert not fold_constant_calls._constant_calls(fold_constant_calls.fold(mod)["main"])
    a, b = _constants(ours), _constants(theirs)
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(x, y)
    return a


def test_constants_before_fusion_equal_fold_constant():
    from tvm import relax

    from graphgen.tune import fold_constant_calls
    from graphgen.tune.winograd import legalize_map

    target = resolve_target("x86").tvm_target()
    with target:
        mod = relax.transform.LegalizeOps(customize_legalize_map=legalize_map())(import_onnx(_model()))
    assert fold_constant_calls._constant_calls(mod["main"])  # the bias reshapes, at least
    _both(mod)


def test_repacked_weights_equal_fold_constant():
    from graphgen.tune import fold_constant_calls
    from graphgen.tune.pipeline import _split_layout_rewrite, fuse, schedule_kernels

    for name in ("x86", "arm"):  # NEON-sized blocks are repacked on this host too
        target = resolve_target(name).tvm_target()
        with target:
            mod = _split_layout_rewrite(schedule_kernels(fuse(import_onnx(_model()), target), target))
        calls = fold_constant_calls._constant_calls(mod["main"])
        assert len(calls) >= 3, name  # a repacking per weight the default schedules block (not Winograd's)
        _both(mod)


def test_folded_weights_are_not_kept_alive_after_the_build(tmp_path):
    """Each build's folded constants belong to its module only (a leak here grew a CI worker
    past the machine's memory: ResNet-50's compiles added 0.2 GB each)."""
    import gc

    from graphgen.compile import compile_model

    b = GraphBuilder("big_weights")
    x = b.input("input", (1, 1024, 4, 4))
    for i in range(3):  # 3 x 16 MB of repacked weights
        x = b.relu(b.conv(x, 1024, 1, name=f"pw{i}"))
    b.output(x, "out")
    model = b.build()
    spec = resolve_target("x86")

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    sizes = []
    for i in range(4):
        compile_model(model, spec, tmp_path / f"m{i}.so")
        gc.collect()
        sizes.append(rss_mb())
    # the first builds warm caches; a leak would add ~48 MB per build after them
    assert sizes[3] - sizes[1] < 40, sizes


def test_no_tuples_of_folded_weights_are_left_for_the_vm_to_build():
    """Folding a repacking kernel that returns several weights left a tuple of the constants
    and its items bound beside the kernel call (which reads the constants itself): dead, yet
    the VM built and took apart each tuple on every run. After :func:`finish` no binding of
    ``main`` is a tuple or an item of one, and the kernels still read the repacked weights."""
    import tvm
    from tvm import relax

    from graphgen.tune.pipeline import finish, fuse, schedule_kernels

    target = resolve_target("x86").tvm_target()
    with target:
        mod = finish(schedule_kernels(fuse(import_onnx(_model()), target), target), target)
    tuples, items, weights = [], [], []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: (
        tuples.append(e) if isinstance(e, relax.Tuple) and len(e.fields) else
        items.append(e) if isinstance(e, relax.TupleGetItem) else
        weights.append(e) if isinstance(e, tvm.ir.expr.GenericConst) and hasattr(e.value, "shape")
        and len(e.value.shape) >= 2 else None))
    assert not tuples and not items, mod["main"].script()[:3000]
    assert len(weights) >= 5  # the five layers' weights, repacked
