"""Fuse regions of channel routing (Concat, Split, Gather, Slice on the channel axis).

ShuffleNet V2 unit after unit is ``Concat -> channel shuffle -> Split``: three copies of the
whole feature map that only decide which channels the next unit's branch reads. After
``channel_shuffle`` turned the shuffle into a Gather, a connected group of such nodes is a
*region*: its inputs (*sources*) are tensors made elsewhere, its outputs (*ends*) are read
by other nodes. Every end channel is some source channel, so the region is rewritten from
scratch:

1. Trace each end back to (source, channel) pairs through the region's nodes.
2. A source made by a dense Conv / Gemm (possibly through per-channel ops: activation,
   depthwise conv, ...) and read only by the region can emit its channels in any order: its
   output channels (and bias, BN, per-channel constants) are permuted so the channels each
   end needs are contiguous (:func:`channels.permute_backward`).
3. An end read only by layers that can take their input channels in any order (dense
   Conv / Gemm, possibly behind per-channel ops) needs only the right *set* of channels:
   the reader's weights absorb the order (:func:`channels.absorb_forward`).
4. Each source is cut at the boundaries the ends need (one Split), each end is the Concat
   of its pieces (or a piece itself); an end whose exact order would take many pieces from
   sources that cannot be reordered is one Gather instead.

The rewrite is applied only when it leaves fewer nodes than the region had. For ShuffleNet
V2 each stage's Concat / Reshape / Transpose / Reshape / Split chain becomes one Split per
branch output and one Concat per branch input, with no Transpose and no Gather.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import onnx

from graphgen.optimize.channels import absorb_forward, permute_backward
from graphgen.optimize.graph import (GraphView, add_const, add_node, attr, opset, rename_input, split_sizes,
                                     static_shapes, toposort)

NAME = "channel_routing"

ROUTING = {"Concat", "Split", "Gather", "Slice"}
#: an end whose order needs more pieces than this (from fixed sources) becomes a Gather
MAX_PIECES = 8


def _channels(shapes, name):
    s = shapes.get(name)
    return s[1] if s is not None and len(s) > 1 and isinstance(s[1], int) and s[1] > 0 else None


def _const_ints(view, name):
    a = view.array(name) if name else None
    return None if a is None else [int(v) for v in a.reshape(-1)]


def routing_spec(view: GraphView, node, shapes):
    """For a node that only moves whole channels (axis 1): per output, a list of
    (data input name, channel). None for anything else."""
    op = node.op_type
    if op not in ROUTING or not node.input:
        return None
    x = node.input[0]
    rank = len(shapes[x]) if x in shapes else None
    if rank is None or rank < 2:
        return None
    if op == "Concat":
        if attr(node, "axis") % rank != 1:
            return None
        out = []
        for i in node.input:
            c = _channels(shapes, i)
            if c is None or len(shapes.get(i, ())) != rank:
                return None
            out += [(i, k) for k in range(c)]
        return [out]
    c = _channels(shapes, x)
    if c is None:
        return None
    if op == "Split":
        if attr(node, "axis", 0) % rank != 1:
            return None
        sizes = split_sizes(view, node, c)
        if sizes is None or sum(sizes) != c or len(sizes) != len(node.output):
            return None
        outs, off = [], 0
        for s in sizes:
            outs.append([(x, k) for k in range(off, off + s)])
            off += s
        return outs
    if op == "Gather":
        if attr(node, "axis", 0) % rank != 1 or len(node.input) < 2:
            return None
        idx = view.array(node.input[1])
        if idx is None or idx.ndim != 1:
            return None
        return [[(x, int(k) % c) for k in idx]]
    if op == "Slice":
        starts, ends = _const_ints(view, node.input[1]), _const_ints(view, node.input[2])
        axes = _const_ints(view, node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
        steps = _const_ints(view, node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
        if None in (starts, ends, axes, steps) or len(axes) != 1 or axes[0] % rank != 1 or steps[0] == 0:
            return None
        return [[(x, k) for k in range(*slice(starts[0], ends[0], steps[0]).indices(c))]]
    return None


def _regions(view: GraphView, specs):
    """Connected groups of routing nodes (one reads another's output), in graph order."""
    parent = {id(n): id(n) for n in specs}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for n in specs:
        for i in n.input:
            p = view.producer.get(i)
            if p is not None and id(p) in parent:
                parent[find(id(p))] = find(id(n))
    groups = defaultdict(list)
    for n in view.graph.node:
        if id(n) in parent:
            groups[find(id(n))].append(n)
    return list(groups.values())


def _runs(seq):
    """Split [(source, pos), ...] into maximal runs of consecutive positions of one source."""
    runs = []
    for s, p in seq:
        if runs and runs[-1][0] == s and runs[-1][2] == p:
            runs[-1][2] = p + 1
        else:
            runs.append([s, p, p + 1])
    return runs


def _plan(view: GraphView, nodes, specs, shapes):
    region = {id(n) for n in nodes}
    produced = {o for n in nodes for o in n.output if o}
    lists: dict[str, list] = {}
    sources: list[str] = []
    for n in nodes:
        for i in (n.input if n.op_type == "Concat" else n.input[:1]):
            if i not in produced and i not in sources:
                if view.is_const(i):
                    return None
                sources.append(i)
                c = _channels(shapes, i)
                if c is None:
                    return None
                lists[i] = [(i, k) for k in range(c)]
    for n in nodes:
        for out, spec in zip(n.output, specs[id(n)]):
            lists[out] = [pair for (name, k) in spec for pair in [lists[name][k]]]
    ends = []
    for n in nodes:
        for o in n.output:
            if not o:
                continue
            if o in view.graph_outputs:
                return None  # keep graph output names simple: leave such regions alone
            readers = [c for c in view.consumers.get(o, []) if id(c) not in region]
            if readers:
                ends.append((o, readers))
    if not ends:
        return None
    # what may move
    fixed_order = {}
    for s in sources:
        c = len(lists[s])
        movable = (s not in view.graph_outputs and all(id(r) in region for r in view.consumers.get(s, []))
                   and permute_backward(view, s, np.arange(c), shapes) is not None)
        fixed_order[s] = not movable
    flexible = {}
    for t, readers in ends:
        seq = lists[t]
        # probe with the reversed order: a grouped conv reader takes only permutations inside its groups
        flexible[t] = (len(set(seq)) == len(seq)
                       and absorb_forward(view, t, np.arange(len(seq))[::-1], shapes, readers=readers) is not None)
    # source orders: channels grouped by the set of ends reading them, groups in end order
    usage = defaultdict(set)
    first_exact_pos = {}
    for ti, (t, _) in enumerate(ends):
        for pos, pair in enumerate(lists[t]):
            usage[pair].add(ti)
            if not flexible[t] and pair not in first_exact_pos:
                first_exact_pos[pair] = (ti, pos)
    order, newpos = {}, {}
    big = len(ends) + 1
    for s in sources:
        c = len(lists[s])
        if fixed_order[s]:
            order[s] = np.arange(c)
        else:
            def key(k, s=s):
                u = usage.get((s, k), ())
                return (min(u) if u else big, tuple(sorted(u)), first_exact_pos.get((s, k), (big, k)))
            order[s] = np.asarray(sorted(range(c), key=key), np.int64)
        newpos[s] = np.empty(c, np.int64)
        newpos[s][order[s]] = np.arange(c)
    src_rank = {s: i for i, s in enumerate(sources)}
    # each end as a sequence of (source, new position)
    seqs, modes = {}, {}
    for t, _ in ends:
        seq = [(s, int(newpos[s][k])) for s, k in lists[t]]
        if flexible[t]:
            seq = sorted(seq, key=lambda e: (src_rank[e[0]], e[1]))
        seqs[t] = seq
        modes[t] = "pieces" if flexible[t] or len(_runs(seq)) <= MAX_PIECES else "gather"
    cuts = {s: {0, len(lists[s])} for s in sources}
    for t, _ in ends:
        if modes[t] == "pieces":
            for s, a, b in _runs(seqs[t]):
                cuts[s].update((a, b))
    pieces = {s: sorted(cuts[s]) for s in sources}
    cost = sum(1 for s in sources if len(pieces[s]) > 2)
    for t, _ in ends:
        if modes[t] == "pieces":
            n_pieces = sum(sum(1 for p in pieces[s] if a <= p < b) for s, a, b in _runs(seqs[t]))
            cost += 1 if n_pieces > 1 else 0
        else:
            cost += 1 + (1 if len({s for s, _ in seqs[t]}) > 1 else 0)
    return SimpleNamespace(sources=sources, lists=lists, ends=ends, flexible=flexible, order=order, seqs=seqs,
                           modes=modes, pieces=pieces, cost=cost, fixed_order=fixed_order)


def _apply(view: GraphView, nodes, plan, shapes, model) -> bool:
    edits = []
    for s in plan.sources:
        if not plan.fixed_order[s] and not np.array_equal(plan.order[s], np.arange(len(plan.order[s]))):
            e = permute_backward(view, s, plan.order[s], shapes)
            if e is None:
                return False
            edits += e
    for t, readers in plan.ends:
        if plan.flexible[t]:
            old_pos = {pair: i for i, pair in enumerate(plan.lists[t])}
            g = np.asarray([old_pos[(s, int(plan.order[s][p]))] for s, p in plan.seqs[t]], np.int64)
            if not np.array_equal(g, np.arange(len(g))):
                e = absorb_forward(view, t, g, shapes, readers=readers)
                if e is None:
                    return False
                edits += e
    for e in edits:
        e()
    view.remove_nodes(nodes)
    view.refresh()
    new_opset = opset(model)
    # cut the sources
    piece_name = {}
    for s in plan.sources:
        bounds = plan.pieces[s]
        if len(bounds) == 2:
            piece_name[(s, 0)] = s
            continue
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        outs = [view.unique_name(f"{s}.part{k}") for k in range(len(sizes))]
        # reserve the names before the next unique_name call
        for o in outs:
            view.producer[o] = None
        if new_opset >= 13:
            add_node(view, "Split", [s, add_const(view, np.asarray(sizes, np.int64), f"{s}.split")], outs,
                     name=f"{s}.split", axis=1)
        else:
            add_node(view, "Split", [s], outs, name=f"{s}.split", axis=1, split=sizes)
        for k, o in enumerate(outs):
            piece_name[(s, bounds[k])] = o
    for t, readers in plan.ends:
        seq = plan.seqs[t]
        if plan.modes[t] == "pieces":
            names = []
            for s, a, b in _runs(seq):
                names += [piece_name[(s, p)] for p in plan.pieces[s] if a <= p < b]
            if len(names) == 1:
                for r in readers:
                    rename_input(r, t, names[0])
            else:
                add_node(view, "Concat", names, [t], name=f"{t}.concat", axis=1)
        else:
            used = []
            for s, _ in seq:
                if s not in used:
                    used.append(s)
            offset, off = {}, 0
            for s in used:
                offset[s] = off
                off += len(plan.lists[s])
            x = used[0]
            if len(used) > 1:
                x = view.unique_name(f"{t}.sources")
                view.producer[x] = None
                add_node(view, "Concat", used, [x], name=x, axis=1)
            idx = np.asarray([offset[s] + p for s, p in seq], np.int64)
            add_node(view, "Gather", [x, add_const(view, idx, f"{t}.indices")], [t], name=f"{t}.gather", axis=1)
    toposort(model)
    view.refresh()
    return True


def run(model: onnx.ModelProto) -> int:
    view = GraphView(model)
    if not any(n.op_type in ROUTING for n in model.graph.node):
        return 0
    shapes = static_shapes(model)
    specs = {}
    for n in model.graph.node:
        s = routing_spec(view, n, shapes)
        if s is not None:
            specs[id(n)] = s
    removed = 0
    for nodes in _regions(view, [n for n in model.graph.node if id(n) in specs]):
        view.refresh()
        plan = _plan(view, nodes, specs, shapes)
        if plan is None or plan.cost >= len(nodes):
            continue
        if not _apply(view, nodes, plan, shapes, model):
            continue
        removed += len(nodes) - plan.cost
        # node references of later regions are gone after toposort: plan again from scratch
        return removed + run(model)
    view.remove_unused_initializers()
    return removed
