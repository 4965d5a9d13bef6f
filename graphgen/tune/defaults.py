"""Default CPU schedules: every kernel gets a parallel, vectorized schedule without any search.

TVM 0.27 has no TOPI CPU schedules, so a kernel neither tuned nor scheduled by dlight is
lowered as a plain serial loop nest (measured 70-100x slower than onnxruntime). Here each
fused kernel is matched to a class and given a fixed schedule that uses what every SIMD CPU
rewards; the sizes come from the target's vector width and register count
(AVX2: 8 lanes, 16 registers; AVX-512: 16 lanes, 32; NEON: 4 lanes, 32 on aarch64, 16 on armv7):

* **conv2d** (regular, 1x1, strided, grouped with enough channels per group): the output tile
  is ``vk`` output channels (one or two vectors) x ``hb`` rows x ``wb`` columns, kept in
  registers across the whole reduction (input channels x kernel window): per step one vector
  load of weights, ``hb*wb`` broadcasts of input values and ``k*hb*wb`` FMAs. The tile is the
  one a small throughput model ranks first (FMA pipes, load ports, FMA latency, registers:
  :func:`_tile_throughput`), from perfect divisors of the output height and width, since odd
  widths - 13, 27, 55 - are common. The weights are repacked once at compile time
  into the order the loop reads them (``[oc/vk, ic, kh, kw, vk]``, MetaSchedule's RewriteLayout
  on the layout-free weight constants; folded into the library's constants). The fused tail
  (bias, ReLU/ReLU6, residual add) runs on each finished tile while it is in cache, vectorized
  along the output row. Parallel over (batch, channel blocks, row blocks).
* **depthwise conv** (and grouped convs with fewer channels per group than a vector) and
  **pooling**: vectorized along the output row (``wb`` columns, several rows), the kernel
  window as the reduction; parallel over (batch, channels, row blocks).
* **dense** (matmul + bias): vectorized over output features with repacked weights,
  parallel over feature blocks.
* **everything else** (concatenate, reshape, transpose/shuffle, elementwise, global mean):
  producers inlined, the output loop nest parallelized over its outer loops and its innermost
  loop vectorized.

A kernel that does not match its class's expectations keeps TVM's plain lowering; a schedule
that raises is recorded in the build's facts (``default_schedule_failures``), never fatal. A
class's schedule that raises anything but :class:`NotMatched` (a bug, not a kernel outside the
class) falls back to the generic schedule and is recorded too (``default_schedule_fallbacks``).

Every decision with alternatives (tile sizes, which loop nest) goes through :class:`Knobs`:
the default schedule takes the heuristic's pick, and tuning measures the others
(:mod:`graphgen.tune.knob_search`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass


_log = logging.getLogger("graphgen.tune")


@dataclass(frozen=True)
class Isa:
    name: str
    lanes: int  # fp32 lanes per vector register
    registers: int  # vector registers
    threads: int = 1  # threads the library will run (the target's num-cores): parallel loops cut for them

    @property
    def accumulators(self) -> int:
        """Vector accumulators a micro-kernel may keep live (the rest hold a weight vector or
        two and an input broadcast)."""
        return self.registers - 2

    @property
    def tile_limit(self) -> int:
        """Most accumulators a register tile is given. With 32 registers, LLVM spills tiles of
        more than 24: measured (Xeon, AVX-512, one thread) a direct conv's 2 vectors x 14
        positions (28 accumulators) ran 2.1x slower than 2 x 7 or 4 x 4 (128 -> 128 at 28x28:
        3.73 ms vs 1.79-1.81; ResNet-18's 64 -> 128 3x3/2: 1.42 vs 0.96)."""
        return min(self.accumulators - 2, 12 if self.registers <= 16 else 24)


def isa_of(target, threads: int | None = None) -> Isa:
    """The vector ISA of ``target``, scheduled for ``threads`` threads (default: the target's
    ``num-cores``, which the tuner's targets carry, else one)."""
    import dataclasses

    if threads is None:
        cores = target.attrs.get("num-cores") if target.attrs else None
        threads = int(cores) if cores is not None else 1
    return dataclasses.replace(_vector_isa(target), threads=max(1, int(threads)))


def _vector_isa(target) -> Isa:
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", "")) if target.attrs else ""
    try:
        if triple.startswith("aarch64"):
            return Isa("neon", 4, 32)
        if triple.startswith("arm"):
            return Isa("neon32", 4, 16)
        if codegen.target_has_features("avx512f", target):
            return Isa("avx512", 16, 32)
        if codegen.target_has_features("avx2", target) or codegen.target_has_features("avx", target):
            return Isa("avx2", 8, 16)
    except Exception:  # noqa: BLE001 - an unknown CPU still gets SSE-sized schedules
        pass
    return Isa("sse", 4, 16)


class NotMatched(Exception):
    """The kernel is not of the shape this schedule expects."""


#: options a knob offers the tuner at most (the heuristic's best first)
KNOB_OPTIONS = 6


class Knobs:
    """The decisions a default schedule makes (tile sizes, which loop nest), each from a list of
    options ranked by the schedule's cost heuristic, best first.

    ``choices`` maps a knob's name to the index of the option to take; a knob not in it takes
    option 0, the heuristic's pick, so ``Knobs()`` is the default schedule. ``seen`` records
    each knob the schedule met and how many options it had: the tuner measures the
    alternatives (:func:`variants`) instead of trusting the heuristic, which is a model of the
    machine, not a measurement of it.
    """

    def __init__(self, choices: dict[str, int] | None = None, *, others: int = 0):
        self.choices = dict(choices or {})
        self.others = others  # the option a knob not in ``choices`` takes (tests: every option)
        self.seen: dict[str, int] = {}

    def pick(self, name: str, options: list):
        if not options:
            raise NotMatched(f"no option for {name}")
        options = options[:KNOB_OPTIONS]
        self.seen[name] = len(options)
        if name in self.choices:
            i = self.choices[name]
            return options[i] if 0 <= i < len(options) else options[0]
        return options[min(self.others, len(options) - 1)]


def _ranked(options: list, key) -> list:
    """``options`` best first by ``key`` (ties: the order given), duplicates dropped."""
    out = []
    for o in sorted(options, key=key, reverse=True):
        if o not in out:
            out.append(o)
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in _divisors(n) if d <= max(1, limit))


def _elements(buf) -> int:
    """Elements of a buffer of static shape."""
    n = 1
    for d in buf.shape:
        n *= _int(d)
    return n


def _int(x) -> int:
    try:
        return int(x)
    except TypeError as e:  # a symbolic extent: dynamic shapes get TVM's plain lowering
        raise NotMatched("dynamic shape") from e


def _vector_ok(n: int, lanes: int) -> bool:
    """Vector lengths LLVM handles well: whole registers, or 4/8-lane pieces of one.

    Measured on AVX2: a 1x1 conv vectorized over 28 columns (<28 x float>) ran at 3.6
    GFLOP/s, over 4 columns at 27; a <11 x float> max pool 1.3x slower than scalar code.
    """
    if n % lanes == 0:
        return True
    return 4 <= n < lanes and n & (n - 1) == 0


def _buf(region):
    """The buffer of a block's read/write region (``TensorRegion.source`` in TVM 0.27)."""
    b = getattr(region, "buffer", None)
    return b if b is not None else region.source


# -- kernel anatomy ---------------------------------------------------------------------------

def _blocks(sch):
    try:
        root = sch.get_sblock("root")
    except Exception as e:  # noqa: BLE001 - no block structure (an extern call): nothing to schedule
        raise NotMatched("no root block") from e
    return [b for b in sch.get_child_blocks(root)]


def _iter_kinds(sch, block) -> str:
    st = sch.get(block)
    return "".join("S" if iv.iter_type == 0 else "R" if iv.iter_type == 2 else "?" for iv in st.iter_vars)


def _output_blocks(sch) -> list:
    try:
        return list(sch.get_output_blocks(sch.get_sblock("root")))
    except Exception as e:  # noqa: BLE001
        raise NotMatched("no root block") from e


def _writes_output(sch, block, outputs) -> bool:
    return any(sch.get(o).same_as(sch.get(block)) for o in outputs)


def _same(sch, a, b) -> bool:
    return sch.get(a).same_as(sch.get(b))


def _inline_tail(sch, main, outputs):
    """Inline every spatial block after ``main`` except the one writing the function's output.

    Returns that output block, or None when ``main`` writes the output itself.
    """
    tail = None
    for b in _blocks(sch):
        if not _same(sch, b, main) and _writes_output(sch, b, outputs):
            tail = b
    for b in _blocks(sch):
        if _same(sch, b, main) or (tail is not None and _same(sch, b, tail)) or _is_producer_of(sch, b, main):
            continue
        if "R" in _iter_kinds(sch, b):
            raise NotMatched("a second reduction in the kernel")
        sch.compute_inline(b)
    return tail


def _is_producer_of(sch, b, main) -> bool:
    for p in sch.get_producers(main):
        if sch.get(p).same_as(sch.get(b)):
            return True
    return False


def _schedule_pad(sch, main, isa):
    """Padding producers of ``main``: inlined when they pad nothing (TOPI copies the input even
    for padding 0), else their own parallel, vectorized pass over the input."""
    for p in sch.get_producers(main):
        if "R" in _iter_kinds(sch, p):
            continue
        st = sch.get(p)
        out_shape = [_int(x) for x in _buf(st.writes[0]).shape]
        in_shapes = [[_int(x) for x in _buf(r).shape] for r in st.reads]
        if in_shapes and all(sh == out_shape for sh in in_shapes):
            sch.compute_inline(p)
        else:
            _parallel_vectorize(sch, p, isa)


#: parallel loops get at least this many iterations (when the loop nest has them); the
#: loops inside stay plain loops, so the innermost index needs no division per element
PARALLEL_GRAIN = 64


#: loop nests with fewer iterations than this (elements of a copy or an elementwise pass) stay
#: on one thread: handing work to another thread and waiting for it costs 2.2 us per parallel
#: loop on this 2-core host (an empty 2-way parallel loop; 4 us while the host is busy), about
#: what one thread needs for 32K elements of a copy. ShuffleNetV2 ran 226 parallel loops per
#: inference, most of them its channel splits and shuffles of 10-90K elements; 87 with this.
PARALLEL_MIN_ITERATIONS = 32768


def _worth_sharing(sch, loops) -> bool:
    """Whether a loop nest has enough iterations to be run by more than one thread."""
    n = 1
    for lp in loops:
        n *= _int(sch.get(lp).extent)
    return n >= PARALLEL_MIN_ITERATIONS


def _copy_parallel(sch, block, loop) -> None:
    """``loop`` (of ``block``, a copy) parallel when the copy is big enough to share."""
    if _worth_sharing(sch, sch.get_loops(block)):
        sch.parallel(loop)


def _parallel_vectorize(sch, block, isa, min_parallel: int = 2):
    """Outer spatial loops fused and parallel (just enough of them for PARALLEL_GRAIN
    iterations), the innermost loop vectorized when it is spatial and a whole vector.

    Fusing the whole nest into one parallel loop costs a division and a modulo per element
    and dimension: measured 1.2 ms instead of 0.1 ms for a 58x58x58 padding copy.
    """
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    if not loops:
        return
    if len(loops) != len(kinds):
        raise NotMatched("loops do not map to block iterators")
    n_spatial = len(kinds) - len(kinds.lstrip("S"))
    if n_spatial == 0:
        return
    loops = list(loops)
    shared = _worth_sharing(sch, loops)
    inner = None
    if n_spatial == len(kinds):
        ext = _int(sch.get(loops[-1]).extent)
        ok = [d for d in _divisors(ext) if d <= 4 * isa.lanes and _vector_ok(d, isa.lanes)]
        v = max(ok) if ok else 1
        if v >= 2:
            o, inner = sch.split(loops[-1], factors=[None, v])
            loops[-1] = o
    outer = loops[:n_spatial]
    if not shared:
        # too little work to share: one thread does it sooner than it can hand half to another
        if inner is not None:
            sch.vectorize(inner)
        return
    take, prod = [], 1
    for lp in outer[:-1] if len(outer) > 1 else outer:
        take.append(lp)
        prod *= _int(sch.get(lp).extent)
        if prod >= PARALLEL_GRAIN:
            break
    fused = sch.fuse(*take) if len(take) > 1 else take[0]
    if _int(sch.get(fused).extent) >= min_parallel:
        sch.parallel(fused)
    if inner is not None:
        sch.vectorize(inner)


def _image_vectorize(sch, block, isa, split_at: int | None = None) -> None:
    """An elementwise NCHW pass (a crop and its fused tail) vectorized over each image.

    When its rows are whole vectors this is :func:`_parallel_vectorize`. Otherwise a row is
    no vector (14 or 7 columns), so the image is one axis of ``H * W`` positions, contiguous in
    memory, cut into a part of whole vectors and a remainder (``loop_partition``).
    Measured (AVX-512, one thread): the crop of ShuffleNetV2's 116 -> 116 GEMM at 14x14
    took 0.024 ms of the kernel's 0.078 scalar, 0.002 so. ``split_at`` (a multiple of the
    vector) cuts there instead, and the remainder stays scalar: it reads a channels-last
    buffer (the pointwise GEMM's positions computed apart).
    """
    loops = sch.get_loops(block)
    lanes = isa.lanes
    if split_at is None and (len(loops) != 4 or _iter_kinds(sch, block) != "SSSS"
                             or _int(sch.get(loops[3]).extent) % lanes == 0):
        _parallel_vectorize(sch, block, isa)
        return
    ln, lk, ly, lx = loops
    positions = _int(sch.get(ly).extent) * _int(sch.get(lx).extent)
    whole = positions // lanes * lanes if split_at is None else split_at
    shared = _worth_sharing(sch, loops)
    if shared:
        outer = sch.fuse(ln, lk)
        if _int(sch.get(outer).extent) >= 2:
            sch.parallel(outer)
    p = sch.fuse(ly, lx)
    if whole == 0:
        return
    if whole == positions:
        _, inner = sch.split(p, factors=[None, lanes])
        sch.vectorize(inner)
        return
    head, rest = sch.loop_partition(p, [whole, None])
    _, inner = sch.split(head, factors=[None, lanes])
    sch.vectorize(inner)
    if split_at is None and _vector_ok(positions - whole, lanes):
        sch.vectorize(rest)


# -- conv2d, channel-vectorized ---------------------------------------------------------------

def _conv_shapes(sch, conv):
    """(out shape N,C,H,W; weight buffer; data channels; stride) of a TOPI NCHW conv block."""
    st = sch.get(conv)
    if _iter_kinds(sch, conv) != "SSSSRRR":
        raise NotMatched("not an NCHW conv (SSSSRRR)")
    out = _buf(st.writes[0])
    if len(out.shape) != 4:
        raise NotMatched("conv output is not 4-D")
    reads = [_buf(r) for r in st.reads if not _buf(r).same_as(out)]
    if len(reads) != 2 or any(len(b.shape) != 4 for b in reads):
        raise NotMatched("conv does not read exactly a 4-D input and a 4-D weight")
    data, weight = reads  # TOPI's order: data (or its padded copy), then weight
    return [_int(x) for x in out.shape], weight, data


def _channel_blocks(per_group_out: int, isa: Isa) -> list[tuple[int, int, float]]:
    """Candidate output-channel vector blocks (vk, vector registers per block, lane efficiency).

    Multiples of the vector width when the channel count allows, else of 4 lanes (half an
    AVX2 register) when at least half the lanes are busy.
    """
    out = []
    for vk in _divisors(per_group_out):
        # whole 4-lane groups only: an odd vector (<29 x float>) measured 3 GFLOP/s, since
        # LLVM then keeps the accumulators in memory
        if not _vector_ok(vk, isa.lanes) or vk > 4 * isa.lanes:
            continue
        k = -(-vk // isa.lanes)
        eff = vk / (k * isa.lanes)
        if eff >= 0.5:
            out.append((vk, k, eff))
    return out


#: FMA latency in cycles x FMA pipes: a micro-kernel needs this many independent accumulators
#: to keep the pipes busy (Zen 3 / Skylake: 4 x 2; Cortex-A7x: 4 x 2)
FMA_CHAINS = 8

#: stride-1 depthwise convs (on rows) at least this wide, or with windows 5 wide and more, copy
#: each channel block's padded input inside the parallel loop, just before its rows read it,
#: instead of the whole padded input first: the copy then stays in the cache. Measured (Xeon,
#: AVX-512, conv + bias + ReLU alone, us, whole copy first -> per block; one thread, two):
#: 144 x 56 x 56 270 -> 162, 111 -> 71; 32 x 112 x 112 234 -> 135, 83 -> 60; 192 x 28 x 28 60 ->
#: 42, 28 -> 22; 116 x 28 x 28 34 -> 24, 18.5 -> 15.5; 5x5 480 x 14 x 14 83 -> 70, 44 -> 38. But
#: 3x3 at 14 x 14 slower: 384 channels 28.5 -> 36, 18 -> 19; 232 at two threads 12 -> 17.5
DEPTHWISE_COPY_PER_BLOCK_MIN_WIDTH = 28

#: tiles of several output rows measured slower than one-row tiles of the same size in 6 of 7
#: cases (AVX2: ResNet-18's strided 3x3 convs, SqueezeNet's 3x3/2 stem: up to 1.7x)
MULTI_ROW_PENALTY = 0.8


def _tile_throughput(k: int, positions: int, eff: float) -> float:
    """Estimated share of peak FMA throughput of a register tile of ``k`` weight vectors x
    ``positions`` broadcast inputs: per reduction step ``k * positions`` FMAs on two pipes,
    ``k + positions`` vector loads on two load ports, and a latency floor when there are fewer
    than FMA_CHAINS accumulators; times the share of lanes doing useful work."""
    acc = k * positions
    cycles = max(acc / 2, (k + positions) / 2, FMA_CHAINS / 2)
    return acc / 2 / cycles * eff


def _conv_channel_vectorized(sch, conv, tail, isa, per_group_out: int, dims, knobs: Knobs):
    n, c, h, w = dims
    options = []
    for vk, k, eff in _channel_blocks(per_group_out, isa):
        for hb in _divisors(h):
            for wb in _divisors(w):
                acc = k * hb * wb
                # registers: the accumulators, k weight vectors, a broadcast and one spare
                # (measured: 8 lanes x 14 positions, 16 of 16 AVX2 registers, ran 1.75-2.3x
                # slower than 16 lanes x 4 on ResNet's 7x7/2 stem and 64 -> 128 3x3/2 conv)
                if acc + k + 2 <= isa.registers and acc <= isa.tile_limit and hb * wb <= 28:
                    score = _tile_throughput(k, hb * wb, eff) * (MULTI_ROW_PENALTY if hb > 1 else 1.0)
                    options.append((round(score, 3), acc, k == 2, vk, wb, hb))
    if not options:
        raise NotMatched("output channels per group do not split into vectors")
    # best estimated throughput; then more accumulators; then two vectors of channels (ResNet's
    # 64 -> 128 3x3/2: 16 x 4 positions 1.38 ms, 32 x 2 1.74, AVX2), wider blocks, more columns
    vk, wb, hb = knobs.pick("conv.tile", _ranked(options, key=lambda o: o))[3:]
    loops = sch.get_loops(conv)
    ln, lc, lh, lw, lrc, lry, lrx = loops
    c_o, c_i = sch.split(lc, factors=[None, vk])
    h_o, h_i = sch.split(lh, factors=[None, hb])
    w_o, w_i = sch.split(lw, factors=[None, wb])
    outer = (ln, c_o, h_o)
    data, weight = (_buf(r) for r in sch.get(conv).reads[:2])
    if per_group_out == c and _elements(data) > _elements(weight) and \
            position_chunks(_int(sch.get(h_o).extent), isa.threads) % isa.threads == 0:
        # rows cut for the threads, as a pointwise GEMM's positions (_channels_outside), where
        # the input outweighs the weights (each thread then reads all the weights, but only its
        # own rows of the input) and the rows split evenly (ResNet-18's 3x3/2 convs at 7x7 and
        # 14x14, and its 512 -> 512 convs at 7x7 with 9.4 MB of weights, would each re-read all
        # their weights per row otherwise). Measured (Xeon, AVX-512, two threads, in the model):
        # ResNet-18's 64 -> 128 3x3/2 at 56x56 530 -> 445 us (one thread 828)
        outer = _channels_outside(sch, ln, c_o, h_o, isa)
    sch.reorder(*outer, w_o, lrc, lry, lrx, h_i, w_i, c_i)
    return (*outer, w_o), (lrc, lry, lrx), (h_i, w_i, c_i), {"vk": vk, "hb": hb, "wb": wb}


def _conv_width_vectorized(sch, conv, tail, isa, dims, strided: bool, knobs: Knobs, channel_choices=(1,)):
    """Vectorized along the output row: a tile of ``cb`` output channels x ``hb`` rows x
    ``wb`` columns per step of the reduction (``cb`` weights broadcast, ``hb`` row vectors of
    input loaded once and used for every channel of the block). Depthwise convs have
    ``cb = 1``; regular convs whose channel count splits into no whole vector (ShuffleNet's
    58 and 116) block a few channels. Strided windows: scalar and unrolled (vector lanes would
    be gathered one by one)."""
    n, c, h, w = dims
    lanes = isa.lanes
    if not any(_vector_ok(d, lanes) for d in _divisors(w)):
        strided = True  # no row piece makes a whole vector: scalar code, as for strided windows
    if strided:
        wb = knobs.pick("conv.row_piece", sorted((d for d in _divisors(w) if d <= 12), reverse=True))
        hb, cb = 1, 1
    else:
        options = []
        for cb in channel_choices:
            for wb in _divisors(w):
                if wb > 8 * lanes or not _vector_ok(wb, lanes):
                    continue
                vecs = -(-wb // lanes)
                eff = wb / (vecs * lanes)
                for hb in _divisors(h):
                    acc = cb * vecs * hb
                    if acc <= isa.accumulators - 2:
                        options.append((acc * eff, cb, wb, hb))
        _, cb, wb, hb = knobs.pick("conv.row_tile", _ranked(options, key=lambda o: (o[0], o[2], o[1])))
    loops = sch.get_loops(conv)
    kinds = _iter_kinds(sch, conv)
    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    red = [lp for lp, k in zip(loops, kinds) if k == "R"]
    ln, lc, lh, lw = spatial
    c_o, c_i = sch.split(lc, factors=[None, cb])
    h_o, h_i = sch.split(lh, factors=[None, hb])
    w_o, w_i = sch.split(lw, factors=[None, wb])
    sch.reorder(ln, c_o, h_o, w_o, *red, c_i, h_i, w_i)
    return (ln, c_o, h_o, w_o), tuple(red), (c_i, h_i, w_i), {"cb": cb, "hb": hb, "wb": wb}


def _finish_tiled(sch, main, tail, outer, red, inner, isa, outputs, vector_loop, channels_last: bool = False,
                  parallel_loops: int | None = None):
    """Accumulate the tile locally, run the tail on it, parallelize, vectorize, unroll.

    ``channels_last``: the accumulator is vectorized over output channels, so its buffer is
    laid out channels-innermost (NCHW would put a vector's lanes a whole plane apart, and
    every FMA would gather and scatter).
    """
    tile_loop = outer[-1]
    if tail is None:
        # main writes the function output: accumulate in a tile (global scope: under 1 KB TVM
        # puts it on the stack; a "local" buffer is a workspace call per parallel iteration)
        tail = sch.cache_write(main, 0, "global")
    if channels_last:
        sch.transform_layout(main, ("write", 0), lambda n, c, h, w: (n, h, w, c))
    sch.reverse_compute_at(tail, tile_loop, preserve_unit_loops=True)
    # tail loops under the tile: vectorize the innermost (along the output row), unroll the rest
    tl = sch.get_loops(tail)
    t_inner = list(tl[len(outer):])
    if t_inner:
        ext = _int(sch.get(t_inner[-1]).extent)
        if _vector_ok(ext, isa.lanes):
            sch.vectorize(t_inner[-1])
        elif channels_last and len(t_inner) >= 2 and _vector_ok(_int(sch.get(t_inner[-3 if len(t_inner) >= 3 else 0]).extent), isa.lanes):
            # the tile's channels make whole vectors, its row piece does not: channels innermost
            c_loop = t_inner[-3] if len(t_inner) >= 3 else t_inner[0]
            rest = [lp for lp in t_inner if not lp.same_as(c_loop)]
            sch.reorder(*rest, c_loop)
            sch.vectorize(c_loop)
        else:
            for lp in t_inner:
                if _int(sch.get(lp).extent) <= 32:
                    sch.unroll(lp)
    # parallel over every tile loop but the innermost (which holds the tail), or over the
    # single tile loop itself
    k = parallel_loops or (len(outer) - 1 if len(outer) > 2 else 1)
    par = sch.fuse(*outer[:k]) if k > 1 else outer[0]
    if _int(sch.get(par).extent) >= 2:
        sch.parallel(par)
    # loop kinds first: after decompose_reduction the update block is no longer a reduction
    # block and vectorize/unroll would refuse its loops
    if vector_loop is not None:
        sch.vectorize(vector_loop)
    for lp in (inner[:-1] if vector_loop is not None else inner):
        sch.unroll(lp)
    init = sch.decompose_reduction(main, red[0])
    il = sch.get_loops(init)
    _vectorize_unroll_tail(sch, il[len(outer) - 1:])


def _vector_tile(sch, loops, lanes: int | None = None) -> None:
    """A register tile's loops: the innermost vectorized (``lanes`` at a time when given: a
    row of several vectors as unrolled single vectors), the others unrolled."""
    if lanes is not None and _int(sch.get(loops[-1]).extent) > lanes:
        *loops, last = loops
        loops = [*loops, *sch.split(last, factors=[None, lanes])]
    sch.vectorize(loops[-1])
    for lp in loops[:-1]:
        sch.unroll(lp)


def _vectorize_unroll_tail(sch, loops) -> None:
    """Serial loops of the init block (copied from the tile loops): innermost vectorized, others unrolled."""
    loops = [lp for lp in loops if int(sch.get(lp).kind) == 0]  # 0: serial
    if not loops:
        return
    try:
        sch.vectorize(loops[-1])
    except Exception:  # noqa: BLE001 - the init is a cheap fill; scalar is fine
        return
    for lp in loops[:-1]:
        try:
            sch.unroll(lp)
        except Exception:  # noqa: BLE001
            pass


def _depthwise_channel_blocked(sch, main, tail, isa, dims, outputs, knobs: Knobs) -> bool:
    """Depthwise conv vectorized over channels: the padding copy the kernel makes anyway writes
    the input channel-blocked (``[c/vk, h, w, vk]``), so every window tap is one contiguous
    vector load for any width and stride (NCHW rows of 7 or 14, or stride 2, give no whole
    row vector: scalar code ran at 6-10 GFLOP/s on MobileNetV2's depthwise layers).
    Returns False (nothing changed) when there is no padding copy or no whole channel block.
    """
    n, c, h, w = dims
    blocks = [b for b in _channel_blocks(c, isa) if b[1] == 1]  # one vector (or half) per block
    pads = [p for p in sch.get_producers(main) if "R" not in _iter_kinds(sch, p)]
    if not blocks or len(pads) != 1 or len(sch.get_loops(pads[0])) != 4:
        return False
    vk = knobs.pick("depthwise.channels", _ranked([b[0] for b in blocks], key=lambda v: v))
    pad = pads[0]
    # the padded copy in its own parallel pass over the whole input, or per channel block right
    # before the block's conv while it is in cache: a knob for tuning. Measured alone (AVX2, one
    # thread, conv + ReLU), per block was faster at stride 2 (MobileNetV2's 96 @ 112: 0.36 ms
    # vs 0.39; 576 @ 14: 0.037 vs 0.061) and slower at stride 1 (144 @ 56: 0.36 vs 0.28), but
    # MobileNetV2 as a whole with it at stride 2 was no faster (11.4 ms vs 10.8, noisy host)
    per_block = knobs.pick("depthwise.pad", ["pass", "block"]) == "block"
    sch.transform_layout(pad, ("write", 0), lambda n_, c_, h_, w_: (n_, c_ // vk, h_, w_, c_ % vk))
    if not per_block:
        pn, pc, ph, pw = sch.get_loops(pad)
        pc_o, pc_i = sch.split(pc, factors=[None, vk])
        sch.reorder(pn, pc_o, ph, pw, pc_i)
        _copy_parallel(sch, pad, sch.fuse(pn, pc_o, ph))
        sch.vectorize(pc_i)
    tiles = []
    for wb in sorted((d for d in _divisors(w) if d <= min(12, isa.accumulators - 1)), reverse=True):
        hb = _largest_divisor_at_most(h, max(1, (isa.accumulators - 1) // wb)) if wb < 6 else 1
        tiles.append((wb, hb))
    wb, hb = knobs.pick("depthwise.tile", tiles)
    ln, lc, lh, lw, lrc, lry, lrx = sch.get_loops(main)
    c_o, c_i = sch.split(lc, factors=[None, vk])
    h_o, h_i = sch.split(lh, factors=[None, hb])
    w_o, w_i = sch.split(lw, factors=[None, wb])
    sch.reorder(ln, c_o, h_o, w_o, lrc, lry, lrx, h_i, w_i, c_i)
    if not per_block:
        _finish_tiled(sch, main, tail, (ln, c_o, h_o, w_o), (lrc, lry, lrx), (h_i, w_i, c_i), isa, outputs, c_i,
                      channels_last=True)
        return True
    nc = sch.fuse(ln, c_o)
    _finish_tiled(sch, main, tail, (nc, h_o, w_o), (lrc, lry, lrx), (h_i, w_i, c_i), isa, outputs, c_i,
                  channels_last=True, parallel_loops=1)
    sch.compute_at(pad, nc)
    pl = list(sch.get_loops(pad)[1:])
    lanes = next(lp for lp in pl if _int(sch.get(lp).extent) == vk)
    sch.reorder(*[lp for lp in pl if not lp.same_as(lanes)], lanes)
    sch.vectorize(lanes)
    return True


def schedule_conv(sch, main, isa, outputs, knobs: Knobs):
    dims, weight, data = _conv_shapes(sch, main)
    n, c, h, w = dims
    in_channels = _int(data.shape[1])
    w_in_per_group = _int(weight.shape[1])
    groups = max(1, in_channels // max(1, w_in_per_group))
    per_group_out = c // groups
    strided = _stride_w(sch, main, w) > 1
    tail = _inline_tail(sch, main, outputs)
    if w_in_per_group == 1 and per_group_out == 1 and _depthwise_channel_blocked(sch, main, tail, isa, dims, outputs, knobs):
        return "depthwise conv2d (channel-blocked)"
    _schedule_pad(sch, main, isa)
    blocks = _channel_blocks(per_group_out, isa) if w_in_per_group > 1 else []
    full = [b for b in blocks if b[2] == 1.0]
    row_ok = not strided and any(_vector_ok(d, isa.lanes) for d in _divisors(w))
    nests = (["channels"] if full or (blocks and not row_ok) else []) + (["rows"] if row_ok else [])
    if blocks and "channels" not in nests:
        nests.append("channels")
    nest = knobs.pick("conv.nest", nests) if nests else "rows"
    if nest == "channels":
        outer, red, inner, facts = _conv_channel_vectorized(sch, main, tail, isa, per_group_out, dims, knobs)
        _finish_tiled(sch, main, tail, outer, red, inner, isa, outputs, inner[-1], channels_last=True)
        return "conv2d" if groups == 1 else "grouped conv2d"
    choices = [d for d in _divisors(per_group_out) if d <= 8] if w_in_per_group > 1 else [1]
    outer, red, inner, facts = _conv_width_vectorized(sch, main, tail, isa, dims, strided, knobs, choices)
    strided = strided or not _vector_ok(facts["wb"], isa.lanes)
    _finish_tiled(sch, main, tail, outer, red, inner, isa, outputs, None if strided else inner[-1])
    kind = "depthwise conv2d" if w_in_per_group == 1 else "conv2d (row-vectorized)"
    return kind + (" (strided)" if strided else "")


# -- pooling ----------------------------------------------------------------------------------

def schedule_pool(sch, main, isa, outputs, knobs: Knobs):
    if _iter_kinds(sch, main) != "SSSSRR":
        raise NotMatched("not an NCHW pool")
    out = _buf(sch.get(main).writes[0])
    dims = [_int(x) for x in out.shape]
    n, c, h, w = dims
    strided = _stride_w(sch, main, w) > 1
    tail = _inline_tail(sch, main, outputs)
    for p in sch.get_producers(main):  # padding: read through a select in the loop
        if "R" not in _iter_kinds(sch, p):
            sch.compute_inline(p)
    ln, lc, lh, lw, r0, r1 = sch.get_loops(main)
    if strided:
        # strided windows: a vector of outputs reads every other input, which LLVM assembles
        # lane by lane; scalar code unrolled over a short row piece measured 3.9x faster
        # (SqueezeNet's 3x3/2 max pool on 64x111x111: 0.30 ms vs 1.16 ms, AVX2)
        wb = _largest_divisor_at_most(w, 12)
        h_o, h_i = sch.split(lh, factors=[None, 1])
        w_o, w_i = sch.split(lw, factors=[None, wb])
        sch.reorder(ln, lc, h_o, w_o, r0, r1, h_i, w_i)
        _finish_tiled(sch, main, tail, (ln, lc, h_o, w_o), (r0, r1), (h_i, w_i), isa, outputs, None)
        return "pool (strided)"
    options = []
    for wb in _divisors(w):
        if wb > 8 * isa.lanes or not _vector_ok(wb, isa.lanes):
            continue
        for hb in _divisors(h):
            acc = -(-wb // isa.lanes) * hb
            if acc <= isa.accumulators // 2:
                options.append((acc, wb, hb))
    if not options:  # no whole-vector row piece: scalar, unrolled
        wb = _largest_divisor_at_most(w, 12)
        h_o, h_i = sch.split(lh, factors=[None, 1])
        w_o, w_i = sch.split(lw, factors=[None, wb])
        sch.reorder(ln, lc, h_o, w_o, r0, r1, h_i, w_i)
        _finish_tiled(sch, main, tail, (ln, lc, h_o, w_o), (r0, r1), (h_i, w_i), isa, outputs, None)
        return "pool (scalar)"
    acc, wb, hb = max(options, key=lambda o: (o[0], o[1]))
    h_o, h_i = sch.split(lh, factors=[None, hb])
    w_o, w_i = sch.split(lw, factors=[None, wb])
    sch.reorder(ln, lc, h_o, w_o, r0, r1, h_i, w_i)
    _finish_tiled(sch, main, tail, (ln, lc, h_o, w_o), (r0, r1), (h_i, w_i), isa, outputs, w_i)
    return "pool"


def _stride_w(sch, main, w_out: int) -> int:
    """Horizontal stride of a window op, from its (padded) input width, window and output width."""
    st = sch.get(main)
    out = _buf(st.writes[0])
    ins = [_buf(r) for r in st.reads if not _buf(r).same_as(out) and len(_buf(r).shape) == 4]
    if not ins or w_out <= 1:
        return 1
    loops = sch.get_loops(main)
    k = _int(sch.get(loops[-1]).extent)
    w_in = _int(ins[0].shape[3])
    return max(1, (w_in - k) // (w_out - 1))


# -- dense ------------------------------------------------------------------------------------

def schedule_dense(sch, main, isa, outputs, knobs: Knobs):
    kinds = _iter_kinds(sch, main)
    if kinds != "SSR":
        raise NotMatched("not a 2-D matmul")
    out = _buf(sch.get(main).writes[0])
    m, n = (_int(x) for x in out.shape)
    tail = _inline_tail(sch, main, outputs)
    # several vectors of output features per block: independent accumulators for the FMA
    # pipeline (1000 classes = 5 x 8 lanes on AVX2); keep blocks for every core
    # a matrix-vector product at batch 1 streams the weights once: memory-bound, so one or
    # two vectors per block (measured 0.30 ms at 8 lanes vs 0.40 ms at 40 for 1024x1000)
    options = [j * isa.lanes for j in (2, 1, 4) if n % (j * isa.lanes) == 0 and (n // (j * isa.lanes) >= 4 or j == 1)]
    if not options:
        blocks = _channel_blocks(n, isa)
        if not blocks:
            raise NotMatched("output features do not split into vectors")
        options = [b[0] for b in _ranked(blocks, key=lambda b: (b[2], b[0]))]
    vk = knobs.pick("dense.features", options)
    # vectors of a block: each its own accumulator, so several FMA chains run at once. One
    # vector alone is a chain as long as the input: 1280 dependent FMAs per 8 classes,
    # latency-bound (MobileNetV2's classifier: 0.15 ms against onnxruntime's 0.10, Zen 5)
    chains = knobs.pick("dense.chains", _dense_chains(m, n // vk, -(-vk // isa.lanes)))
    lm, ln, lk = sch.get_loops(main)
    n_o, n_i = sch.split(ln, factors=[None, vk])
    if chains > 1:
        n_o, n_c = sch.split(n_o, factors=[None, chains])
        sch.reorder(lm, n_o, lk, n_c, n_i)
        inner = (n_c, n_i)
    else:
        sch.reorder(lm, n_o, lk, n_i)
        inner = (n_i,)
    tile = sch.fuse(lm, n_o)
    _finish_tiled(sch, main, tail, (tile,), (lk,), inner, isa, outputs, n_i)
    return "dense"


def _dense_chains(rows: int, blocks: int, regs: int) -> list[int]:
    """Blocks of output features per dense tile (each block ``regs`` vector registers), best
    first: as many independent accumulators as FMA_CHAINS allows at batch 1, while at least 4
    tiles are left for the cores; batches get their chains from the rows."""
    fits = [u for u in _divisors(blocks) if u * regs <= FMA_CHAINS and blocks // u >= 4]
    if rows > 1 or not fits:
        return [1] + [u for u in fits if u > 1][-1:]
    return _ranked(fits, key=lambda u: u)


def _register_tiled_gemm(sch, gemm, outer, red, unrolled, vector, lanes: int | None = None,
                         loops_above: int = 0, parallel: bool = True) -> None:
    """A GEMM block whose loops are already ordered ``outer..., red, unrolled, vector`` (under
    ``loops_above`` loops of an enclosing stage): the tile accumulated in registers across
    ``red`` and written back under ``outer[-1]``; the ``outer`` loops fused and parallel.

    ``parallel=False`` leaves the parallel loop and the reduction's init to the caller, whose
    parallel loop lies above the GEMM: TVM checks a loop's dataflow on the reduction block, so
    the caller must set it before calling ``decompose_reduction(gemm, red)`` itself.

    The tile buffer has "global" scope: TVM 0.27 puts only global-scope buffers under 1 KB on
    the stack; a "local" one is a TVMBackendAllocWorkspace call per parallel iteration
    (measured: half the Winograd GEMM's time).
    """
    acc = sch.cache_write(gemm, 0, "global")
    sch.reverse_compute_at(acc, outer[-1], preserve_unit_loops=True)
    _vector_tile(sch, sch.get_loops(acc)[loops_above + len(outer):], lanes)
    if parallel:
        sch.parallel(sch.fuse(*outer))
    sch.vectorize(vector)
    for lp in unrolled if isinstance(unrolled, tuple) else (unrolled,):
        sch.unroll(lp)
    if parallel:
        init = sch.decompose_reduction(gemm, red)
        _vectorize_unroll_tail(sch, sch.get_loops(init)[1:])


# -- 1x1 conv as a GEMM over the flattened image (graphgen.tune.pointwise) --------------------

def _fused_pointwise_tiles(tiles: list, lanes: int) -> list:
    """The (vectors, channels) register tiles a pointwise GEMM computed inside its output rows
    may take, best first: tiles of 2-4 vectors in the GEMM's own order, then (AVX-512 only:
    16 positions, a 64-byte line of each output row) one-vector tiles of about FMA_CHAINS
    channels. One 8-lane AVX2 vector per tile ran slower than two passes (see the caller).
    Measured (AVX-512, one thread, MobileNetV2's 16 -> 96 at 112x112, conv + ReLU): one
    vector x 8 channels 0.36 ms, x 6 or 12 0.41, x 16 1.18, x 24 1.24; two passes (the only
    choice before: 112 columns hold no two-vector tile) 1.07-1.15; onnxruntime 0.49.
    MobileNetV2 as a whole, interleaved: 10.00 -> 9.35 ms at one thread, 6.26 -> 5.76 at two.
    """
    multi = [t for t in tiles if t[0] > 1]
    single = [t for t in tiles if t[0] == 1 and lanes >= 16]
    single.sort(key=lambda t: (t[1] < FMA_CHAINS - 2 or t[1] > FMA_CHAINS + 4, abs(t[1] - FMA_CHAINS)))
    return multi + single


#: input (bytes per image) from which a pointwise GEMM that narrows the channels runs with its
#: positions outside: about an L2 cache, past which channels outside re-reads it from L3
POSITIONS_OUTSIDE_MIN_INPUT = 1 << 20


def pointwise_orders(c_in: int, k_out: int, positions: int) -> list[str]:
    """The pointwise GEMM's loop orders, best first. Channels outside (each thread writes its
    kb output rows front to back) reads the whole input once per channel block; positions
    outside reads it once, and the weights once per block of positions. The weights of a conv
    that narrows the channels (a projection: more input channels than output) are small, its
    input large: once the input outgrows L2 (:data:`POSITIONS_OUTSIDE_MIN_INPUT`), positions
    outside goes first. Measured (Xeon, AVX-512, one thread, MobileNetV2 in the model):
    144 -> 24 at 56x56 + residual 0.40 -> 0.25 ms, 96 -> 24 at 56x56 0.15 -> 0.11, 32 -> 16
    at 112x112 0.19 -> 0.17; the whole model 7.61 -> 7.33 ms interleaved (with every
    narrowing conv positions outside, 28x28 and smaller too: 7.37). Expansions (24 -> 144 at
    56x56: 0.38-0.41 ms vs 0.83-0.98) keep channels outside."""
    orders = ["channels outside", "positions outside"]
    if c_in > k_out and c_in * positions * 4 >= POSITIONS_OUTSIDE_MIN_INPUT:
        orders.reverse()
    return orders


#: a GEMM's position tiles are each a chunk of their own (see :func:`position_chunks`) only
#: up to this many per thread
CHUNK_EVERY_TILE_MAX = 4


def position_chunks(tiles: int, threads: int) -> int:
    """Chunks the ``tiles`` position tiles of a GEMM are cut into for ``threads`` threads (1:
    not cut): the fewest that split evenly, a multiple of ``threads`` where one divides
    ``tiles``, else the smallest divisor above ``threads`` (thread boundaries then cut one
    chunk's channel blocks). Every tile a chunk of its own is the order "positions outside"
    (each tile computed for every channel block, which re-reads the weights per tile): only
    for few tiles (:data:`CHUNK_EVERY_TILE_MAX` per thread: 14x14 as 3 tiles of 64 positions),
    else the image is not cut (13 tiles: a prime count)."""
    if threads < 2:
        return 1
    above = [d for d in _divisors(tiles) if d >= threads]
    if not above:
        return 1
    best = min(above, key=lambda d: (d % threads != 0, d))
    return 1 if best == tiles and tiles > CHUNK_EVERY_TILE_MAX * threads else best


def _channels_outside(sch, n_loop, k_o, p_o, isa) -> tuple:
    """The parallel outer loops of a kernel in the order "channels outside" (a pointwise GEMM's
    positions, a conv's output rows: ``p_o``): ``(n, k_o, p_o)`` on one thread; on more
    (``isa.threads``), ``(n, p_c, k_o, p_o')``, the positions first cut into
    :func:`position_chunks` (every tile its own chunk: ``(n, p_o, k_o)``), so that TVM's
    parallel loop (its iterations shared among the threads in contiguous runs) gives each
    thread its own part of the image with every channel block, not a channel block over the
    whole image.

    Each thread then reads the input rows of its own positions only, which the kernel before
    (also cut along the image) mostly left in its own core's cache, instead of every input row,
    half of them from the other core. Measured (Xeon, AVX-512, two threads, in the model):
    SqueezeNet's squeeze convs 64 -> 16 at 55x55 121 -> 55 us (67 at one thread), 256 -> 32 at
    27x27 170 -> 80 (108); whole models interleaved, untuned, with the pointwise GEMMs cut:
    SqueezeNet 3.13 -> 3.01 ms, MobileNetV2 4.12 -> 3.91, ShuffleNetV2 2.58 -> 2.46, ResNet-18
    10.35 -> 10.24; one thread unchanged (one chunk)."""
    tiles = _int(sch.get(p_o).extent)
    chunks = position_chunks(tiles, isa.threads)
    if chunks == 1:
        return n_loop, k_o, p_o
    if chunks == tiles:
        return n_loop, p_o, k_o
    p_c, p_o = sch.split(p_o, factors=[chunks, None])
    return n_loop, p_c, k_o, p_o


#: vectors of positions a pointwise GEMM's register tile row may take
POINTWISE_VECTORS = (1, 2, 3, 4)


def schedule_pointwise(sch, gemm, isa, outputs, knobs: Knobs):
    """Default schedule of a pointwise (1x1) conv kernel, see :mod:`graphgen.tune.pointwise`:
    the GEMM in ``kb`` output channels x ``nv`` vectors of positions register tiles (weights
    broadcast, input rows loaded as vectors, parallel over tiles), then the cropped output with
    the fused tail, parallel and vectorized along the rows."""
    if len(outputs) != 1:
        raise NotMatched("more than one output")
    out = outputs[0]
    # the input copied before the GEMM: the subsampled rows of a strided conv
    pads = [b for b in _blocks(sch) if sch.get(b).name_hint.startswith("pointwise_data_")]
    # the positions past the last whole vector, computed apart (pointwise._gemm_rows)
    rest = [b for b in _blocks(sch) if sch.get(b).name_hint == "pointwise_gemm_rest"]
    keep = (gemm, out, *pads, *rest)
    for b in _blocks(sch):
        if any(_same(sch, b, x) for x in keep):
            continue
        if "R" in _iter_kinds(sch, b):
            raise NotMatched("a second reduction in the kernel")
        sch.compute_inline(b)  # the crop and the tail's steps, into the output
    for p in pads:
        _parallel_vectorize(sch, p, isa)
    strided = any(sch.get(p).name_hint.startswith("pointwise_data_im2col") for p in pads)
    kind = "pointwise conv2d (strided)" if strided else "pointwise conv2d"
    _, k_out, p_pad = (_int(x) for x in _buf(sch.get(gemm).writes[0]).shape)
    lanes = isa.lanes
    limit = isa.tile_limit
    on, ok_, oy, ox = sch.get_loops(out)
    width = _int(sch.get(ox).extent)

    def tiles(extent, vectors=(1, 2, 4)):  # (one <48 x float> vector: LLVM splits it badly)
        # most accumulators first, then the fewest loads per step of the reduction (nv input
        # vectors + kb weight broadcasts per nv * kb FMAs): 4 x 6 before 3 x 8 before 2 x 12.
        # Measured (Xeon, AVX-512, one thread, whole models interleaved) against two vectors
        # first: MobileNetV2 7.80 -> 7.74 ms, ShuffleNetV2 3.40 -> 3.37, SqueezeNet 5.49 -> 5.50
        options = [(kb * nv, -(kb + nv), nv, kb) for nv in vectors if extent % (nv * lanes) == 0
                   for kb in _divisors(k_out) if kb * nv <= limit]
        return [o[2:] for o in _ranked(options, key=lambda o: o)]

    # Where the tail runs (knob "pointwise.passes"):
    #   "rows"       the GEMM tile computed inside the output rows that consume it, when rows are
    #                whole tiles (measured, AVX2, one thread: 16 -> 96 at 112x112 0.55 ms vs 1.07
    #                in two passes). Tiles that cross rows make TVM's region analysis
    #                over-approximate the GEMM's footprint (each tile recomputes its row's start),
    #                and GEMM rows padded past the output channels do not split into whole tiles.
    #   "write-back" the crop and tail inlined into the register tile's write-back
    #                (reverse_compute_inline: the output index y * W + x is the GEMM's own
    #                position), so any image whose positions are whole vectors is one pass too.
    #                Not with the rest computed apart: its GEMM would run after the write-back.
    #                Not first where the positions were padded: the write-back then crops them,
    #                and its stores are no longer whole vectors of the output's rows. Measured
    #                (Zen 5, AVX-512, one thread, conv + ReLU6) write-back vs two passes:
    #                16 -> 64 at 55x55 0.104 vs 0.061 ms, 32 -> 128 at 27x27 0.066 vs 0.041,
    #                64 -> 256 at 13x13 0.074 vs 0.032, 96 -> 576 at 14x14 0.120 vs 0.116;
    #                unpadded, 24 -> 144 at 56x56, 0.129 vs 0.153.
    #   "two"        the GEMM's rows written whole, then the crop and tail over them.
    whole_rows = _int(sch.get(ok_).extent) == k_out
    fused_tiles = _fused_pointwise_tiles(tiles(width), lanes) if not pads and not rest and whole_rows else []
    gemm_tiles = tiles(p_pad, vectors=POINTWISE_VECTORS)
    padded = p_pad > _int(sch.get(oy).extent) * width
    passes = knobs.pick("pointwise.passes", (["rows"] if fused_tiles else [])
                        + ((["two", "write-back"] if padded else ["write-back", "two"]) if gemm_tiles and not rest
                           else ["two"] if gemm_tiles else []))
    # Loop order (knob "pointwise.order"). Channel blocks outside positions: each thread writes
    # kb output rows front to back. Positions outside: every output row is written a tile at a
    # time, K streams at once, while a panel of input rows stays in L1. Measured (Xeon,
    # AVX-512, one thread, 2026-12): 16 -> 96 at 112x112 in rows 0.58-0.81 ms channels outside
    # vs 3.1 positions outside (onnxruntime 1.2-1.4); 24 -> 144 at 56x56 by write-back 0.38-0.41
    # vs 0.83-0.98 (0.66). (Earlier, on a Zen 5 host, positions outside measured a little
    # faster in MobileNetV2 in two passes: 5.88 ms against 5.99.) Which goes first: see
    # pointwise_orders.
    c_in = _int(sch.get(sch.get_loops(gemm)[-1]).extent)
    channels_outside = knobs.pick("pointwise.order", pointwise_orders(c_in, k_out, p_pad)) == "channels outside"
    if passes == "rows":
        nv, kb = knobs.pick("pointwise.tile", fused_tiles)
        op_ = sch.fuse(oy, ox)
        k_o, k_i = sch.split(ok_, factors=[None, kb])
        p_o, p_i = sch.split(op_, factors=[None, nv * lanes])
        outer = _channels_outside(sch, on, k_o, p_o, isa) if channels_outside else (on, p_o, k_o)
        sch.reorder(*outer, k_i, p_i)
        sch.compute_at(gemm, outer[-1], preserve_unit_loops=True)
        gk, gp, gr = sch.get_loops(gemm)[-3:]
        sch.reorder(gr, gk, gp)
        sch.parallel(sch.fuse(*outer))
        sch.vectorize(p_i)
        sch.unroll(k_i)
        sch.vectorize(gp)
        sch.unroll(gk)
        init = sch.decompose_reduction(gemm, gr)
        _vectorize_unroll_tail(sch, sch.get_loops(init)[3:])
        return kind
    # rows of nv single vectors, unrolled (so 3 vectors too: 48 positions of a 7x7 image, 24
    # FMAs per 3 + 8 loads instead of 12 per 1 + 12)
    nv, kb = knobs.pick("pointwise.tile", gemm_tiles)
    ln, lk, lp, lr = sch.get_loops(gemm)
    k_o, k_i = sch.split(lk, factors=[None, kb])
    p_o, p_v, p_i = sch.split(lp, factors=[None, nv, lanes])
    outer = _channels_outside(sch, ln, k_o, p_o, isa) if channels_outside else (ln, p_o, k_o)
    sch.reorder(*outer, lr, k_i, p_v, p_i)
    _register_tiled_gemm(sch, gemm, outer, lr, unrolled=(k_i, p_v), vector=p_i, lanes=lanes)
    if passes == "write-back":
        sch.reverse_compute_inline(out)
        return kind
    split_at = None
    if rest:
        split_at = p_pad
        _schedule_pointwise_rest(sch, rest[0], kb, isa)
    # after the weights' layout rewrite: a partitioned crop would give the bias two readers,
    # and RewriteLayout then repacks it inside the second one's loop (once per channel)
    return kind, lambda: _image_vectorize(sch, out, isa, split_at)


def _schedule_pointwise_rest(sch, rest, kb: int, isa) -> None:
    """The GEMM over the positions past the last whole vector, ``[N, R, J, K_pad]``: tiles of
    up to a few positions (input broadcast) x ``J`` partial sums (independent FMA chains, see
    :func:`graphgen.tune.pointwise.rest_partial_sums`) x the main GEMM's ``kb`` output
    channels as one vector (its weight blocks, so both read the same repacked layout).
    Measured (Xeon, AVX-512, one thread, interleaved) one sum -> four: 160 -> 960 at 7x7
    0.109 -> 0.099 ms, 320 -> 1280 0.339 -> 0.327, 960 -> 320 0.234 -> 0.213, 576 -> 160
    0.068 -> 0.062; MobileNetV2 in three interleaved runs -0.08, -0.03 and +0.01 ms (its run
    to run noise ~0.05). Chains over several channel blocks instead made RewriteLayout repack
    the weights in the rest's order, which the main GEMM then read 10 blocks apart: slower."""
    ln, lq, lj, lk, lr = sch.get_loops(rest)
    n_rest = _int(sch.get(lq).extent)
    parts = _int(sch.get(lj).extent)
    vectors = -(-kb // isa.lanes)
    qb = _largest_divisor_at_most(n_rest, max(1, 12 // (vectors * parts)))
    k_o, k_i = sch.split(lk, factors=[None, kb])
    q_o, q_i = sch.split(lq, factors=[None, qb])
    sch.reorder(ln, k_o, q_o, lr, q_i, lj, k_i)
    _register_tiled_gemm(sch, rest, (ln, k_o, q_o), lr, unrolled=(q_i, lj), vector=k_i)


# -- strided convs over few channels on phase-split input (graphgen.tune.phase_conv) ----------

def schedule_phase_conv(sch, conv, isa, outputs, knobs: Knobs):
    """Default schedule of a phase-split strided conv, see :mod:`graphgen.tune.phase_conv`:
    register tiles of ``cb`` output channels (weights broadcast) x ``hb`` rows x ``nv`` vectors
    of output columns (loaded straight from the input's column phases), parallel over tiles,
    the cropped output and its fused tail stored from the tile as row vectors."""
    if len(outputs) != 1:
        raise NotMatched("more than one output")
    out = outputs[0]
    data = _named(sch, "phase_conv_data")
    for b in _blocks(sch):
        if any(_same(sch, b, x) for x in (conv, out, data)):
            continue
        if "R" in _iter_kinds(sch, b):
            raise NotMatched("a second reduction in the kernel")
        sch.compute_inline(b)  # the crop and the tail's steps, into the output
    _, k_out, out_h, w_pad = (_int(x) for x in _buf(sch.get(conv).writes[0]).shape)
    out_w = _int(_buf(sch.get(out).writes[0]).shape[-1])
    window_w = _int(sch.get(sch.get_loops(conv)[-1]).extent)
    lanes = isa.lanes
    depthwise = sch.get(conv).name_hint == "phase_depthwise"
    copy_per_block = depthwise and (out_w >= DEPTHWISE_COPY_PER_BLOCK_MIN_WIDTH or window_w >= 5)
    if depthwise and w_pad % lanes:
        lanes = lanes // 2  # rows of whole half vectors (56 columns with AVX-512), not padded
    # strided convs on 32 registers: tiles of up to isa.tile_limit accumulators (see the key)
    many_rows = not depthwise and isa.registers >= 32
    limit = isa.tile_limit if many_rows else min(isa.accumulators - 2, 16)
    options = [(cb, hb, nv) for nv in (1, 2, 4) if w_pad % (nv * lanes) == 0
               for cb in _divisors(k_out) if cb <= (4 if depthwise else 16) for hb in _divisors(out_h) if hb <= 4
               if cb * hb * nv <= limit]
    if not options:
        raise NotMatched("no register tile fits")
    if depthwise:
        # each channel its own input rows: neighbouring output rows share input rows (4 rows of
        # a 3x3 window read 6), channels share nothing; enough accumulators for the FMA latency
        key = lambda o: (o[0] * o[1] * o[2] >= FMA_CHAINS, o[1], -o[0], -o[0] * o[1] * o[2])  # noqa: E731
    elif many_rows:
        # 8 channels (weights broadcast from memory), one vector of columns, then as many rows as
        # the registers hold: each row's input vector (a split cache-line load: the phases' rows
        # are not aligned) serves 8 FMAs, each broadcast weight hb FMAs; on several threads, row
        # blocks that split among them (_channels_outside). Measured (Xeon, AVX-512, conv + bias +
        # ReLU alone, us; cb x hb): SqueezeNet's 3 -> 64 3x3/2 (111 rows) one thread 8x1 469, 8x3
        # 377, 4x3 442, 16x1 434; two threads 8x1 257, 8x3 284 (37 row blocks: not cut);
        # MobileNetV2's 3 -> 32 (112 rows) 8x1 211, 8x2 182, two threads 105 -> 96;
        # ShuffleNetV2's 3 -> 24 8x1 154, 8x2 125; ResNet-18's 7x7/2 8x1 1561, 8x2 1336. Row
        # blocks that do not divide the rows (the last one predicated) were no faster on one
        # thread (MobileNetV2 8x3 176) and much slower on two (170 against 96)
        cb8 = max(c for c in _divisors(k_out) if c <= 8)

        def key(o):
            cb, hb, nv = o
            cut = isa.threads == 1 or position_chunks(out_h // hb, isa.threads) > 1
            return nv == 1, cb == cb8, cut, hb, -cb
    else:
        # measured (AVX-512, one thread, SqueezeNet's and MobileNetV2's 3x3/2 stems): 8 channels x
        # one vector best (0.493 ms; 12 x 1 0.511, 6 x 2 rows 0.512, 16 x 1 0.620, 8 x 2 vectors
        # 0.964): enough accumulators to cover the FMA latency, then as few as that, one row
        key = lambda o: (o[0] * o[1] * o[2] >= FMA_CHAINS, o[1] == 1, -o[0] * o[1] * o[2], -o[2])  # noqa: E731
    cb, hb, nv = knobs.pick("phase_conv.tile", _ranked(options, key=key))
    # the channel blocks alone are the parallel loop then: at least two per thread
    copy_per_block = copy_per_block and k_out // cb >= 2 * isa.threads
    if not copy_per_block:
        _parallel_vectorize(sch, data, isa)
    loops = sch.get_loops(conv)
    if depthwise:
        ln, lk, ly, lx, lry, lrx = loops
        lrc = lry
    else:
        ln, lk, ly, lx, lrc, lry, lrx = loops
    k_o, k_i = sch.split(lk, factors=[None, cb])
    y_o, y_i = sch.split(ly, factors=[None, hb])
    x_o, x_v, x_l = sch.split(lx, factors=[None, nv, lanes])
    # a conv's rows cut for the threads as a pointwise GEMM's positions are (_channels_outside):
    # each thread reads its own rows of the input, not all of it. Measured (Xeon, AVX-512, two
    # threads, in the model, us): SqueezeNet's 3 -> 64 3x3/2 stem 340-378 -> 255 (475 at one
    # thread), ShuffleNetV2's 3 -> 24 150 -> 116. Not a depthwise conv's: each of its channels
    # reads only its own input rows already, and its 7 14x14 ones in ShuffleNetV2 took 88 ->
    # 210 us cut by rows (threads sharing input rows at the chunk edges, and shorter runs)
    if copy_per_block:
        # parallel over channel blocks, their rows inside: each block's padded input copied just
        # before its rows read it (below), so the copy never leaves the cache
        outer, rows = (ln, k_o), (y_o,)
    else:
        outer, rows = ((ln, k_o, y_o) if depthwise else _channels_outside(sch, ln, k_o, y_o, isa)), ()
    sch.reorder(*outer, *rows, x_o, *([] if depthwise else [lrc]), lry, lrx, k_i, y_i, x_v, x_l)
    # the output (and its tail) stored from the tile: its last column tile is cut at the real
    # row length (a predicate the vectorizer keeps)
    sch.reverse_compute_at(out, x_o, preserve_unit_loops=True)
    _vector_tile(sch, sch.get_loops(out)[len(outer) + len(rows) + 1:])
    parallel = sch.fuse(*outer)
    sch.parallel(parallel)
    sch.vectorize(x_l)
    for lp in (k_i, y_i, x_v):
        sch.unroll(lp)
    init = sch.decompose_reduction(conv, lrc)
    _vectorize_unroll_tail(sch, sch.get_loops(init)[2:])
    if copy_per_block:
        sch.compute_at(data, parallel)  # the block's channels, all their padded rows
    return "depthwise conv2d (rows)" if depthwise else "conv2d (phase-split)"


# -- Winograd conv2d (graphgen.tune.winograd) -------------------------------------------------

def _named(sch, prefix: str):
    found = [b for b in _blocks(sch) if sch.get(b).name_hint.startswith(prefix)]
    if len(found) != 1:
        raise NotMatched(f"expected one {prefix} block")
    return found[0]


def _read_index(sch, block, buffer) -> int:
    for i, r in enumerate(sch.get(block).reads):
        if _buf(r).same_as(buffer):
            return i
    raise NotMatched("block does not read the buffer")


def _winograd_gemm_tiles(tiles: int, k_out: int, isa: Isa) -> list[tuple[int, int]]:
    """(tiles per block ``pb``, output channels per block ``vk``) of the batched GEMM's
    register tile: per step ``vk/lanes`` weight vectors, ``pb`` broadcasts of V and ``pb *
    vk/lanes`` accumulators.

    Measured on AVX2 (36 x [196 x 64] x [64 x 64], one thread): two vectors of channels x 4-6
    tiles ran at 89-91 GFLOP/s; one vector x 8-14 tiles at 47-64 (LLVM spilled accumulators
    to the stack), 4 vectors x 2-3 tiles at 41-54. So: two vectors when the channels allow,
    then as many tiles as leave two registers free, at most 12 accumulators on 16-register ISAs.
    """
    blocks = _channel_blocks(k_out, isa)
    if not blocks:
        raise NotMatched("output channels do not split into vectors")
    limit = isa.tile_limit
    # the heuristic's order: two whole vectors of channels first, then lane efficiency, width
    ranked = _ranked(blocks, key=lambda b: (b[1] == 2 and b[2] == 1.0, b[2], b[0]))
    out = []
    for vk, k, _ in ranked:
        fits = sorted((d for d in _divisors(tiles) if d * k <= limit), reverse=True)
        out += [(pb, vk) for pb in fits[:2]]  # the most tiles that fit, and the next fewer
    first = out[0]
    # then the same channel block with fewer tiles before other channel blocks
    return [first] + sorted(out[1:], key=lambda o: (o[1] != first[1]))


#: the transformed weights (U) up to which a Winograd kernel runs its stages per tile row by
#: default (U is then read once per tile row; 590 KB measured fine with this host's 2 MB L2,
#: 1 MB a little slower, 2.4 MB 1.2x slower: see schedule_winograd)
WINOGRAD_ROWS_MAX_U_BYTES = 640 * 1024


def schedule_winograd(sch, gemm, isa, outputs, knobs: Knobs):
    """Default schedule of a Winograd conv kernel (pad, data pack, batched GEMM, inverse + the
    fused tail), see :mod:`graphgen.tune.winograd`.

    * pad: written channel-blocked (``[n, c/vc, y, x, vc]``), so the data pack reads each
      tap of a tile as one vector of ``vc`` channels;
    * data pack: per (tile, channel block) the ``alpha x alpha`` input vectors are read into
      registers once (a local tile: the workspace buffers may alias as far as LLVM knows) and
      the ``alpha^2`` outputs computed with the tile loops unrolled (the selects on the tile
      position fold into constants);
    * batched GEMM: the register-tiled micro-kernel of the direct conv (``pb`` tiles x ``vk``
      output channels accumulated over the input channels), parallel over the tile positions
      and blocks;
    * inverse: per (output-channel vector, tile) the ``alpha^2`` products into registers, the
      ``m x m`` outputs unrolled, the fused tail (bias, ReLU, residual add) applied on the way
      out;
    * where the transformed weights are small, the data pack, GEMM and inverse of one row of
      tiles at a time, parallel over tile rows (knob ``winograd.stages``), else each stage over
      the whole image, parallel on its own loops.
    """
    pad = _named(sch, "winograd_data_pad")
    rows = _named(sch, "winograd_data_rows")
    pack = _named(sch, "winograd_data_pack")
    inv_rows = _named(sch, "winograd_inverse_rows")
    if len(outputs) != 1:
        raise NotMatched("more than one output")
    out = outputs[0]
    keep = (pad, rows, pack, gemm, inv_rows, out)
    for b in _blocks(sch):
        if any(_same(sch, b, x) for x in keep):
            continue
        if "R" in _iter_kinds(sch, b):
            raise NotMatched("a second reduction in the kernel")
        sch.compute_inline(b)  # the inverse's column pass and the tail's steps, into the output
    lanes = isa.lanes

    # pad, channel-blocked
    c_in = _int(_buf(sch.get(pad).writes[0]).shape[1])
    vc = lanes if c_in % lanes == 0 else 4
    if c_in % vc:
        raise NotMatched("input channels make no whole vector")
    sch.transform_layout(pad, ("write", 0), lambda n_, c_, y_, x_: (n_, c_ // vc, y_, x_, c_ % vc))
    pn, pc, py, px = sch.get_loops(pad)
    pc_o, pc_i = sch.split(pc, factors=[None, vc])
    sch.reorder(pn, pc_o, py, px, pc_i)
    _copy_parallel(sch, pad, sch.fuse(pn, pc_o, py))
    sch.vectorize(pc_i)

    tiles, alpha, _, k_out = (_int(x) for x in _buf(sch.get(gemm).writes[0]).shape)
    m = _winograd_m(alpha)
    on, ok_, oy, ox = sch.get_loops(out)
    out_h = _int(sch.get(oy).extent)
    out_w = _int(sch.get(ox).extent)
    n_h, n_w = -(-out_h // m), -(-out_w // m)
    # Where the stages run (knob "winograd.stages"):
    #   "per tile row"  the data pack and GEMM of one row of tiles under the output's tile-row
    #                   loop, then that row's inverse: V and M stay a row (tens of KB) instead of
    #                   the whole image (1.8 MB of M for 16 -> 64 at 55x55), but U is read once
    #                   per tile row. Measured (Xeon, AVX-512, one thread), per tile row vs apart:
    #                   16 -> 64 at 55x55 0.52 vs 0.74 ms, 32 -> 128 at 27x27 0.34 vs 0.43, 64 ->
    #                   64 at 56x56 0.98-1.23 vs 2.02 (U of 147-590 KB); 128 -> 128 at 28x28 1.90
    #                   vs 1.53 and 256 -> 256 at 14x14 F(2x2) 3.8 vs 2.0 (U of 2.4 and 4.2 MB).
    #   "apart"         each stage over the whole image, parallel over its own loops.
    u_bytes = alpha * alpha * c_in * k_out * 4
    stages = ["apart"] if n_h < 2 else ["per tile row", "apart"] if u_bytes <= WINOGRAD_ROWS_MAX_U_BYTES \
        else ["apart", "per tile row"]
    per_row = knobs.pick("winograd.stages", stages) == "per tile row"

    # inverse + tail: per (batch, channel vector, tile row, tile), the row pass per output row
    # into registers, the outputs unrolled, the fused tail (bias, ReLU, residual) on the way out
    vo = lanes if k_out % lanes == 0 else 4
    ok_o, ok_i = sch.split(ok_, factors=[None, vo])
    oy_o, oy_i = sch.split(oy, factors=[n_h, m])
    ox_o, ox_i = sch.split(ox, factors=[n_w, m])
    sch.reorder(*((on, oy_o, ok_o) if per_row else (on, ok_o, oy_o)), ox_o, oy_i, ox_i, ok_i)
    sch.compute_at(inv_rows, oy_i, preserve_unit_loops=True)
    _vector_tile(sch, sch.get_loops(inv_rows)[5:])
    sch.unroll(oy_i)
    sch.unroll(ox_i)
    sch.vectorize(ok_i)

    # batched GEMM: M[p, e, nu, k] = sum_c V[p, e, nu, c] U[e, nu, c, k], as register tiles of
    # pb tiles x vk output channels; channel blocks outside tile blocks: a block of U (C x vk)
    # stays in L1 across the tiles
    if per_row:
        sch.compute_at(gemm, oy_o, preserve_unit_loops=True)
    row_loops = 2 if per_row else 0  # (batch, tile row) above the GEMM's own loops
    pb, vk = knobs.pick("winograd.gemm_tile", _winograd_gemm_tiles(n_w if per_row else tiles, k_out, isa))
    gp, ge, gn, gk, grc = sch.get_loops(gemm)[row_loops:]
    gp_o, gp_i = sch.split(gp, factors=[None, pb])
    gk_o, gk_i = sch.split(gk, factors=[None, vk])
    sch.reorder(ge, gn, gk_o, gp_o, grc, gp_i, gk_i)
    _register_tiled_gemm(sch, gemm, (ge, gn, gk_o, gp_o), grc, unrolled=gp_i, vector=gk_i,
                         lanes=lanes if per_row else None, loops_above=row_loops, parallel=not per_row)
    if not per_row:
        sch.parallel(sch.fuse(on, ok_o, oy_o))

    # data pack: per (tile, channel block, tile row) the row pass into a few registers, then the
    # column pass; the tile loops unrolled so the selects on the tile position fold away
    if per_row:
        sch.compute_at(pack, oy_o, preserve_unit_loops=True)
    lp, le, ln, lc = sch.get_loops(pack)[row_loops:]
    lc_o, lc_i = sch.split(lc, factors=[None, vc])
    sch.reorder(lp, lc_o, le, ln, lc_i)
    sch.compute_at(rows, le, preserve_unit_loops=True)
    _vector_tile(sch, sch.get_loops(rows)[row_loops + 3:])
    if not per_row:
        sch.parallel(sch.fuse(lp, lc_o))
    sch.unroll(le)
    sch.unroll(ln)
    sch.vectorize(lc_i)
    if per_row:
        # parallel over (batch, tile row) before the reduction's init is split off: TVM checks
        # the loop's dataflow on the reduction block
        sch.parallel(sch.fuse(on, oy_o))
        init = sch.decompose_reduction(gemm, grc)
        _vectorize_unroll_tail(sch, sch.get_loops(init)[5:])
    return f"winograd conv2d F({m}x{m})"


def _winograd_m(alpha: int) -> int:
    return alpha - 2


# -- everything else --------------------------------------------------------------------------

def schedule_generic(sch, isa, outputs):
    """Inline what can be inlined; parallelize and vectorize what is left.

    A producer that feeds a reduction stays its own loop nest: inlined, its index arithmetic
    and padding selects would run once per multiply-add instead of once per element (measured:
    FCN-32s's ConvTranspose, whose TOPI form dilates its input by the stride and pads it, ran
    836 s at opt-level 0 with the dilation inlined).
    """
    blocks = _blocks(sch)
    for b in blocks:
        if _writes_output(sch, b, outputs):
            continue
        if "R" in _iter_kinds(sch, b):
            continue
        if any("R" in _iter_kinds(sch, c) for c in sch.get_consumers(b)):
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - not inlinable: scheduled on its own below
            pass
    for b in _blocks(sch):
        kinds = _iter_kinds(sch, b)
        if "R" in kinds:
            loops = sch.get_loops(b)
            n_sp = len(kinds) - len(kinds.lstrip("S"))
            if _reduction_chains(sch, b, kinds, loops):
                continue
            if len(loops) == len(kinds) and n_sp and _worth_sharing(sch, loops):
                fused = sch.fuse(*loops[:n_sp]) if n_sp > 1 else loops[0]
                if _int(sch.get(fused).extent) >= 2:
                    sch.parallel(fused)
        else:
            _parallel_vectorize(sch, b, isa)
    return "generic"


#: the innermost reduction extents (least, most) whose positions become independent sums
#: (see _reduction_chains): fewer are no gain, more would not stay unrolled
REDUCTION_CHAINS = (4, 32)


def _reduction_chains(sch, block, kinds: str, loops) -> bool:
    """A sum over several axes (a global average pool's rows and columns) as one sum per
    position of the innermost axis (rfactor), the reduction's other axes outside them: that
    many independent chains of adds instead of one as long as the whole reduction, then those
    sums added. Measured (Zen 5, one thread): SqueezeNet's mean over 1000 x 13 x 13 52 -> 12 us
    (onnxruntime 20). Returns whether it applied (the block's spatial loops then parallel)."""
    n_sp = len(kinds) - len(kinds.lstrip("S"))
    if not n_sp or len(loops) != len(kinds) or kinds[n_sp:] != "R" * (len(kinds) - n_sp) or len(kinds) - n_sp < 2:
        return False
    if not REDUCTION_CHAINS[0] <= _int(sch.get(loops[-1]).extent) <= REDUCTION_CHAINS[1]:
        return False
    try:
        rf = sch.rfactor(loops[-1], factor_axis=n_sp)
    except Exception:  # noqa: BLE001 - a reduction rfactor does not take (the schedule is unchanged)
        return False
    outer = sch.get_loops(block)[:n_sp]
    sch.compute_at(rf, outer[-1], preserve_unit_loops=True)
    chain, *rest = sch.get_loops(rf)[n_sp:]  # the chains' axis first, then the other axes
    sch.reorder(*rest, chain)
    sch.unroll(chain)
    red = [lp for lp in rest if _int(sch.get(lp).extent) > 1]
    init = sch.decompose_reduction(rf, red[0] if red else chain)
    for lp in sch.get_loops(init)[n_sp:]:
        if _int(sch.get(lp).extent) > 1:
            sch.unroll(lp)
    if _worth_sharing(sch, outer + [chain]):
        par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if _int(sch.get(par).extent) >= 2:
            sch.parallel(par)
    return True


def schedule_depthwise_stride2(sch, main, isa, outputs) -> str:
    """graphgen's hand-written 3x3 / stride-2 depthwise kernel (:mod:`graphgen.tune.depthwise_stride2`),
    one block per output row: the fused tail (bias, activation) runs on each row right after it,
    vectorized along it, and the rows are parallel when there are enough outputs to share."""
    from graphgen.tune import depthwise_stride2

    tail = _inline_tail(sch, main, outputs)
    nc, oy = sch.get_loops(main)
    if tail is not None:
        sch.reverse_compute_at(tail, oy)
        row = sch.get_loops(tail)[-1]
        width = _int(sch.get(row).extent)
        # a whole row as one vector (7-56 columns in MobileNetV2 and ShuffleNetV2: LLVM splits
        # it into registers), wider rows in pieces of the largest divisor that is a few vectors
        piece = max((d for d in _divisors(width) if d <= 4 * isa.lanes), default=1)
        if piece > 1:
            if piece < width:
                row = sch.split(row, factors=[None, piece])[1]
            sch.vectorize(row)
    out = _buf(sch.get(main).writes[0])
    # an output costs its window's 9 multiply-adds and shuffles, not a copied element's one step:
    # measured (Xeon, AVX-512, two threads, + bias + ReLU alone, us) 576 x 14 x 14 21.7 -> 12.5
    # parallel, 232 x 14 x 14 9.5 -> 6.1, 116 x 28 x 28 12.7 -> 10.0 (from 11-28K outputs)
    outputs_n = _int(sch.get(nc).extent) * _int(sch.get(oy).extent) * _int(out.shape[-1])
    if _int(sch.get(nc).extent) > 1 and outputs_n * 9 >= PARALLEL_MIN_ITERATIONS:
        sch.parallel(nc)
    return depthwise_stride2.KIND


_MAIN = {
    "conv2d_nchw": schedule_conv,
    "group_conv2d_nchw": schedule_conv,
    "pool_max": schedule_pool,
    "pool_sum": schedule_pool,
    "matmul": schedule_dense,
    "T_matmul": schedule_dense,
    "T_matmul_NT": schedule_dense,
    "NT_matmul": schedule_dense,
    "T_dense": schedule_dense,
    "winograd_bgemm": schedule_winograd,
    "pointwise_gemm": schedule_pointwise,
    "phase_conv": schedule_phase_conv,
    "phase_depthwise": schedule_phase_conv,
}


def schedule_func(func, isa: Isa, fallbacks: list[str] | None = None):
    """A scheduled copy of ``func`` and its class name; raises NotMatched when not covered.
    ``fallbacks`` collects why a class's schedule raised (see :func:`default_schedule`)."""
    sch, kind = default_schedule(func, isa, fallbacks=fallbacks)
    return sch.mod["main"], kind


def default_schedule(func, isa: Isa, mod=None, knobs: Knobs | None = None, fallbacks: list[str] | None = None):
    """The traced schedule (``tvm.s_tir.Schedule``) of ``func`` and its class name.

    ``mod`` (an IRModule whose "main" is ``func``, e.g. a MetaSchedule task) is scheduled in
    place of a fresh one, so the trace replays on exactly that workload. ``knobs`` picks other
    options than the heuristic's (the tuner's variants) and records the knobs met.
    """
    knobs = knobs if knobs is not None else Knobs()
    import tvm
    from tvm.s_tir import Schedule

    base = mod if mod is not None else tvm.IRModule({"main": func})
    sch = Schedule(base)
    outputs = _output_blocks(sch)
    blocks = _blocks(sch)
    from graphgen.tune.depthwise_stride2 import BLOCK as DEPTHWISE_STRIDE2

    hand_written = [b for b in blocks if sch.get(b).name_hint == DEPTHWISE_STRIDE2]
    if len(hand_written) == 1:  # graphgen's own kernel in TIR and its fused tail
        return sch, schedule_depthwise_stride2(sch, hand_written[0], isa, outputs)
    if any(not sch.get(b).iter_vars for b in blocks):
        # opaque blocks (extern calls such as argsort, hand-written loops in NMS) read buffers
        # the schedule primitives cannot see: inlining a producer breaks them
        raise NotMatched("the kernel has opaque blocks")
    # a kernel's second reduction that its main one's schedule takes care of
    companions = {"pointwise_gemm_rest"}
    reductions = [b for b in blocks if "R" in _iter_kinds(sch, b) and sch.get(b).name_hint not in companions]
    kind = None
    if len(reductions) == 1:
        name = sch.get(reductions[0]).name_hint
        fn = _MAIN.get(name)
        if fn is not None:
            try:
                kind = fn(sch, reductions[0], isa, outputs, knobs)
            except NotMatched:  # not this class after all (e.g. two outputs): generic
                kind = None
            except Exception as e:  # noqa: BLE001 - a bug in a class's schedule: generic, but said
                lines = str(e).strip().splitlines()
                why = f"{type(e).__name__}: {lines[-1][:160]}" if lines else type(e).__name__
                _log.debug("the %s schedule of %s raised %s; generic schedule used", fn.__name__, name, why)
                if fallbacks is not None:
                    fallbacks.append(f"{fn.__name__} ({name}): {why}")
                kind = None
    # a schedule may leave steps for after the weight layout rewrite: (kind, finish)
    kind, finish = kind if isinstance(kind, tuple) else (kind, None)
    if kind is None:
        knobs.seen.clear()
        sch = Schedule(base)
        kind = schedule_generic(sch, isa, _output_blocks(sch))
    if kind.startswith(("conv2d", "grouped conv2d", "depthwise", "dense", "pointwise")):
        _rewrite_weight_layout(sch)  # the classes whose loops read weights in a repacked order
    if finish is not None:
        finish()
    return sch, kind


def _rewrite_weight_layout(sch) -> None:
    """Repack layout-free weights into the order the scheduled loops read them (compile time)."""
    from tvm.s_tir import meta_schedule as ms

    sch.enter_postproc()  # as MetaSchedule records it, so the trace replays from a database
    ms.postproc.RewriteLayout().apply(sch)


def variants(seen: dict[str, int], best: dict[str, int] | None = None) -> list[dict[str, int]]:
    """Knob settings to measure next, around ``best`` (default: the heuristic's picks): every
    other option of one knob at a time, knobs in the order the schedule met them.

    Coordinate search: the tuner measures these, keeps the fastest as the new ``best`` and asks
    again; settings measured before are its to skip. A knob whose option changes the loop nest
    (``conv.nest``, ``pointwise.passes``) can bring new knobs with it, which the next round
    meets in ``seen``.
    """
    best = dict(best or {})
    out = []
    for name, n in seen.items():
        for i in range(n):
            if i != best.get(name, 0):
                out.append({**best, name: i})
    return out


def has_layout_rewrite(func) -> bool:
    """Whether a scheduled kernel repacks a weight (a preprocessing block SplitLayoutRewritePreproc
    moves out and FoldConstant folds)."""
    import tvm
    from tvm.s_tir import Schedule

    try:
        sch = Schedule(tvm.IRModule({"main": func}))
        return any("meta_schedule.layout_rewrite_preproc" in sch.get(b).annotations for b in _blocks(sch))
    except Exception:  # noqa: BLE001 - not a block-structured kernel: nothing to split
        return False


def hand_written_kind(func) -> str | None:
    """The class of one of graphgen's kernels written in TIR (:mod:`graphgen.tune.max_pool_stride2`),
    which are scheduled as written and counted with the default schedules; None for any other."""
    kind = func.attrs.get("graphgen.kind") if func.attrs is not None else None
    return None if kind is None else str(kind)


def apply_default_schedules(mod, target, stats, isa: Isa | None = None):
    """Schedule every fused kernel not yet scheduled (e.g. by the tuning database), sized for
    ``isa`` (default: the target's)."""
    from tvm import tirx

    isa = isa or isa_of(target)
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
            kind = hand_written_kind(func)
            if kind is not None:
                stats.default += 1
                stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
            continue
        try:
            new, kind = schedule_func(func, isa, fallbacks=stats.default_fallbacks)
        except NotMatched:
            continue
        except Exception as e:  # noqa: BLE001 - a kernel we cannot schedule keeps the plain lowering
            msg = str(e).strip().splitlines()
            stats.default_failures.append(f"{gv.name_hint}: {msg[-1][:160] if msg else type(e).__name__}")
            continue
        updates[gv] = new.with_attr("tirx.is_scheduled", True)
        stats.default += 1
        stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
    for gv, f in updates.items():
        mod[gv] = f
    return mod
