"""Concatenations without a copy: the kernels producing the pieces write them in place.

A channel concat of NCHW tensors with batch 1 (more generally: every dimension before the
concat axis is 1) is a sequence of contiguous pieces of its output. So instead of

    a = kernel_a(...); b = kernel_b(...); c = concatenate(a, b)

the library allocates ``c`` first and runs ``kernel_a`` and ``kernel_b`` in place on views of
it (``R.memory.view`` at each piece's byte offset, ``R.call_tir_inplace``); the concat's
copy pass disappears (measured: 5 % of SqueezeNet 1.1, 0.48 ms at one thread, which
onnxruntime spends as well). A kernel reads its output's position from the view's byte
offset, so its output buffer is given a symbolic element offset (``offset_factor=1``); it
still runs unchanged where it is called on a tensor of its own (offset 0).

The rewrite runs on the lowered Relax function (after ``RemovePurityChecking``, before
``CallTIRRewrite`` plans the outputs) and only where it is safe:

* the concat is TVM's own kernel (``concatenate*``, unfused) of tensors whose leading
  dimensions before the axis are all 1;
* every piece is the single output of a ``call_tir`` bound in the same block, used by
  nothing but this concat, and no piece appears twice;
* the producing kernel survives a TVMScript round trip unchanged (how the offset is added);
  else that concat is left as it was.
"""

from __future__ import annotations

import math
import os
import re

_CONCAT_NAME = re.compile(r"^concatenate\d*$")


def enabled(use: bool | None = None) -> bool:
    """Whether concats are rewritten: ``use``, else the environment's
    ``GRAPHGEN_CONCAT_IN_PLACE`` (``0`` turns it off, for comparisons), else yes."""
    if use is not None:
        return bool(use)
    return os.environ.get("GRAPHGEN_CONCAT_IN_PLACE", "1") != "0"


def _shape(ty) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in ty.shape)
    except Exception:  # noqa: BLE001 - symbolic or unknown shape
        return None


def _concat_axis(piece_shapes, out_shape) -> int | None:
    """The axis ``out_shape`` concatenates ``piece_shapes`` along, where the pieces are
    contiguous in memory (every dimension before the axis is 1); else None."""
    if not piece_shapes or any(len(s) != len(out_shape) for s in piece_shapes):
        return None
    for axis in range(len(out_shape)):
        same = all(s[d] == out_shape[d] for s in piece_shapes for d in range(len(out_shape)) if d != axis)
        if same and sum(s[axis] for s in piece_shapes) == out_shape[axis]:
            return axis if all(d == 1 for d in out_shape[:axis]) else None
    return None


def _find_close(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


def with_offset_output(func):
    """``func`` (a PrimFunc whose last parameter is its output) with a symbolic element offset
    on that output, or None where TVMScript does not reproduce ``func`` exactly."""
    import tvm

    text = func.script(show_meta=True)
    name = func.params[-1].name
    at = text.find(f"{name}: T.Buffer(")
    if at < 0:
        return None
    close = _find_close(text, at + len(name) + len(": T.Buffer"))
    if close < 0 or "offset_factor" in text[at:close]:
        return None
    try:
        tvm.ir.assert_structural_equal(tvm.script.from_source(text), func)
        out = tvm.script.from_source(text[:close] + ", offset_factor=1" + text[close:])
    except Exception:  # noqa: BLE001 - not representable in TVMScript: leave the concat alone
        return None
    return out if isinstance(out, tvm.tirx.PrimFunc) else None


def _uses(func) -> dict:
    """How often each Relax variable is used in ``func``."""
    from tvm import relax

    counts: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def rewrite(mod):
    """The module with every qualifying concat's pieces written in place (see the module
    docstring); returns ``(module, concats rewritten)``."""
    import tvm
    from tvm import relax, tirx

    call_tir = tvm.ir.Op.get("relax.call_tir")
    done = 0
    offset_funcs: dict = {}  # producer GlobalVar -> its offset-output version (None: cannot)
    in_place: set = set()  # the producers some concat now runs in place
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        uses = _uses(func)
        blocks = []
        changed = False
        for block in func.body.blocks:
            if isinstance(block, relax.DataflowBlock):
                blocks.append(block)
                continue
            bindings = list(block.bindings)
            where = {b.var: i for i, b in enumerate(bindings)}
            plans = {}  # index of the concat binding -> pieces [(index of producer binding, offset)]
            claimed: set[int] = set()
            for i, b in enumerate(bindings):
                v = b.value
                if not (isinstance(b, relax.VarBinding) and isinstance(v, relax.Call) and v.op.same_as(call_tir)
                        and len(v.args) == 2 and _CONCAT_NAME.match(v.args[0].name_hint)):
                    continue
                pieces = list(v.args[1].fields)
                out_shape = _shape(b.var.ty)
                shapes = [_shape(p.ty) if isinstance(p, relax.Var) else None for p in pieces]
                if out_shape is None or any(s is None for s in shapes) or len(set(pieces)) != len(pieces):
                    continue
                axis = _concat_axis(shapes, out_shape)
                if axis is None:
                    continue
                itemsize = tvm.runtime.DataType(str(b.var.ty.dtype)).bits // 8
                inner = math.prod(out_shape[axis + 1:]) * itemsize
                plan, offset = [], 0
                for p, s in zip(pieces, shapes):
                    j = where.get(p)
                    # through plain aliases (``lv2 = lv15``, left by ToNonDataflow), each used once
                    while (j is not None and isinstance(bindings[j].value, relax.Var) and uses.get(p, 0) == 1):
                        p = bindings[j].value
                        j = where.get(p)
                    pv = bindings[j].value if j is not None else None
                    if (j is None or j >= i or j in claimed or uses.get(p, 0) != 1 or not isinstance(pv, relax.Call)
                            or not pv.op.same_as(call_tir) or len(pv.args) != 2
                            or not isinstance(pv.args[0], tvm.ir.GlobalVar)):
                        plan = None
                        break
                    producer = pv.args[0]
                    if producer not in offset_funcs:
                        pf = mod[producer]
                        offset_funcs[producer] = with_offset_output(pf) if isinstance(pf, tirx.PrimFunc) else None
                    if offset_funcs[producer] is None:
                        plan = None
                        break
                    plan.append((j, offset, producer))
                    offset += s[axis] * inner
                if plan:
                    plans[i] = [(j, off) for j, off, _ in plan]
                    claimed.update(j for j, _, _ in plan)
                    in_place.update(pr for _, _, pr in plan)
            if not plans:
                blocks.append(block)
                continue
            # the concat's output is allocated before its first piece is computed
            first_piece = {min(j for j, _ in plan): i for i, plan in plans.items()}
            piece_of = {j: (i, off) for i, plan in plans.items() for j, off in plan}
            out_vars = {}
            new = []
            for k, b in enumerate(bindings):
                if k in first_piece:
                    c = bindings[first_piece[k]].var
                    buf = relax.Var(c.name + "_storage", c.ty)
                    out_vars[first_piece[k]] = buf
                    new.append(relax.VarBinding(buf, relax.op.builtin.alloc_tensor(
                        relax.ShapeExpr(list(_shape(c.ty))), str(c.ty.dtype), relax.prim_value(0))))
                if k in piece_of:
                    i, off = piece_of[k]
                    call = b.value
                    view = relax.Var(b.var.name + "_view", b.var.ty)
                    new.append(relax.VarBinding(view, relax.op.memory.view(
                        out_vars[i], relax.ShapeExpr(list(_shape(b.var.ty))),
                        relative_byte_offset=relax.prim_value(tirx.IntImm("int64", off)))))
                    args = [*call.args[1].fields, view]
                    new.append(relax.VarBinding(b.var, relax.call_tir_inplace(
                        call.args[0], args, inplace_indices=[len(args) - 1], out_ty=b.var.ty)))
                elif k in plans:
                    new.append(relax.VarBinding(b.var, out_vars[k]))
                    done += 1
                else:
                    new.append(b)
            blocks.append(relax.BindingBlock(new))
            changed = True
        if changed:
            mod[gv] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure,
                                     func.attrs)
    for producer in in_place:
        mod[producer] = offset_funcs[producer]
    if done:
        mod = _drop_unreferenced_kernels(mod)
    return mod, done


def _drop_unreferenced_kernels(mod):
    """The module without the concat kernels no call refers to any more (else the library
    would carry them: the armv7 kernel check counts every kernel it holds).

    Not ``DeadCodeElimination``: it would also drop the in-place calls, whose results nothing
    reads (the concat's output is the buffer they write into)."""
    import tvm
    from tvm import relax, tirx

    used = set()

    def visit(e):
        if isinstance(e, tvm.ir.GlobalVar):
            used.add(e.name_hint)

    for _, f in mod.functions.items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f.body, visit)
    for gv in [gv for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]:
        if _CONCAT_NAME.match(gv.name_hint) and gv.name_hint not in used:
            del mod[gv]
    return mod


def pass_(stats=None):
    """:func:`rewrite` as a module pass; ``stats`` (a dict) gets ``concats_in_place``."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="graphgen.ConcatInPlace")
    def _pass(mod, _ctx):
        mod, n = rewrite(mod)
        if stats is not None:
            stats["concats_in_place"] = stats.get("concats_in_place", 0) + n
        return mod

    return _pass
