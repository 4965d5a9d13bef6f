"""Concats whose pieces the producing kernels write in place (graphgen.tune.concat_inplace):
rewritten only where the pieces are contiguous and private to the concat, and every build
still matches onnxruntime (fp32, relative L2 < 1e-5)."""

from __future__ import annotations

import pytest

from graphgen.builder import GraphBuilder
from graphgen.tune.concat_inplace import _concat_axis
from graphgen.verify import DEFAULT_TOLERANCE, compare, random_inputs, run_onnxruntime


def _fire(batch: int = 1, reuse_piece: bool = False, input_piece: bool = False, pieces: int = 2, pool: bool = False,
          shared_second: bool = False, read_after: bool = False):
    """SqueezeNet's fire module tail: 1x1 and 3x3 expand convs of one input, concatenated."""
    b = GraphBuilder("fire")
    x = b.input("input", (batch, 8, 12, 12))
    s = b.relu(b.conv(x, 8, 1, name="squeeze"))
    outs = [b.relu(b.conv(s, 16, 1, name="e1")), b.relu(b.conv(s, 16, 3, padding=1, name="e3"))]
    if pieces == 3:
        outs.append(b.relu(b.conv(s, 8, 1, name="e1b")))
    if input_piece:
        outs.append(s)  # a piece that is not a kernel's output of its own (the squeeze output)
    if reuse_piece:
        outs.append(b.relu(b.conv(outs[0], 8, 1, name="again")))  # the first piece is read before the concat
    if shared_second:
        outs.append(b.relu(b.conv(outs[1], 8, 1, name="again")))  # a later piece is read elsewhere too
    y = b.concat(outs, axis=1)
    if pool:
        y = b.max_pool(y, 3, stride=2)
    if read_after:
        # the first piece is read after the concat too (as the concat's own reader does)
        y = b.concat([b.relu(b.conv(y, 8, 1, name="after")), b.relu(b.conv(outs[0], 8, 1, name="late"))], axis=1)
    b.output(y, "out")
    return b.build()


def _dense_block(layers: int = 3):
    """DenseNet's block: every layer's features concatenated onto all before them."""
    b = GraphBuilder("dense")
    x = b.max_pool(b.relu(b.conv(b.input("input", (1, 3, 16, 16)), 8, 3, padding=1, name="stem")), 2, stride=2)
    for i in range(layers):
        y = b.relu(b.conv(b.relu(b.conv(x, 16, 1, name=f"l{i}a")), 4, 3, padding=1, name=f"l{i}b"))
        x = b.concat([x, y], axis=1)
    b.output(b.relu(b.conv(x, 8, 1, name="transition")), "out")
    return b.build()


def _build(model, tmp_path, monkeypatch, enabled: bool = True, target: str = "x86"):
    """(comparison with onnxruntime or None where the target does not run here, concats
    written in place)."""
    from graphgen.compile import compile_model, resolve_target, run_library

    monkeypatch.setenv("GRAPHGEN_CONCAT_IN_PLACE", "1" if enabled else "0")
    spec = resolve_target(target)
    info = compile_model(model, spec, tmp_path / "m.so")
    n = info["schedules"]["concats_in_place"]
    if not spec.host_runnable:
        return None, n
    x = random_inputs(model)
    got = run_library(tmp_path / "m.so", spec, model, x)
    return compare(got, run_onnxruntime(model, x), ["out"], DEFAULT_TOLERANCE), n


@pytest.mark.parametrize("case", [dict(), dict(pieces=3), dict(pool=True), dict(reuse_piece=True)],
                         ids=["two", "three", "then-pool", "first-piece-read-before-the-concat"])
def test_contiguous_private_pieces_are_written_in_place_and_match_onnxruntime(tmp_path, monkeypatch, case):
    cmp, n = _build(_fire(**case), tmp_path, monkeypatch)
    assert cmp.ok, cmp.summary()
    assert n == 1


def test_a_chain_of_concats_is_one_buffer_each_a_prefix_of_the_next(tmp_path, monkeypatch):
    """DenseNet: concat(concat(x, f1), f2) ...: every layer's features are written once."""
    cmp, n = _build(_dense_block(3), tmp_path, monkeypatch)
    assert cmp.ok, cmp.summary()
    assert n == 3


def test_a_first_piece_read_after_the_concat_keeps_its_copy(tmp_path, monkeypatch):
    """The late reader could find the concat's buffer gone; only the second concat (of two
    private kernel outputs) is rewritten."""
    cmp, n = _build(_fire(read_after=True), tmp_path, monkeypatch)
    assert cmp.ok, cmp.summary()
    assert n == 1


def test_switched_off_the_same_model_keeps_its_copy(tmp_path, monkeypatch):
    cmp, n = _build(_fire(), tmp_path, monkeypatch, enabled=False)
    assert cmp.ok, cmp.summary()
    assert n == 0


@pytest.mark.parametrize("case", [dict(batch=2), dict(shared_second=True), dict(input_piece=True)],
                         ids=["batch-2-pieces-not-contiguous", "later-piece-read-elsewhere", "piece-not-a-kernel-output"])
def test_concats_that_cannot_be_written_in_place_are_left_and_still_match(tmp_path, monkeypatch, case):
    cmp, n = _build(_fire(**case), tmp_path, monkeypatch)
    assert cmp.ok, cmp.summary()
    assert n == 0


@pytest.mark.parametrize("target", ["arm", "armv7"])
def test_in_place_concats_compile_for_the_boards(tmp_path, monkeypatch, target):
    cmp, n = _build(_fire(), tmp_path, monkeypatch, target=target)
    assert cmp is None and n == 1


def test_concat_axis_needs_matching_other_dims_and_unit_leading_dims():
    assert _concat_axis([(1, 4, 5, 5), (1, 6, 5, 5)], (1, 10, 5, 5)) == 1
    assert _concat_axis([(2, 4, 5, 5), (2, 6, 5, 5)], (2, 10, 5, 5)) is None  # batch 2: strided pieces
    assert _concat_axis([(1, 4, 5, 5), (1, 4, 5, 5)], (1, 4, 10, 5)) is None  # leading channel dim 4
    assert _concat_axis([(1, 4, 5, 5), (1, 4, 6, 5)], (1, 10, 5, 5)) is None
    assert _concat_axis([(4, 5), (6, 5)], (10, 5)) == 0


def test_the_choice_is_recorded_and_a_build_like_it_replays_it(tmp_path, monkeypatch):
    """``build.schedules.concat_in_place`` records the choice; a build "like" it (the armv7
    kernel check's host reference) gets the same kernels whatever the environment says then."""
    from graphgen.compile import compile_model, resolve_target
    from graphgen.emulate.kernels import _schedule_as

    spec = resolve_target("x86")
    monkeypatch.setenv("GRAPHGEN_CONCAT_IN_PLACE", "0")
    off = compile_model(_fire(), spec, tmp_path / "off.so")["schedules"]
    assert off["concat_in_place"] is False and off["concats_in_place"] == 0
    monkeypatch.setenv("GRAPHGEN_CONCAT_IN_PLACE", "1")
    like_off = compile_model(_fire(), spec, tmp_path / "like.so", **_schedule_as(spec, off))["schedules"]
    assert like_off["concat_in_place"] is False and like_off["concats_in_place"] == 0
    on = compile_model(_fire(), spec, tmp_path / "on.so")["schedules"]
    assert on["concat_in_place"] is True and on["concats_in_place"] == 1
    # manifests from before in-place concats: none
    assert _schedule_as(spec, {"pipeline": "graphgen", "winograd": "auto"})["concat_in_place"] is False
