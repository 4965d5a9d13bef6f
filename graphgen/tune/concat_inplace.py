"""Concatenations without a copy: the kernels producing the pieces write them in place.

A channel concat of NCHW tensors with batch 1 (more generally: every dimension before the
concat axis is 1) is a sequence of contiguous pieces of its output. So instead of

    a = kernel_a(...); b = kernel_b(...); c = concatenate(a, b)

the library allocates ``c`` first and runs ``kernel_a`` and ``kernel_b`` in place on views of
it (``R.memory.view`` at each piece's byte offset, ``R.call_tir_inplace``); the concat's
copy pass disappears (measured: 4-6 % of SqueezeNet 1.1, which onnxruntime spends as well).
A kernel reads its output's position from the view's byte offset, so its output buffer is
given a symbolic element offset (``offset_factor=1``); it still runs unchanged where it is
called on a tensor of its own (offset 0). A concat whose first piece is itself such a concat
becomes a prefix view of the outer one's buffer, so DenseNet's ``concat(concat(x, f1), f2)``
chains write every layer's features once.

The rewrite runs on the lowered Relax function (after ``RemovePurityChecking``, before
``CallTIRRewrite`` plans the outputs) and only where it is safe:

* the concat is TVM's own kernel (``concatenate*``, unfused) of tensors whose leading
  dimensions before the axis are all 1;
* every piece is the single output of a ``call_tir`` bound earlier in the same block (or a
  concat rewritten the same way, as the first piece) and no piece appears twice;
* a piece other kernels read too (U-Net's skip connections, DenseNet's features) is the
  first one (offset 0: its readers take the view as an ordinary tensor) and is read only
  before the concat (its buffer is the concat's, alive from the first piece to the concat's
  last reader); later pieces are read by the concat alone;
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
        out = tvm.script.from_source(text[:close] + ", offset_factor=1" + text[close:])
        # the round trip must reproduce the kernel: with the offset bound back to 0 (the
        # original output buffer), it is the same function (one parse: they take 0.1-0.6 s)
        tvm.ir.assert_structural_equal(out.specialize({out.params[-1]: func.params[-1]}), func)
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


def _users(bindings) -> dict:
    """Relax variable -> indices of the bindings (of this block) whose value uses it."""
    from tvm import relax

    found: dict = {}
    for k, b in enumerate(bindings):
        seen = set()

        def visit(e, seen=seen):
            if isinstance(e, relax.Var):
                seen.add(e)

        relax.analysis.post_order_visit(b.value, visit)
        for v in seen:
            found.setdefault(v, []).append(k)
    return found


class _Block:
    """The concats of one binding block and how each one's pieces are written in place.

    A piece is a ``kernel`` piece (its producing kernel runs in place on a view of the
    output) or, first pieces only, a ``concat`` piece: a concat that is itself rewritten and
    becomes a prefix view of this one's output (DenseNet's ``concat(concat(x, f1), f2)``).
    A piece other kernels read too (U-Net's skip connections, DenseNet's growing features)
    is allowed at offset 0 only (readers take views at offset 0, which every kernel accepts)
    and only when every other reader runs before the concat, while its output is alive.
    """

    def __init__(self, mod, bindings, uses, offset_funcs):
        self.mod, self.bindings, self.uses, self.offset_funcs = mod, bindings, uses, offset_funcs
        self.where = {b.var: i for i, b in enumerate(bindings)}
        self.users = _users(bindings)
        self.plans: dict = {}  # concat binding -> [(kind, binding of the piece, byte offset)]
        self.claimed: set[int] = set()
        self.nested_in: dict = {}  # concat binding -> the concat it is a prefix of

    def _read_before(self, var, i: int) -> bool:
        """Every use of ``var`` is a binding of this block up to ``i`` (the concat itself, or an
        alias it reads through)."""
        inside = self.users.get(var, [])
        return len(inside) == self.uses.get(var, 0) and all(k <= i for k in inside)

    def _offset_func(self, producer):
        from tvm import tirx

        if producer not in self.offset_funcs:
            pf = self.mod[producer]
            self.offset_funcs[producer] = with_offset_output(pf) if isinstance(pf, tirx.PrimFunc) else None
        return self.offset_funcs[producer]

    def _piece(self, p, i: int, offset: int):
        """(kind, binding index) of piece ``p`` of the concat at ``i``, or None."""
        import tvm
        from tvm import relax

        call_tir = tvm.ir.Op.get("relax.call_tir")
        j = self.where.get(p)
        chain = [p]
        # through plain aliases (``lv2 = lv15``, left by ToNonDataflow and the layout rewrite)
        while j is not None and isinstance(self.bindings[j].value, relax.Var):
            p = self.bindings[j].value
            chain.append(p)
            j = self.where.get(p)
        if j is None or j >= i or j in self.claimed:
            return None
        private = all(self.uses.get(v, 0) == 1 for v in chain)
        shared_ok = offset == 0 and all(self._read_before(v, i) for v in chain)
        if j in self.plans and j not in self.nested_in and offset == 0 and (private or shared_ok):
            return "concat", j
        pv = self.bindings[j].value
        if not (isinstance(pv, relax.Call) and pv.op.same_as(call_tir) and len(pv.args) == 2
                and isinstance(pv.args[0], tvm.ir.GlobalVar)):
            return None
        if not (private or shared_ok) or self._offset_func(pv.args[0]) is None:
            return None
        return "kernel", j

    def plan(self) -> None:
        import tvm
        from tvm import relax

        call_tir = tvm.ir.Op.get("relax.call_tir")
        for i, b in enumerate(self.bindings):
            v = b.value
            if not (isinstance(b, relax.VarBinding) and isinstance(v, relax.Call) and v.op.same_as(call_tir)
                    and len(v.args) == 2 and isinstance(v.args[0], tvm.ir.GlobalVar)
                    and _CONCAT_NAME.match(v.args[0].name_hint)):
                continue
            pieces = list(v.args[1].fields)
            out_shape = _shape(b.var.ty)
            shapes = [_shape(p.ty) if isinstance(p, relax.Var) else None for p in pieces]
            if out_shape is None or any(s is None for s in shapes) or len(set(pieces)) != len(pieces):
                continue
            axis = _concat_axis(shapes, out_shape)
            if axis is None:
                continue
            inner = math.prod(out_shape[axis + 1:]) * (tvm.runtime.DataType(str(b.var.ty.dtype)).bits // 8)
            plan, offset = [], 0
            for p, s in zip(pieces, shapes):
                got = self._piece(p, i, offset)
                if got is None:
                    plan = None
                    break
                plan.append((*got, offset))
                offset += s[axis] * inner
            if plan:
                self.plans[i] = plan
                for kind, j, _ in plan:
                    if kind == "concat":
                        self.nested_in[j] = i
                    else:
                        self.claimed.add(j)

    def _root(self, i: int) -> int:
        while i in self.nested_in:
            i = self.nested_in[i]
        return i

    def rewritten(self):
        """The new bindings and the producers now run in place (None: nothing to rewrite)."""
        from tvm import relax, tirx

        if not self.plans:
            return None, set()
        kernel_at = {}  # producer binding -> (root concat, byte offset)
        for i, plan in self.plans.items():
            for kind, j, off in plan:
                if kind == "kernel":
                    kernel_at[j] = (self._root(i), off)  # nested concats sit at offset 0
        alloc_at: dict = {}  # binding before which a root's buffer is allocated -> roots
        for root in {self._root(i) for i in self.plans}:
            first = min(j for j, (r, _) in kernel_at.items() if r == root)
            alloc_at.setdefault(first, []).append(root)
        storage = {}
        new = []
        producers = set()
        for k, b in enumerate(self.bindings):
            for root in alloc_at.get(k, []):
                c = self.bindings[root].var
                storage[root] = relax.Var(c.name + "_storage", c.ty)
                new.append(relax.VarBinding(storage[root], relax.op.builtin.alloc_tensor(
                    relax.ShapeExpr(list(_shape(c.ty))), str(c.ty.dtype), relax.prim_value(0))))
            if k in kernel_at:
                root, off = kernel_at[k]
                call = b.value
                view = relax.Var(b.var.name + "_view", b.var.ty)
                new.append(relax.VarBinding(view, relax.op.memory.view(
                    storage[root], relax.ShapeExpr(list(_shape(b.var.ty))),
                    relative_byte_offset=relax.prim_value(tirx.IntImm("int64", off)))))
                args = [*call.args[1].fields, view]
                new.append(relax.VarBinding(b.var, relax.call_tir_inplace(
                    call.args[0], args, inplace_indices=[len(args) - 1], out_ty=b.var.ty)))
                producers.add(call.args[0])
            elif k in self.nested_in:
                new.append(relax.VarBinding(b.var, relax.op.memory.view(
                    storage[self._root(k)], relax.ShapeExpr(list(_shape(b.var.ty))),
                    relative_byte_offset=relax.prim_value(tirx.IntImm("int64", 0)))))
            elif k in self.plans:
                new.append(relax.VarBinding(b.var, storage[k]))
            else:
                new.append(b)
        return new, producers


def rewrite(mod):
    """The module with every qualifying concat's pieces written in place (see the module
    docstring); returns ``(module, concats rewritten)``."""
    from tvm import relax

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
            blk = _Block(mod, list(block.bindings), uses, offset_funcs)
            blk.plan()
            new, producers = blk.rewritten()
            if new is None:
                blocks.append(block)
                continue
            blocks.append(relax.BindingBlock(new))
            done += len(blk.plans)
            in_place |= producers
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
