"""The CPU compile pipeline graphgen uses, shared by tuning and building.

Tuning and building must see the same fused kernels, or the database's workload keys would
never match; both therefore run :func:`fuse` first:

    decompose -> legalize (Relax ops to TIR) -> fold constants -> fuse -> mark weights
    layout-free

Marking the weights (constants in graphgen's libraries) layout-free lets a schedule repack
them (``cpu_weight_prepack`` in TVM's static_shape_tuning pipeline): the repacking runs once at
compile time (:func:`finish` folds it into the constants), and the library's interface stays
the same.

Then, for every fused kernel: the tuning database's best schedule when it has one, else
graphgen's default schedule (:mod:`graphgen.tune.defaults`), else TVM's plain lowering.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def num_cores_for(spec) -> int:
    """Cores a schedule should parallelize over: the host's physical cores for host targets,
    the target JSON's ``num-cores`` when given, else 4 (most ARM boards)."""
    if "num-cores" in spec.tvm_json:
        return int(spec.tvm_json["num-cores"])
    if spec.host_runnable:
        try:
            import psutil

            return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
        except Exception:  # noqa: BLE001
            return os.cpu_count() or 1
    return 4


def tuning_target_json(spec) -> dict:
    d = dict(spec.tvm_json)
    d.setdefault("num-cores", num_cores_for(spec))
    return d


def tuning_target(spec):
    import tvm

    return tvm.target.Target(tuning_target_json(spec))


def fuse(mod, target, layout_rewrite: bool = True, winograd: str | None = None, pointwise: bool | None = None,
         isa=None):
    """Relax module -> fused TIR kernels (what MetaSchedule extracts tasks from).

    ``layout_rewrite=False`` leaves the weights' layout alone (schedules then read them in
    place). ``winograd``: which 3x3 convs become Winograd kernels
    (:func:`graphgen.tune.winograd.resolve_mode`; default: the environment's); ``pointwise``:
    whether 1x1 convs become pointwise GEMM kernels (:func:`graphgen.tune.pointwise.enabled`).
    The weights are the module's constants, or its parameters after ``num_input``
    (``params_as_inputs``): those are repacked by kernels the library runs on every call.
    ``isa``: the ISA graphgen's kernels are shaped for (vector widths, weight blocks), where a
    build is scheduled like another target's; default: the target's.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as rp

    from graphgen.tune import fold_constant_calls
    from graphgen.tune.conv_call import legalizing_for
    from graphgen.tune.winograd import legalize_map

    with target, legalizing_for(isa):
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            *rp.library_dispatch_passes(target),
            # graphgen's conv kernels: 3x3 stride-1 convs as Winograd kernels
            # (graphgen.tune.winograd), 1x1 convs as pointwise GEMMs (graphgen.tune.pointwise);
            # the other convs and every other op as TVM's
            relax.transform.LegalizeOps(customize_legalize_map=legalize_map(winograd, pointwise)),
            relax.transform.AnnotateTIROpPattern(),
            fold_constant_calls.pass_(),  # one build for all calls on constants, see there
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            *([relax.transform.AttachAttrLayoutFreeBuffers()] if layout_rewrite else []),
        ])(mod)


def extract_tasks(fused_mod, target):
    """MetaSchedule's tuning tasks: every fused kernel but graphgen's hand-written ones
    (``tirx.is_scheduled``, e.g. :mod:`graphgen.tune.max_pool_stride2`), which no search changes,
    and those fused with one (:mod:`graphgen.tune.depthwise_stride2`: MetaSchedule cannot even
    serialize its vector expressions, "Do not have a default for prim.Broadcast"); those keep
    their default schedule."""
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(fused_mod, target, module_equality="structural")
    return [t for t in tasks
            if not any(isinstance(f, tirx.PrimFunc) and (_is_scheduled(f) or _has_hand_written_block(f))
                       for f in t.dispatched[0].functions.values())]


def _has_hand_written_block(func) -> bool:
    """Whether ``func`` holds the block of graphgen's hand-written stride-2 depthwise kernel."""
    import tvm
    from tvm.s_tir import Schedule

    from graphgen.tune.defaults import _blocks
    from graphgen.tune.depthwise_stride2 import BLOCK

    try:
        sch = Schedule(tvm.IRModule({"main": func}))
        return any(sch.get(b).name_hint == BLOCK for b in _blocks(sch))
    except Exception:  # noqa: BLE001 - not a block-structured kernel: not this one
        return False


@dataclass
class ScheduleStats:
    kernels: int = 0
    from_database: int = 0
    default: int = 0
    plain: int = 0
    default_failures: list[str] = field(default_factory=list)
    default_fallbacks: list[str] = field(default_factory=list)  # class schedules that raised: generic used
    kinds: dict = field(default_factory=dict)  # default-schedule class -> kernels
    concats_in_place: int = 0  # concats whose pieces are written in place (concat_inplace)

    def as_dict(self) -> dict:
        d = {"kernels": self.kernels, "from_database": self.from_database, "default_schedule": self.default,
             "plain_lowering": self.plain}
        if self.kinds:
            d["default_schedule_kinds"] = dict(sorted(self.kinds.items()))
        if self.default_failures:
            d["default_schedule_failures"] = self.default_failures[:10]
        if self.default_fallbacks:
            d["default_schedule_fallbacks"] = self.default_fallbacks[:10]
        d["concats_in_place"] = self.concats_in_place
        return d


def _is_scheduled(func) -> bool:
    attrs = func.attrs
    return bool(attrs is not None and attrs.get("tirx.is_scheduled", False))


def schedule_kernels(mod, target, database=None, default_schedules: bool = True, stats: ScheduleStats | None = None,
                     isa=None):
    """Give every fused kernel a schedule: the database's best, else graphgen's default.

    ``isa`` (a :class:`graphgen.tune.defaults.Isa`) sizes the default schedules; default: the
    target's own.
    """
    from tvm import relax, tirx

    from graphgen.tune.defaults import hand_written_kind

    stats = stats if stats is not None else ScheduleStats()
    funcs = [(gv, f) for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    stats.kernels = len(funcs)
    if database is not None:
        with target, database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        stats.from_database = sum(1 for _, f in mod.functions.items()
                                  if isinstance(f, tirx.PrimFunc) and _is_scheduled(f) and hand_written_kind(f) is None)
    if default_schedules:
        from graphgen.tune.defaults import apply_default_schedules

        mod = apply_default_schedules(mod, target, stats, isa)
    stats.plain = stats.kernels - stats.from_database - stats.default
    return _drop_unused_layout_free(_reparse_ill_formed(mod))


def _reparse_ill_formed(mod):
    """Kernels a schedule left ill-formed, printed and parsed again.

    ``loop_partition`` (see ``defaults._image_vectorize``) gives both partitions of a block the
    same iterator variables. Lowering does not mind, but no Schedule can be made of the result,
    and the layout-rewrite checks below make one (they would take the kernel for one without a
    weight to repack: the weights repacked on every call). TVMScript's parser defines each
    block's variables anew.
    """
    import tvm
    from tvm import tirx
    from tvm.s_tir import Schedule

    for gv, f in list(mod.functions.items()):
        if not isinstance(f, tirx.PrimFunc):
            continue
        try:
            Schedule(tvm.IRModule({"main": f}))
        except Exception:  # noqa: BLE001 - ill-formed (the only reason a scheduled kernel is refused)
            mod[gv] = tvm.script.from_source(f.script())
    return mod


def _drop_unused_layout_free(mod):
    """Keep the ``layout_free_buffers`` mark only on kernels that repack a weight.

    SplitLayoutRewritePreproc visits every kernel carrying the mark and refuses some it has
    nothing to do with (measured: SSDlite's NonMaxSuppression tail, "There should be a compute
    block if there is only one subtree under the root").
    """
    from tvm import tirx

    from graphgen.tune.defaults import has_layout_rewrite

    updates = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and "layout_free_buffers" in f.attrs \
                and not has_layout_rewrite(f):
            updates[gv] = f.without_attr("layout_free_buffers")
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def finish(mod, target, stats: ScheduleStats | None = None, concat_in_place: bool = True):
    """Fold the weight repacking into the constants, lower Relax to the VM (with
    ``concat_in_place``, concats whose pieces can be written in place are:
    :mod:`graphgen.tune.concat_inplace`)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as rp

    from graphgen.tune import concat_inplace, fold_constant_calls

    counted: dict = {}
    with target:
        mod = _split_layout_rewrite(mod)
        mod = tvm.transform.Sequential([
            # the repacking calls evaluated with one build (FoldConstant would build each alone)
            fold_constant_calls.pass_(),
            relax.transform.FoldConstant(),
            # the folded repacking left tuples of constants and their items bound beside the
            # calls, which read the constants themselves: dead, yet the VM built and took apart
            # every tuple on each run (3 builtin calls per repacked kernel: 169 of ShuffleNet
            # V2's 560 VM calls a run)
            relax.transform.CanonicalizeBindings(),
            # the repacking kernels ran above and the kernels SplitLayoutRewritePreproc
            # replaced are no longer called: without this they stay in the library (measured:
            # SqueezeNet armv7, 36 dead kernels beside 26 live ones)
            relax.transform.DeadCodeElimination(),
            # rp.dataflow_lower_passes, with the concats rewritten before CallTIRRewrite
            # allocates the kernels' outputs
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            *([concat_inplace.pass_(counted)] if concat_in_place else []),
            relax.transform.CallTIRRewrite(),
            *rp.finalize_passes(target),
        ])(mod)
        if stats is not None:
            stats.concats_in_place = counted.get("concats_in_place", 0)
        return mod


def _split_layout_rewrite(mod):
    """SplitLayoutRewritePreproc over the kernels that repack a weight, and only those.

    The pass visits every TIR function of the module and refuses some it has nothing to do
    with (measured: SSDlite's top-k / scatter kernels, whose bodies are extern calls: "There
    should be a compute block if there is only one subtree under the root"). So it runs on a
    module holding the Relax functions and the repacking kernels; the other kernels are put
    back unchanged.
    """
    import tvm
    from tvm import relax, tirx

    from graphgen.tune.defaults import has_layout_rewrite

    kernels = {gv: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    repack = {gv for gv, f in kernels.items() if has_layout_rewrite(f)}
    if not repack:
        return mod
    sub = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in kernels or gv in repack},
                       attrs=mod.attrs, global_infos=mod.global_infos)
    out = relax.transform.SplitLayoutRewritePreproc()(sub)
    for gv, f in kernels.items():
        if gv not in repack:
            out[gv] = f
    return out


def cpu_pipeline(target, database=None, default_schedules: bool = True, stats: ScheduleStats | None = None,
                 layout_rewrite: bool = True, isa=None, winograd: str | None = None, pointwise: bool | None = None,
                 concat_in_place: bool = True):
    """A relax_pipeline for ``tvm.compile``: fuse, schedule every kernel, finish."""
    import tvm

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        mod = fuse(mod, target, layout_rewrite, winograd, pointwise, isa)
        mod = schedule_kernels(mod, target, database, default_schedules, stats, isa)
        return finish(mod, target, stats, concat_in_place)

    return _pipeline


def compile_cpu(mod, spec, database, default_schedules: bool, info: dict, log=None, layout_rewrite: bool = True,
                schedule_like=None, winograd: str | None = None, pointwise: bool | None = None,
                concat_in_place: bool | None = None):
    """``tvm.compile`` a Relax module for a CPU ``spec`` with :func:`cpu_pipeline`.

    ``database`` is a database folder (or None). A database that cannot be used is reported
    in one line (through ``log``, and ``info["schedules"]["database_note"]``) and the build
    goes on without it; so does a build whose database records fail to apply.

    ``schedule_like`` (another CPU target spec) schedules the kernels as a build for that
    target would: its ISA sizes the default schedules (so weights are repacked into the same
    blocks) and ``database`` is that target's. The armv7 kernel check compiles its x86
    reference this way, so that both libraries' kernels take identically laid-out arguments.
    """
    import tvm

    from graphgen.tune import database as dbm
    from graphgen.tune import prefetch_weights, stack_tiles
    from graphgen.tune.defaults import isa_of
    from graphgen.tune.winograd import resolve_mode

    log = log or (lambda msg: None)
    winograd = resolve_mode(winograd)
    from graphgen.tune.pointwise import enabled as pointwise_enabled

    pointwise = pointwise_enabled(pointwise)
    from graphgen.tune.concat_inplace import enabled as concat_in_place_enabled

    concat_in_place = concat_in_place_enabled(concat_in_place)
    target = spec.tvm_target()
    like = schedule_like or spec
    isa = isa_of(like.tvm_target(), threads=num_cores_for(like))
    notes: list[str] = []
    opened = None
    if database is not None:
        opened = dbm.open_database(database, tuning_target_json(like), create_missing=False, report=notes.append,
                                   snapshot=True)
    stats = ScheduleStats()
    attempts = [(opened, default_schedules)]
    if opened is not None:
        attempts.append((None, default_schedules))
    attempts.append((None, None))  # last resort: TVM's own default pipeline, as before graphgen's
    for i, (db, defaults) in enumerate(attempts):
        stats = ScheduleStats()
        try:
            if defaults is None:
                from tvm import relax

                executable = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
            else:
                executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(
                    target, db.tvm_db if db else None, defaults, stats, layout_rewrite, isa, winograd, pointwise,
                    concat_in_place), tir_pipeline=stack_tiles.register())
            opened = db
            pipeline = "tvm-default" if defaults is None else "graphgen"
            break
        except Exception as e:  # noqa: BLE001 - fall back to a safer pipeline, say so
            if i == len(attempts) - 1:
                raise
            lines = str(e).strip().splitlines()
            why = lines[-1][:160] if lines else type(e).__name__
            if db is not None:
                notes.append(f"tuning database {db.path} could not be applied ({why}); built without it")
            else:
                notes.append(f"graphgen's CPU pipeline failed ({why}); built with TVM's default pipeline")
    if stats.default_fallbacks:
        notes.append(f"{len(stats.default_fallbacks)} kernel(s) got the generic schedule because their class's "
                     f"schedule raised (first: {stats.default_fallbacks[0]}); see build.schedules."
                     "default_schedule_fallbacks")
    for n in notes:
        log(n)
    # what a build "like" this one needs to reproduce its kernels' signatures (the armv7 kernel check)
    info["schedules"] = {**stats.as_dict(), "database": str(opened.path) if opened else None,
                         "pipeline": pipeline, "isa": isa.name if pipeline == "graphgen" else None,
                         "threads": isa.threads if pipeline == "graphgen" else None,
                         "default_schedules": bool(default_schedules) and pipeline == "graphgen",
                         "layout_rewrite": layout_rewrite and pipeline == "graphgen",
                         "winograd": winograd if pipeline == "graphgen" else "off",
                         "pointwise": pointwise and pipeline == "graphgen",
                         "concat_in_place": concat_in_place and pipeline == "graphgen",
                         "stack_tiles": stack_tiles.enabled() and pipeline == "graphgen",
                         "prefetch_weights": prefetch_weights.enabled() and pipeline == "graphgen"
                         and prefetch_weights.applies_to(target)}
    if opened is not None:
        info["schedules"]["database_records"] = opened.info.records
        # kernels whose record the tuner chose by timing its fastest schedules again (chosen.json)
        info["schedules"]["database_choices"] = sum(1 for h in opened.info.choices if opened.info.chosen_key(h))
    if notes:
        info["schedules"]["database_note"] = "; ".join(notes)
    return executable
