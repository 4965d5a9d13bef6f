"""Kernels cut along the image for the threads they are built for (``defaults.position_chunks``,
``pointwise.computes_rest_apart``): each thread computes its own part of the image for every
channel block, so it reads the input rows of that part only, which the kernel before left in
its own core's cache. Schedule structure at one and two threads, and every such kernel
against onnxruntime (fp32, relative L2 < 1e-5)."""

import pytest

from graphgen.compile import resolve_target
from graphgen.testing import compile_and_compare, parallel_loops, scheduled_kernel_tir, single_conv_model
from graphgen.tune.defaults import CHUNK_EVERY_TILE_MAX, isa_of, position_chunks
from graphgen.tune.pipeline import tuning_target

TOL = 1e-5


@pytest.mark.parametrize("tiles, threads, chunks", [
    (63, 1, 1),     # one thread: never cut
    (64, 2, 2),     # even: one chunk per thread
    (63, 2, 3),     # 3 x 21: the smallest divisor above 2 (one chunk's channel blocks shared)
    (49, 2, 7),     # 7 x 7
    (12, 4, 4),
    (10, 4, 5),
    (3, 2, 3),      # few tiles: each its own chunk (the order "positions outside")
    (13, 2, 1),     # a prime count past CHUNK_EVERY_TILE_MAX per thread: not cut
    (1, 2, 1),      # nothing to cut
])
def test_position_chunks(tiles, threads, chunks):
    assert position_chunks(tiles, threads) == chunks


def test_every_tile_its_own_chunk_only_for_few_tiles():
    assert position_chunks(CHUNK_EVERY_TILE_MAX * 2 - 1, 2) == CHUNK_EVERY_TILE_MAX * 2 - 1  # 7: prime, few
    assert position_chunks(11, 2) == 1  # prime, more than 4 per thread


def test_the_isa_carries_the_targets_thread_count():
    spec = resolve_target("avx512", threads=3)
    assert isa_of(tuning_target(spec)).threads == 3
    assert isa_of(spec.tvm_target(), threads=2).threads == 2
    assert isa_of(resolve_target("avx512").tvm_target()).threads == 1  # no num-cores: one


def test_a_squeeze_gemm_is_cut_along_the_image_first_on_two_threads():
    """SqueezeNet's 64 -> 16 at 55x55: 63 tiles of 48 positions x 2 channel blocks. One thread:
    channel blocks outside; two: 3 chunks of the image outside the channel blocks."""
    model = single_conv_model(64, 16, 55, kernel=1, padding=0)
    assert parallel_loops(scheduled_kernel_tir(model, 1))[0] == "n_k_0_p_0_fused"
    assert parallel_loops(scheduled_kernel_tir(model, 2))[0] == "n_p_0_0_k_0_p_0_1_fused"


def test_a_14x14_gemm_computes_its_last_positions_apart_on_two_threads():
    """196 positions: padded to 208 (a copy of the input) on one thread; 192 + 4 on two, the 192
    in 3 tiles of 64, each its own chunk (positions outside)."""
    model = single_conv_model(116, 116, 14, kernel=1, padding=0)
    one, two = scheduled_kernel_tir(model, 1), scheduled_kernel_tir(model, 2)
    assert "pointwise_data_pad" in one and "pointwise_gemm_rest" not in one
    assert "pointwise_data_pad" not in two and "pointwise_gemm_rest" in two
    assert parallel_loops(two)[0] == "n_p_0_k_0_fused"


def test_a_phase_split_stem_is_cut_by_rows_on_two_threads_and_a_depthwise_one_is_not():
    stem = single_conv_model(3, 64, 37, padding=0, stride=2)  # 18 output rows: 2 chunks of 9
    assert parallel_loops(scheduled_kernel_tir(stem, 1))[-1] == "n_k_0_y_0_fused"
    assert parallel_loops(scheduled_kernel_tir(stem, 2))[-1] == "n_y_0_0_k_0_y_0_1_fused"
    depthwise = single_conv_model(32, 32, 28, groups=32)
    one, two = scheduled_kernel_tir(depthwise, 1), scheduled_kernel_tir(depthwise, 2)
    assert "phase_depthwise" in two  # the row kernel, whose rows the phase-split stem's code cuts
    assert parallel_loops(one) == parallel_loops(two)
    assert parallel_loops(two)[-1] == "n_k_0_fused"  # channel blocks, each copying its own padded rows


def test_a_direct_conv_is_cut_by_rows_where_its_input_outweighs_its_weights():
    """ResNet-18's 64 -> 128 3x3/2 at 56x56 (input 0.86 MB, weights 0.3 MB, 28 rows): rows
    cut in two on two threads. Its 512 -> 512 at 7x7 (weights 9.4 MB): channel blocks, as on
    one thread."""
    strided = single_conv_model(64, 128, 56, stride=2)
    assert parallel_loops(scheduled_kernel_tir(strided, 1))[-1] == "nn_ff_0_yy_0_fused"
    assert parallel_loops(scheduled_kernel_tir(strided, 2))[-1] == "nn_yy_0_0_ff_0_yy_0_1_fused"
    heavy = single_conv_model(512, 512, 7)
    assert parallel_loops(scheduled_kernel_tir(heavy, 1)) == parallel_loops(scheduled_kernel_tir(heavy, 2))
    assert parallel_loops(scheduled_kernel_tir(heavy, 2))[-1] == "nn_ff_0_yy_0_fused"  # the direct conv, by channels


CASES = {
    "squeeze_55": (dict(c=64, k=16, h=55, kernel=1, padding=0), "pointwise conv2d"),      # 3 chunks of 21 tiles
    "squeeze_27": (dict(c=256, k=32, h=27, kernel=1, padding=0), "pointwise conv2d"),
    "apart_14": (dict(c=116, k=116, h=14, kernel=1, padding=0), "pointwise conv2d"),     # 192 + 4, tiles as chunks
    "apart_14_residual": (dict(c=96, k=96, h=14, kernel=1, padding=0, residual=True), "pointwise conv2d"),
    "write_back_28": (dict(c=58, k=58, h=28, kernel=1, padding=0), "pointwise conv2d"),  # rows padded to 60
    "rows_112": (dict(c=16, k=96, h=112, kernel=1, padding=0), "pointwise conv2d"),      # tiles in the output rows
    "whole_56_batch2": (dict(c=24, k=40, h=56, kernel=1, padding=0, batch=2), "pointwise conv2d"),
    "stem_3x3_2": (dict(c=3, k=64, h=37, padding=0, stride=2), "conv2d (phase-split)"),   # 18 rows
    "stem_7x7_2": (dict(c=3, k=16, h=40, kernel=7, padding=3, stride=2), "conv2d (phase-split)"),
    "conv_3x3_2": (dict(c=32, k=64, h=28, stride=2), "conv2d"),                          # 14 rows: 2 chunks
    "conv_3x3_2_batch2": (dict(c=16, k=32, h=32, stride=2, batch=2), "conv2d"),
}


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_cut_for_several_threads_match_onnxruntime(name, threads, tmp_path):
    kwargs, kind = CASES[name]
    kinds, c = compile_and_compare(single_conv_model(**kwargs), tmp_path, "x86", TOL, threads=threads)
    assert kinds == {kind: 1}, kinds
    assert c.ok, c.summary()


@pytest.mark.parametrize("target", ["arm", "armv7"])
def test_kernels_cut_for_a_boards_four_threads_compile(target, tmp_path):
    for name in ("squeeze_55", "apart_14", "stem_3x3_2"):
        kwargs, kind = CASES[name]
        (tmp_path / name).mkdir()
        kinds, c = compile_and_compare(single_conv_model(**kwargs), tmp_path / name, target, TOL, threads=4)
        assert kinds == {kind: 1}, kinds
        assert c is None  # not runnable here


def test_the_build_records_the_thread_count_its_kernels_were_scheduled_for(tmp_path):
    from graphgen.compile import compile_model

    model = single_conv_model(16, 16, 14, kernel=1, padding=0)
    for threads in (1, 3):
        info = compile_model(model, resolve_target("x86", threads=threads), tmp_path / f"m{threads}.so")
        assert info["schedules"]["threads"] == threads
