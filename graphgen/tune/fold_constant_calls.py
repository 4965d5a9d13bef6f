"""Kernel calls on constants evaluated at compile time, from one build of all their kernels.

Relax's ``FoldConstant`` evaluates a ``call_tir`` whose arguments are all constants by building
its kernel on its own: a full TIR pipeline and an LLVM module per kernel, ~30 ms each. A build
has two rounds of them: the bias reshapes and other constant expressions of the imported graph
(before fusion), and the weight repacking of the default schedules
(:func:`graphgen.tune.defaults._rewrite_weight_layout`, made calls on constants by
``SplitLayoutRewritePreproc``). NASNet-A mobile needed 380 such builds before fusion and had
357 repacking calls after; its x86 compile (CI's test size, opt-level 0) took 44 s before this
pass and 9.4 s with it, its aarch64 compile 43 s and 9.3 s.

Here every such call is evaluated from one library holding all the kernels called (built at
LLVM opt-level 0, see :func:`fold`), and replaced by its result; ``FoldConstant`` afterwards has
nothing left to build but what the folding itself makes constant. Should that library fail to
build, the module is left as it was and ``FoldConstant`` does all of it, as before.
"""

from __future__ import annotations


def _out_types(ty):
    """The static tensor types a ``call_tir`` of type ``ty`` writes (one, or a tuple of them), else None."""
    from tvm import relax

    types = list(ty.fields) if isinstance(ty, relax.TupleType) else [ty]
    if not types or not all(isinstance(t, relax.TensorType) and t.shape is not None for t in types):
        return None
    try:
        [[int(d) for d in t.shape] for t in types]
    except TypeError:  # symbolic
        return None
    return types


def _nbytes(shape, dtype) -> int:
    import numpy as np

    return int(np.prod([int(d) for d in shape], dtype=np.int64)) * np.dtype(str(dtype)).itemsize


def _expands(call) -> bool:
    """Whether the call makes much more data than it reads (a broadcast of a constant): left to
    ``FoldConstant``'s own judgement rather than stored in the library by this pass."""
    out = sum(_nbytes(t.shape, t.dtype) for t in _out_types(call.ty_args[0]))
    inp = sum(_nbytes(a.value.shape, a.value.dtype) for a in call.args[1].fields)
    return out > max(4 * inp, 1 << 20)


def _constant_calls(func):
    """``call_tir`` calls of ``func`` whose arguments are all constants, with static outputs."""
    import tvm
    from tvm import relax

    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" \
                and len(e.args) == 2 and isinstance(e.args[1], relax.Tuple) and e.args[1].fields \
                and all(isinstance(a, tvm.ir.expr.GenericConst) for a in e.args[1].fields) \
                and len(e.ty_args) == 1 and _out_types(e.ty_args[0]) is not None \
                and not _expands(e):
            found.append(e)

    relax.analysis.post_order_visit(func.body, visit)
    return found


def fold(mod):
    """``mod`` with every ``call_tir`` on constants replaced by its value (a tuple of them for
    a kernel with several outputs)."""
    import tempfile
    from pathlib import Path

    import tvm
    from tvm import relax, tirx

    from graphgen.tune.measure import make_fcompile

    calls = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            for call in _constant_calls(func):
                calls[call] = call.args[0]
    if not calls:
        return mod
    names = {gv.name_hint for gv in calls.values()}
    kernels = {}
    for gv, f in mod.functions.items():
        if gv.name_hint in names and isinstance(f, tirx.PrimFunc):
            f = f.with_attr("global_symbol", gv.name_hint)
            if f.attrs is not None and "target" in f.attrs:
                f = f.without_attr("target")  # evaluated here, whatever the library's target
            kernels[gv.name_hint] = f
    # Built at LLVM opt-level 0 and linked into a shared library: each kernel runs once, on
    # weights. Measured on DenseNet-201's 97 repacking kernels: opt-level 0 + link 1.9 s;
    # opt-level 3 + link 8.6 s; fetching the functions from the JIT-compiled module instead of
    # linking them, 27 ms per function at either level (8.5 s).
    host = tvm.target.Target({"kind": "llvm", "opt-level": 0})
    try:
        built = tvm.compile(tvm.IRModule({tvm.ir.GlobalVar(n): f for n, f in kernels.items()}), target=host)
        with tempfile.TemporaryDirectory(prefix="graphgen-fold-") as tmp:
            path = Path(tmp) / "constants.so"
            built.export_library(str(path), fcompile=make_fcompile(str(host.attrs["mtriple"])))
            lib = tvm.runtime.load_module(str(path))
    except Exception:  # noqa: BLE001 - a speed-up only: FoldConstant evaluates them one by one instead
        return mod
    values = {}
    for call, gv in calls.items():
        outs = [tvm.runtime.empty([int(d) for d in t.shape], str(t.dtype), tvm.cpu())
                for t in _out_types(call.ty_args[0])]
        # the constants' own tensors as inputs: no copy of a VGG's 400 MB classifier weight
        lib[gv.name_hint](*[a.value for a in call.args[1].fields], *outs)
        consts = [relax.const(o) for o in outs]
        # a kernel with several outputs (a repacked weight and its bias) returns a tuple
        values[call] = relax.Tuple(consts) if isinstance(call.ty_args[0], relax.TupleType) else consts[0]

    replace = _replacer()(mod, values)
    out = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gv] = replace.visit_expr(func)
    # nothing of this call may keep the folded weights alive: a mutator class defined in here,
    # its closure holding them, leaked every build's (ResNet-50's compiles grew the process by
    # 0.2 GB each; an xdist worker ran out of memory)
    replace.values = {}
    values.clear()
    return out


_REPLACER = None


def _replacer():
    """The mutator class replacing calls by their values (registered with TVM once)."""
    global _REPLACER
    if _REPLACER is None:
        from tvm import relax

        @relax.expr_functor.mutator
        class _Replace(relax.PyExprMutator):
            def __init__(self, mod, values):
                super().__init__(mod)
                self.values = values

            def visit_call_(self, call):
                if call in self.values:
                    return self.values[call]
                return super().visit_call_(call)

        _REPLACER = _Replace
    return _REPLACER


def pass_():
    """:func:`fold` as a module pass."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="graphgen.FoldConstantCalls")
    def _fold(mod, _ctx):
        return fold(mod)

    return _fold
