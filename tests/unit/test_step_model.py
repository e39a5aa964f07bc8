"""The step model in one process: byte formulas worked by hand, the overlap of gradient buckets, calibration files.

Its bytes against a real step on spawned ranks: tests/multiprocess/test_step_traffic.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from hybrid_ext.comm.cost_model import CostModel
from hybrid_ext.parallel import make_plan
from hybrid_ext.parallel.layer_profile import (
    LayerRecord,
    LayerTable,
    _fixed_part,
    layer_shapes,
    load_calibration,
    profile_layers,
    save_calibration,
)
from hybrid_ext.parallel.step_model import compute_fraction, predict_step
from hybrid_ext.parallel.step_traffic import Links, gradient_transfers, step_transfers

from helpers.parallel_reference import head_heavy_cnn, small_cnn

pytestmark = pytest.mark.timeout(120)

B = 4  # samples per rank


def _small_cnn_transfers(strategy: str, world: int, rank: int, mp_size: int | None = None):
    model = small_cnn()
    table = layer_shapes(model, torch.randn(1, 3, 16, 16))
    styles = make_plan(model, strategy).styles
    return step_transfers(model, table, styles, strategy, world, mp_size or world, rank, B, links=Links("shm"))


def _sent(transfers, name: str, phase: str, collective: str) -> int:
    return sum(t.bytes_sent for t in transfers if (t.name, t.phase, t.collective) == (name, phase, collective))


def test_hybrid_bytes_on_two_ranks_by_hand():
    """small_cnn's head: 7 = Linear(192, 100) column, 10 = Linear(100, 64) row, 12 = Linear(64, 10) column_last."""
    transfers = _small_cnn_transfers("hybrid", 2, 0)
    f32, counts = 4, 8  # one int64 per rank: the other rank's count is all it sends
    assert _sent(transfers, "7", "forward", "counts") == counts
    assert _sent(transfers, "7", "forward", "allgather") == B * 192 * f32  # my rows go to the other rank
    assert _sent(transfers, "7", "backward", "reduce_scatter") == B * 192 * f32  # the other rank's rows' gradients
    assert _sent(transfers, "10", "forward", "reduce_scatter") == B * 64 * f32
    assert _sent(transfers, "10", "backward", "allgather") == B * 64 * f32
    assert _sent(transfers, "12", "forward", "allgather") == B * 64 * f32
    # all-to-all: rank 0 holds features 0..4 of both ranks' rows; it sends rank 1's rows of its 5 features
    assert _sent(transfers, "12", "forward", "all_to_all") == B * 5 * f32
    assert _sent(transfers, "12", "backward", "all_to_all") == B * 5 * f32
    # Replicated: both convolutions and the row layer's bias (8·3·9 + 8 + 12·8·9 + 12 + 64); FC shards: no replica.
    (gradients,) = [t for t in transfers if t.phase == "gradients"]
    assert gradients.elements == 216 + 8 + 864 + 12 + 64
    assert gradients.bytes_sent == gradients.elements * f32  # both butterflies send n bytes on two ranks
    assert gradients.layers == ("10", "3", "0")  # reversed registration order, the reducer's


def test_uneven_all_to_all_on_three_ranks():
    """64 → 10 features over 3 ranks: shards of 3, 3 and 4 features."""
    transfers = _small_cnn_transfers("hybrid", 3, 2)
    assert _sent(transfers, "12", "forward", "all_to_all") == 2 * B * 4 * 4  # my 4 features of both others' rows
    assert _sent(transfers, "12", "backward", "all_to_all") == B * (3 + 3) * 4  # my rows of their features
    assert compute_fraction("column", "7", dict(small_cnn().named_modules()), 3, 2) == 34 / 100


def test_mp_bytes_by_hand():
    """mp on 2 ranks: every rank holds the global batch of 2·B samples."""
    transfers = _small_cnn_transfers("mp", 2, 1)
    rows, f32 = 2 * B, 4
    # conv 0: its input needs no gradient, so only its output channels (4 of 8, 16×16) are gathered
    assert _sent(transfers, "0", "forward", "allgather") == 4 * rows * 16 * 16 * f32
    assert _sent(transfers, "0", "backward", "allreduce") == 0
    # conv 3 (input 8×8×8): its input's gradient is summed over both ranks (two ranks: n bytes either way)
    assert _sent(transfers, "3", "backward", "allreduce") == rows * 8 * 8 * 8 * f32
    assert _sent(transfers, "10", "forward", "allreduce") == rows * 64 * f32  # the row layer's partial sums
    assert not [t for t in transfers if t.phase == "gradients"]  # the same loss everywhere: no gradient traffic


def _copied(transfers, name: str, phase: str, collective: str) -> int:
    return sum(t.copied_bytes for t in transfers if (t.name, t.phase, t.collective) == (name, phase, collective))


def test_mp_copies_around_its_collectives_by_hand():
    """mp on 2 ranks, rows = 2·B: what the mappings copy in memory besides what they send."""
    transfers = _small_cnn_transfers("mp", 2, 1)
    rows, f32 = 2 * B, 4
    # conv 0 gathers 8 channels (4 each) of 16×16: my 4 moved to the front, all 8 moved back, my 4 of the gradient
    assert _copied(transfers, "0", "forward", "allgather") == (2 * 4 + 8) * rows * 16 * 16 * f32
    # conv 3's input gradient (8×8×8) is cloned before its in-place all-reduce; so are the row layer's partial sums
    assert _copied(transfers, "3", "backward", "allreduce") == rows * 8 * 8 * 8 * f32
    assert _copied(transfers, "10", "forward", "allreduce") == rows * 64 * f32
    # the last layer (10 outputs, 5 each) is gathered along features: 5 to the front, 10 back, 5 of the gradient
    assert _copied(transfers, "12", "forward", "allgather") == (2 * 5 + 10) * rows * f32


def test_hybrid_copies_around_the_all_to_all_by_hand():
    """hybrid on 2 ranks: the column_last layer's all-to-all concatenates my rows' 10 features (forward); backward
    makes the gradient's 10 feature blocks contiguous and concatenates both ranks' rows of my 5 features."""
    transfers = _small_cnn_transfers("hybrid", 2, 0)
    f32 = 4
    assert _copied(transfers, "12", "forward", "all_to_all") == B * 10 * f32
    assert _copied(transfers, "12", "backward", "all_to_all") == (B * 10 + 2 * B * 5) * f32
    assert _copied(transfers, "7", "forward", "allgather") == 0  # rows gather in place: nothing to re-lay


def test_copies_cost_the_tables_copy_rate_times_sigma():
    """1 ns per byte copied, every message free: mp's step grows by exactly its copied bytes × 1 ns × σ."""
    model = small_cnn()
    table = layer_shapes(model, torch.randn(1, 3, 16, 16))
    styles = make_plan(model, "mp").styles
    zero = CostModel(0, 0, 0)
    free = predict_step(model, table, styles, "mp", 2, 2, B, constants=zero, compute_scale=2.0)
    table.copy_s_per_byte = 1e-9
    priced = predict_step(model, table, styles, "mp", 2, 2, B, constants=zero, compute_scale=2.0)
    copied = sum(t.copied_bytes for t in step_transfers(model, table, styles, "mp", 2, 2, priced.rank, B))
    assert copied > 0
    assert priced.step_s - free.step_s == pytest.approx(copied * 1e-9 * 2.0)


def test_dp_buckets_follow_the_reducer():
    model = small_cnn()
    whole = sum(p.numel() for p in model.parameters())
    (one,) = gradient_transfers(model, {}, "dp", 2, 1, 0)
    assert one.elements == whole
    several = gradient_transfers(model, {}, "dp", 2, 1, 0, bucket_bytes=10_000)
    assert len(several) > 1 and sum(t.elements for t in several) == whole
    assert several[0].layers[0] == "12"  # the last layer's gradients come first in backward


def test_bad_input_is_named():
    model = small_cnn()
    table = layer_shapes(model, torch.randn(1, 3, 16, 16))
    styles = make_plan(model, "hybrid").styles
    with pytest.raises(ValueError, match="mp_size=3 does not divide the world size 4"):
        step_transfers(model, table, styles, "hybrid", 4, 3, 0, B)
    with pytest.raises(ValueError, match="unknown reducer 'fast'"):
        gradient_transfers(model, styles, "hybrid", 4, 2, 0, grad_algorithm="fast")
    with pytest.raises(ValueError, match="unknown strategy 'auto'"):
        predict_step(model, table, styles, "auto", 4, 2, B)


def _two_linears_table(forward_s: float, backward_s: float) -> tuple[nn.Module, LayerTable]:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    layers = {
        path: LayerRecord(path, "Linear", (4,), (4,), 4, path == "1", True, forward_s, backward_s)
        for path in ("0", "1")
    }
    return model, LayerTable(B, "cpu", layers)


def test_gradient_buckets_overlap_the_rest_of_backward():
    """Each layer: forward 1 s, backward 2 s; each layer's 20 parameters one bucket of 80 bytes, 4 s on the wire
    (β = 0.05 s/byte; two ranks send n bytes). Backward: layer 1 done at 2 s, layer 0 at 4 s. Bucket 0 (layer 1)
    runs 2–6 s, bucket 1 (layer 0) waits for it: 6–10 s. Exposed: 10 − 4 = 6 s; step 2 + 4 + 6 = 12 s."""
    model, table = _two_linears_table(1.0, 2.0)
    constants = CostModel(alpha=0.0, beta=0.05, gamma=0.0)
    step = predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, constants=constants)
    assert [x for b in step.buckets for x in (b.ready_s, b.start_s, b.end_s)] == pytest.approx([2, 2, 6, 4, 6, 10])
    assert step.forward_s == pytest.approx(2.0) and step.backward_s == pytest.approx(4.0)
    assert step.exposed_gradient_s == pytest.approx(6.0)
    assert step.step_s == pytest.approx(12.0) and step.compute_s == pytest.approx(6.0)
    assert step.exposed_communication_s == pytest.approx(6.0)
    assert step.samples_per_s == pytest.approx(2 * B / 12.0)
    # A slow backward hides the first bucket entirely: layer 0's backward ends at 20 s, its bucket at 24 s.
    model, table = _two_linears_table(1.0, 10.0)
    step = predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, constants=constants)
    assert step.exposed_gradient_s == pytest.approx(4.0)


def test_sharded_compute_scales_with_rows_and_features():
    """hybrid on 4 ranks: a column layer sees 4·b rows and holds a quarter of the features: its time is unchanged."""
    model, table = _two_linears_table(1.0, 2.0)
    step = predict_step(model, table, {"0": "column", "1": "row"}, "hybrid", 4, 4, B, constants=CostModel(0, 0, 0))
    assert [x for layer in step.layers for x in (layer.forward_s, layer.backward_s)] == pytest.approx([1, 2, 1, 2])
    step = predict_step(model, table, {"0": "column", "1": "row"}, "mp", 4, 4, B, constants=CostModel(0, 0, 0))
    assert step.compute_s == pytest.approx(6.0)  # 4·b rows everywhere, a quarter of the features
    step = predict_step(model, table, {}, "dp", 4, 1, 2 * B, constants=CostModel(0, 0, 0))
    assert step.compute_s == pytest.approx(12.0)  # twice the micro-batch the table was measured at


def test_the_fixed_part_of_a_layer_does_not_grow_with_rows():
    """Forward 1 s at b rows of which 0.5 s fixed (its weights), backward 2 s of which 1 s fixed. hybrid on 4 ranks:
    the column layer sees 4·b rows and holds a quarter of the features: (0.5 + 0.5·4)/4 and (1 + 1·4)/4."""
    model, table = _two_linears_table(1.0, 2.0)
    table.layers = {p: replace(r, forward_fixed_s=0.5, backward_fixed_s=1.0) for p, r in table.layers.items()}
    assert table.layers["0"].seconds_at(B, B) == pytest.approx((1.0, 2.0))
    assert table.layers["0"].seconds_at(4 * B, B) == pytest.approx((2.5, 5.0))
    step = predict_step(model, table, {"0": "column", "1": "row"}, "hybrid", 4, 4, B, constants=CostModel(0, 0, 0))
    assert [x for layer in step.layers for x in (layer.forward_s, layer.backward_s)] == pytest.approx(
        [0.625, 1.25, 0.625, 1.25]
    )
    step = predict_step(model, table, {}, "dp", 4, 1, B, constants=CostModel(0, 0, 0), compute_scale=2.0)
    assert step.compute_s == pytest.approx(2 * 6.0)  # at the table's own micro-batch: as measured, ×σ


def test_a_channel_shard_keeps_the_part_of_a_convolution_that_does_not_shrink_with_its_channels():
    """mp on 4 ranks, every row on every rank: a convolution's forward 1 s at b rows (4 s at 4·b) of which 0.2 of
    its time is fixed in its channels: a quarter of them (0.2 + 0.8/4)·4 = 1.6 s; its backward (2 s, 8 s at 4·b)
    none: 2 s. A Linear's shard: its share of the features, whatever the record says."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4, 4))
    table = layer_shapes(model, torch.randn(1, 3, 1, 1))
    timed = {"0": (1.0, 2.0, 0.2), "2": (1.0, 2.0, 0.5)}
    table.layers = {
        p: replace(r, forward_s=timed[p][0], backward_s=timed[p][1], forward_channel_fixed_s=timed[p][2])
        if p in timed else r
        for p, r in table.layers.items()
    }  # fmt: skip
    conv = table.layers["0"]
    assert conv.shard_share("channel", 0.25) == pytest.approx((0.4, 0.25))
    assert conv.shard_share("channel", 1.0) == (1.0, 1.0)  # whole: as measured
    assert table.layers["2"].shard_share("column", 0.25) == (0.25, 0.25)
    step = predict_step(model, table, {"0": "channel", "2": "column"}, "mp", 4, 4, 1, constants=CostModel(0, 0, 0))
    layers = {layer.path: (layer.forward_s, layer.backward_s) for layer in step.layers}
    assert layers["0"] == pytest.approx((1.6, 2.0)) and layers["2"] == pytest.approx((1.0, 2.0))
    step = predict_step(model, table, {}, "dp", 4, 1, 1, constants=CostModel(0, 0, 0))
    assert step.compute_s == pytest.approx(6.0)  # replicated: every layer whole, as measured


def test_the_part_fixed_in_the_channels_is_timed_on_a_copy_with_half_of_them(monkeypatch):
    """Which convolutions are timed at half their channels, and the intercept at none of the line through the
    two times."""
    from hybrid_ext.parallel import layer_profile
    from hybrid_ext.parallel.layer_profile import _fixed_in_channels, _half_channels

    conv = nn.Conv2d(4, 9, 3, stride=2, padding=1, bias=False)
    half = _half_channels(conv)
    assert (half.in_channels, half.out_channels, half.stride, half.padding, half.bias) == (4, 4, (2, 2), (1, 1), None)
    assert _half_channels(nn.Conv2d(4, 8, 3, groups=2)) is None  # grouped: never split
    assert _half_channels(nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular")) is None
    assert _half_channels(nn.Conv2d(4, 1, 3)) is None  # one channel: nothing to halve
    assert _half_channels(nn.Linear(6, 10)) is None and _half_channels(nn.ReLU()) is None
    # the copy with 4 of 8 channels takes 0.6 s forward and 1 s backward where the whole takes 1 s and 2 s
    assert _fixed_in_channels(8, (0.6, 1.0), (1.0, 2.0)) == pytest.approx((0.2, 0.0))
    # noise: the copy timed slower than the whole layer; the fixed part stays within the whole
    assert _fixed_in_channels(8, (0.6, 1.0), (0.5, 0.9)) == pytest.approx((0.5, 0.9))
    # profiled: only the convolution is timed with half its channels
    x, timed = torch.randn(1, 4, 5, 5), []
    monkeypatch.setattr(layer_profile, "_time_leaf_once", lambda module, args: timed.append(module) or (1.0, 2.0))
    layer_profile.profile_layers(nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(72, 5)), x, steps=1)
    assert [m.out_channels for m in timed if isinstance(m, nn.Conv2d)] == [8, 8, 4] * 2  # at b, 4·b, half; 2 rounds


def test_fixed_part_is_the_intercept_kept_within_the_measured_time():
    assert _fixed_part(1.0, 2.5, 4) == pytest.approx(0.5)
    assert _fixed_part(1.0, 4.0, 4) == 0.0  # all per row
    assert _fixed_part(1.0, 5.0, 4) == 0.0  # channels: more than proportional is noise
    assert _fixed_part(1.0, 0.5, 4) == 1.0  # noise: faster at more rows
    # rows: a layer may grow faster than them (its tensors outgrow the caches, come fresh from the kernel)
    assert _fixed_part(1.0, 5.5, 4, superlinear=True) == pytest.approx(-0.5)
    assert _fixed_part(1.0, 0.5, 4, superlinear=True) == 1.0


def test_a_layer_that_grows_faster_than_its_rows_grows_so_by_the_size_of_its_tensors():
    """1 s forward and 2 s backward at b rows, 5.5 s and 11 s at 4·b (fixed parts −0.5 and −1: 1.5 s and 3 s beyond
    proportional there). Whole at 4·b: as measured; below b: proportional, never less. A quarter of it (a shard at
    4·b rows, its tensors the whole layer's at b): a quarter of the proportional time, nothing beyond; a half at
    4·b: its tensors the whole layer's at 2·b, 0.5 s and 1 s beyond. dp at b: as measured."""
    model, table = _two_linears_table(1.0, 2.0)
    table.layers = {p: replace(r, forward_fixed_s=-0.5, backward_fixed_s=-1.0) for p, r in table.layers.items()}
    record = table.layers["0"]
    assert record.seconds_at(4 * B, B) == pytest.approx((5.5, 11.0))
    assert record.seconds_at(B / 2, B) == pytest.approx((0.5, 1.0))
    assert record.shard_seconds_at(4 * B, B, "dp", 1.0) == pytest.approx((5.5, 11.0))
    assert record.shard_seconds_at(4 * B, B, "column", 0.25) == pytest.approx((1.0, 2.0))
    assert record.shard_seconds_at(4 * B, B, "column", 0.5) == pytest.approx((2.5, 5.0))
    assert record.shard_seconds_at(B, B, "column", 0.25) == pytest.approx((0.25, 0.5))  # never under proportional
    step = predict_step(model, table, {"0": "column", "1": "row"}, "hybrid", 4, 4, B, constants=CostModel(0, 0, 0))
    assert [x for layer in step.layers for x in (layer.forward_s, layer.backward_s)] == pytest.approx([1, 2, 1, 2])
    step = predict_step(model, table, {}, "dp", 4, 1, B, constants=CostModel(0, 0, 0))
    assert step.compute_s == pytest.approx(6.0)


def test_the_optimizer_updates_the_parameters_each_rank_holds():
    """u = 1 ms per element. Two Linear(4, 4): 20 elements each. dp: all 40. hybrid on 4 ranks, both sharded: the
    column layer's weight and bias a quarter (5), the row layer's weight a quarter (4) and its whole bias (4)."""
    model, table = _two_linears_table(1.0, 2.0)
    table.optimizer_s_per_element = 1e-3
    zero = CostModel(0, 0, 0)
    dp = predict_step(model, table, {}, "dp", 4, 1, B, constants=zero)
    assert dp.optimizer_s == pytest.approx(40e-3)
    assert dp.step_s == pytest.approx(6.0 + 40e-3) and dp.compute_s == pytest.approx(6.0 + 40e-3)
    hybrid = predict_step(model, table, {"0": "column", "1": "row"}, "hybrid", 4, 4, B, constants=zero)
    assert hybrid.optimizer_s == pytest.approx(13e-3)
    shared = predict_step(model, table, {}, "dp", 4, 1, B, constants=zero, compute_scale=2.0)
    assert shared.optimizer_s == pytest.approx(80e-3)


def test_the_reducer_copies_every_gradient_it_buckets_and_only_scales_unshared_shards():
    """r = 1 µs per gradient byte through a bucket, r_s = 0.1 µs where it only scales. Two Linear(4, 4), 40 float32
    elements. dp on 4 ranks: all 160 bytes bucketed. hybrid at mp_size 4: no other rank holds a shard, so the
    reducer only scales the 9 shard elements a rank holds and buckets the row layer's whole bias (4); at mp_size 2,
    where a shard has a replica, it buckets all it holds. mp, and one rank alone: nothing."""
    model, table = _two_linears_table(1.0, 2.0)
    table.bucket_s_per_byte, table.scale_s_per_byte = 1e-6, 1e-7
    zero = CostModel(0, 0, 0)
    sharded = {"0": "column", "1": "row"}
    dp = predict_step(model, table, {}, "dp", 4, 1, B, constants=zero)
    assert dp.reducer_s == pytest.approx(160e-6)
    assert dp.step_s == pytest.approx(6.0 + 160e-6) and dp.exposed_communication_s == pytest.approx(160e-6)
    hybrid = predict_step(model, table, sharded, "hybrid", 4, 4, B, constants=zero)
    assert hybrid.reducer_s == pytest.approx(4 * 4e-6 + 9 * 4e-7)
    assert predict_step(model, table, sharded, "hybrid", 4, 2, B, constants=zero).reducer_s == pytest.approx(
        (10 + 4 + 8) * 4e-6  # column: half of 20; row: half of its weight (8) and its whole bias (4)
    )
    assert predict_step(model, table, sharded, "mp", 4, 4, B, constants=zero).reducer_s == 0.0
    assert predict_step(model, table, {}, "dp", 1, 1, B, constants=zero).reducer_s == 0.0
    shared = predict_step(model, table, {}, "dp", 4, 1, B, constants=zero, compute_scale=2.0)
    assert shared.reducer_s == pytest.approx(320e-6)
    assert "reducer" in dp.describe()


def test_the_glue_between_layers_runs_on_every_row_of_the_trunk():
    """Glue 0.1 s forward, 0.2 s backward at b rows: dp and hybrid add 0.3 s; mp, on 4·b rows, 1.2 s."""
    model, table = _two_linears_table(1.0, 2.0)
    table.glue_forward_s, table.glue_backward_s = 0.1, 0.2
    zero = CostModel(0, 0, 0)
    dp = predict_step(model, table, {}, "dp", 4, 1, B, constants=zero)
    assert dp.glue_s == pytest.approx(0.3) and dp.step_s == pytest.approx(6.3)
    assert dp.forward_s == pytest.approx(2.1) and dp.backward_s == pytest.approx(4.2)
    mp = predict_step(model, table, {"0": "column", "1": "row"}, "mp", 4, 4, B, constants=zero)
    assert mp.glue_s == pytest.approx(1.2) and mp.compute_s == pytest.approx(6.0 + 1.2)


def test_the_fixed_part_of_the_glue_does_not_grow_with_rows():
    """Glue forward 0.1 s, all of it fixed; backward 0.2 s, 0.1 s fixed. mp on 4·b rows: 0.1 + (0.1 + 0.1·4)."""
    model, table = _two_linears_table(1.0, 2.0)
    table.glue_forward_s, table.glue_backward_s = 0.1, 0.2
    table.glue_forward_fixed_s, table.glue_backward_fixed_s = 0.1, 0.1
    assert table.glue_at(4 * B) == pytest.approx((0.1, 0.5))
    zero = CostModel(0, 0, 0)
    mp = predict_step(model, table, {"0": "column", "1": "row"}, "mp", 4, 4, B, constants=zero)
    assert mp.glue_s == pytest.approx(0.6)
    dp = predict_step(model, table, {}, "dp", 4, 1, B, constants=zero, compute_scale=2.0)
    assert dp.glue_s == pytest.approx(0.6)  # at the table's own rows: as measured, ×σ


class _NoRoomForMoreRows(nn.Module):
    """A model whose whole forward runs out of memory beyond 2 rows (its layer alone does not)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated: no memory for this batch")
        return self.inner(x)


def test_without_memory_for_more_rows_the_glue_grows_with_the_rows():
    table = profile_layers(_NoRoomForMoreRows(), torch.randn(2, 8), steps=1)
    assert table.glue_forward_fixed_s == table.glue_backward_fixed_s == 0.0
    assert table.layers["inner"].forward_s > 0.0


def test_busy_cores_leave_the_gradients_cpu_work_exposed():
    """As in the overlap test above (bucket 0 ready at 2 s, 4 s long), but every core computes: a bucket inside one
    host is CPU work (copies, reductions) and waits for backward to end — both buckets exposed whole (8 s)."""
    model, table = _two_linears_table(1.0, 2.0)
    constants = CostModel(alpha=0.0, beta=0.05, gamma=0.0)
    step = predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, constants=constants, cores_busy=True)
    assert step.exposed_gradient_s == pytest.approx(8.0) and step.step_s == pytest.approx(14.0)
    # Between hosts too: the copies and reductions feed the network stages, so with no idle core for them the wire
    # waits for backward to end at 4 s (2 of the 8 s hidden with a core to spare, none with every core computing).
    links = Links("shm", hosts=(0, 1))
    wire = CostModel(alpha=0.0, beta=0.05, gamma=0.0)
    calm = predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, links=links, network_constants=wire,
                        constants=CostModel(0, 0, 0))  # fmt: skip
    busy = predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, links=links, network_constants=wire,
                        constants=CostModel(0, 0, 0), cores_busy=True)  # fmt: skip
    assert calm.exposed_gradient_s == pytest.approx(6.0) and busy.exposed_gradient_s == pytest.approx(8.0)
    assert [(b.start_s, b.end_s) for b in busy.buckets] == [pytest.approx((4.0, 8.0)), pytest.approx((8.0, 12.0))]


def test_the_other_bound_on_busy_cores_shares_them_and_lets_the_wire_overlap_backward():
    """``overlap_wire``: as in the overlap test above (bucket 0 ready at 2 s, 4 s long), every core computing.
    Inside one host a bucket is CPU work: bucket 0 shares the cores with the 2 s left of backward, each at half
    speed, so backward ends at 6 s and bucket 0 at 8 s; bucket 1 then runs alone, 8–12 s: exposed 8 s, as under the
    first bound (the CPU's work is the same however it is shared)."""
    model, table = _two_linears_table(1.0, 2.0)
    constants = CostModel(alpha=0.0, beta=0.05, gamma=0.0)
    step = predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, constants=constants, cores_busy=True,
                        overlap_wire=True)  # fmt: skip
    assert [(b.start_s, b.end_s) for b in step.buckets] == [pytest.approx((2.0, 8.0)), pytest.approx((8.0, 12.0))]
    assert step.exposed_gradient_s == pytest.approx(8.0) and step.step_s == pytest.approx(14.0)
    # A bucket shorter than what is left of backward: both at half speed while it runs, backward 1 s later.
    model, table = _two_linears_table(1.0, 10.0)
    short = CostModel(alpha=0.0, beta=0.0125, gamma=0.0)  # 1 s a bucket
    step = predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, constants=short, cores_busy=True,
                        overlap_wire=True)  # fmt: skip
    assert [(b.ready_s, b.start_s, b.end_s) for b in step.buckets] == [
        pytest.approx((10.0, 10.0, 12.0)), pytest.approx((21.0, 21.0, 22.0))
    ]  # fmt: skip
    assert step.exposed_gradient_s == pytest.approx(2.0)
    # Between hosts the wire needs no core: with no CPU work the buckets overlap backward as with a core to spare,
    # where the first bound (the default) holds them until backward ends.
    model, table = _two_linears_table(1.0, 2.0)
    links = Links("shm", hosts=(0, 1))
    wire = CostModel(alpha=0.0, beta=0.05, gamma=0.0)
    args = (model, table, {}, "dp", 2, 1, B)
    kw = {"bucket_bytes": 80, "links": links, "network_constants": wire, "constants": CostModel(0, 0, 0)}
    calm = predict_step(*args, **kw)
    overlapped = predict_step(*args, **kw, cores_busy=True, overlap_wire=True)
    serial = predict_step(*args, **kw, cores_busy=True)
    assert [(b.start_s, b.end_s) for b in overlapped.buckets] == [(b.start_s, b.end_s) for b in calm.buckets]
    assert overlapped.exposed_gradient_s == pytest.approx(6.0) and serial.exposed_gradient_s == pytest.approx(8.0)
    assert predict_step(*args, **kw, overlap_wire=True).step_s == calm.step_s  # no bound to choose with a core idle


def test_the_messages_cpu_work_is_priced_at_the_ranks_sharing_of_the_cores():
    """Constants measured at 4 ranks per core price a bucket inside a host at the step's sharing (default σ): its β
    and γ terms at 2/4 of theirs, at 1/4 with a core each; α as measured; constants of unknown sharing as they are;
    the link's time on the wire never rescaled."""
    model, table = _two_linears_table(1.0, 2.0)
    measured = CostModel(alpha=0.1, beta=0.05, gamma=0.02, sharing=4.0)

    def priced(constants, **sharing):
        step = predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, constants=constants, **sharing)
        terms = [(b.transfer.messages, b.transfer.bytes_sent, b.transfer.bytes_reduced) for b in step.buckets]
        return [b.seconds for b in step.buckets], terms

    def at(scale, terms):
        return [pytest.approx(0.1 * k + (0.05 * n + 0.02 * u) * scale) for k, n, u in terms]

    seconds, terms = priced(measured, compute_scale=2.0)
    assert all(n and u for _, n, u in terms) and seconds == at(0.5, terms)
    assert priced(measured, compute_scale=2.0, cpu_sharing=1.0)[0] == at(0.25, terms)
    assert priced(measured)[0] == at(0.25, terms)
    assert priced(replace(measured, sharing=0.0), compute_scale=2.0)[0] == at(1.0, terms)
    links, zero = Links("shm", hosts=(0, 1)), CostModel(0, 0, 0)
    wire = CostModel(alpha=0.0, beta=0.05, gamma=0.0, sharing=4.0)
    step = predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, links=links, network_constants=wire,
                        constants=zero, compute_scale=2.0)  # fmt: skip
    assert [b.seconds for b in step.buckets] == [pytest.approx(0.05 * b.transfer.network_bytes) for b in step.buckets]


def test_a_link_waits_for_the_hosts_cpu_to_move_its_bytes():
    """Two hosts, one rank each, σ = 1.5: each bucket sends 80 bytes to the other host, 4 s on the wire at β = 50 ms
    per byte. Moving a byte costs the hosts κ of CPU: at κ·σ under β the bucket takes its wire time, above it
    κ·σ·80 — busy cores or not; on one host there is no link to wait for."""
    model, table = _two_linears_table(1.0, 2.0)
    links, zero = Links("shm", hosts=(0, 1)), CostModel(0, 0, 0)
    wire = CostModel(alpha=0.0, beta=0.05, gamma=0.0)

    def step(network, cores_busy=False, links=links):
        return predict_step(model, table, {}, "dp", 2, 1, B, bucket_bytes=80, links=links, network_constants=network,
                            constants=zero, compute_scale=1.5, cores_busy=cores_busy)  # fmt: skip

    assert [b.transfer.network_bytes for b in step(wire).buckets] == [80, 80]
    slow_kernel = replace(wire, cpu_per_byte=0.1)  # 0.15 s a byte at σ = 1.5
    for cores_busy in (False, True):
        assert [b.seconds for b in step(replace(wire, cpu_per_byte=0.01), cores_busy).buckets] == [
            pytest.approx(4.0)
        ] * 2
        assert [b.seconds for b in step(slow_kernel, cores_busy).buckets] == [pytest.approx(0.1 * 1.5 * 80)] * 2
    one_host = Links("shm")
    assert step(slow_kernel, True, one_host).step_s == pytest.approx(step(wire, True, one_host).step_s)


def test_the_ranks_of_a_host_share_its_link():
    """Two hosts of two ranks: each rank's bytes to the other host take twice the link's time per byte (its host-mate
    sends at once); one rank per host: once."""
    model, table = _two_linears_table(1.0, 2.0)
    wire, zero = CostModel(alpha=0.0, beta=1e-3, gamma=0.0), CostModel(0, 0, 0)

    def gradients(hosts):
        links = Links("shm", hosts=hosts)
        step = predict_step(model, table, {}, "dp", len(hosts), 1, B, links=links, network_constants=wire,
                            constants=zero)  # fmt: skip
        return sum(b.seconds for b in step.buckets), sum(b.transfer.network_bytes for b in step.buckets)

    assert Links("shm", hosts=(0, 0, 1, 1)).ranks_per_link == 2 and Links("shm").ranks_per_link == 1
    seconds, sent = gradients((0, 0, 1, 1))
    assert sent > 0 and seconds == pytest.approx(2 * 1e-3 * sent)
    seconds, sent = gradients((0, 1))
    assert sent > 0 and seconds == pytest.approx(1e-3 * sent)


def test_profile_times_the_fixed_part_and_the_optimizer():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU())
    table = profile_layers(model, torch.randn(2, 512), steps=5)  # medians of 5: the reducer's ~1 ms must show
    linear, relu = table.layers["0"], table.layers["1"]
    assert 0.0 <= linear.forward_fixed_s <= linear.forward_s and 0.0 <= linear.backward_fixed_s <= linear.backward_s
    # every leaf timed at two batches: a fixed part at most its time, negative where it grows faster than its rows
    assert relu.forward_fixed_s <= relu.forward_s and relu.backward_fixed_s <= relu.backward_s
    assert linear.forward_channel_fixed_s == linear.backward_channel_fixed_s == 0.0  # only convolutions
    conv = profile_layers(nn.Sequential(nn.Conv2d(8, 16, 3)), torch.randn(2, 8, 16, 16), steps=2).layers["0"]
    assert 0.0 <= conv.forward_channel_fixed_s <= conv.forward_s
    assert 0.0 <= conv.backward_channel_fixed_s <= conv.backward_s
    assert table.optimizer_s_per_element > 0.0
    assert table.glue_forward_s >= 0.0 and table.glue_backward_s >= 0.0
    assert 0.0 <= table.glue_forward_fixed_s <= table.glue_forward_s
    assert 0.0 <= table.glue_backward_fixed_s <= table.glue_backward_s
    assert 0.0 < table.copy_s_per_byte < 1e-6  # faster than 1 MB/s
    assert 0.0 < table.bucket_s_per_byte < 1e-6  # the reducer copies: slower than not, faster than 1 MB/s
    assert 0.0 <= table.scale_s_per_byte < 1e-6  # its scaling alone, one pass (may time as nothing)
    with pytest.raises(ValueError, match="rows_factor must be >= 2"):
        profile_layers(model, torch.randn(2, 512), rows_factor=1)


def test_profile_times_every_leaf_at_two_batches(monkeypatch):
    """Layers timed as growing with their rows to the power 1.5 (b = 2: 2.83 s, 22.6 s at 4·b): every leaf's fixed
    part is the line's intercept, −3.77 s, with parameters or not."""
    from hybrid_ext.parallel import layer_profile

    monkeypatch.setattr(
        layer_profile, "_time_leaf_once", lambda module, args: (len(args[0]) ** 1.5, 2 * len(args[0]) ** 1.5)
    )
    table = profile_layers(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), torch.randn(2, 8), steps=1)
    expected = (4 * 2**1.5 - 8**1.5) / 3
    for record in table.layers.values():
        assert (record.forward_fixed_s, record.backward_fixed_s) == pytest.approx((expected, 2 * expected))
        assert record.seconds_at(8, 2) == pytest.approx((8**1.5, 2 * 8**1.5))


def test_a_calibration_of_format_1_reads_as_proportional(tmp_path):
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    path = save_calibration(profile_layers(model, x, steps=1), tmp_path / "new.json")
    payload = json.loads(path.read_text())
    old = {"format": 1, "micro_batch": 2, "device": "cpu", "layers": [
        {k: v for k, v in r.items() if not k.endswith("_fixed_s")} for r in payload["layers"]
    ]}  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = load_calibration(tmp_path / "old.json", model, x)
    assert all(r.forward_fixed_s == r.backward_fixed_s == 0.0 for r in loaded.layers.values())
    assert loaded.optimizer_s_per_element == loaded.glue_forward_s == loaded.glue_backward_s == 0.0
    assert load_calibration(path, model, x).optimizer_s_per_element == payload["optimizer_s_per_element"] > 0
    # format 2: no fixed part of the glue, read as growing with the rows
    second = {k: v for k, v in payload.items() if not k.startswith("glue_") or not k.endswith("_fixed_s")}
    (tmp_path / "second.json").write_text(json.dumps({**second, "format": 2, "glue_forward_s": 0.5}))
    loaded = load_calibration(tmp_path / "second.json", model, x)
    assert loaded.glue_forward_s == 0.5 and loaded.glue_forward_fixed_s == loaded.glue_backward_fixed_s == 0.0
    # format 3: no reducer rate, read as free
    third = {k: v for k, v in payload.items() if k != "bucket_s_per_byte"}
    (tmp_path / "third.json").write_text(json.dumps({**third, "format": 3}))
    assert load_calibration(tmp_path / "third.json", model, x).bucket_s_per_byte == 0.0
    # format 4: no rate of the scaling alone, read as free
    fourth = {k: v for k, v in payload.items() if k != "scale_s_per_byte"}
    (tmp_path / "fourth.json").write_text(json.dumps({**fourth, "format": 4}))
    loaded = load_calibration(tmp_path / "fourth.json", model, x)
    assert loaded.scale_s_per_byte == 0.0 and loaded.bucket_s_per_byte == payload["bucket_s_per_byte"]
    # format 5: no part fixed in the channels, read as proportional to them
    fifth = {**payload, "format": 5, "layers": [
        {k: v for k, v in r.items() if not k.endswith("_channel_fixed_s")} for r in payload["layers"]
    ]}  # fmt: skip
    (tmp_path / "fifth.json").write_text(json.dumps(fifth))
    loaded = load_calibration(tmp_path / "fifth.json", model, x)
    assert all(r.shard_share("channel", 0.25) == (0.25, 0.25) for r in loaded.layers.values() if r.forward_s > 0)
    assert loaded.layers["7"].forward_fixed_s == payload["layers"][7]["forward_fixed_s"]


def test_profile_measures_every_leaf_and_leaves_no_trace():
    model = small_cnn().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = profile_layers(model, torch.randn(2, 3, 16, 16), steps=1)
    assert list(table.layers) == [str(i) for i in range(13)]
    assert all(r.forward_s > 0 and r.backward_s >= 0 for r in table.layers.values())
    assert table.layers["7"].input_shape == (192,) and table.layers["7"].output_shape == (100,)
    assert not table.layers["0"].input_requires_grad and table.layers["3"].input_requires_grad
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_layers_can_be_profiled():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    table = profile_layers(model, torch.randn(2, 3, 8, 8), steps=1)
    assert table.layers["1"].input_shape == (4, 6, 6)


def test_calibration_file_round_trip(tmp_path):
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    table = profile_layers(model, x, steps=1)
    path = save_calibration(table, tmp_path / "small_cnn.json")
    loaded = load_calibration(path, model, x)
    assert loaded.layers == table.layers and loaded.micro_batch == 2
    assert loaded.optimizer_s_per_element == table.optimizer_s_per_element
    assert (loaded.glue_forward_s, loaded.glue_backward_s) == (table.glue_forward_s, table.glue_backward_s)
    assert (loaded.copy_s_per_byte, loaded.bucket_s_per_byte) == (table.copy_s_per_byte, table.bucket_s_per_byte)
    assert loaded.scale_s_per_byte == table.scale_s_per_byte


def test_calibration_for_another_model_is_refused(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    path = save_calibration(profile_layers(small_cnn(), x, steps=1), tmp_path / "small_cnn.json")
    wider = small_cnn()
    wider[10], wider[12] = nn.Linear(100, 65), nn.Linear(65, 10)
    with pytest.raises(ValueError, match=r"for another model: layer '10' has output shape \(65,\) here, \(64,\)"):
        load_calibration(path, wider, x)
    with pytest.raises(ValueError, match="for another model: layer '0' has input shape"):
        load_calibration(path, small_cnn(), torch.randn(2, 3, 32, 32))
    shorter = small_cnn()[:10]
    with pytest.raises(ValueError, match="13 layers in the file, 10 in the model"):
        load_calibration(path, shorter, x)


def test_a_file_that_is_no_calibration_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"alpha": 1}))
    with pytest.raises(ValueError, match="is not a hybrid-ext layer calibration"):
        load_calibration(path, small_cnn(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="is not a hybrid-ext layer calibration"):
        load_calibration(tmp_path / "missing.json", small_cnn(), torch.randn(1, 3, 16, 16))


# ---------------------------------------------------------------- groups spanning hosts


class _HostLayout:
    """A stand-in routed transport: what the communicator reads to choose and plan a schedule (nothing is sent)."""

    class _Network:
        name = "torch-gloo"

    name = "shm+torch-gloo"
    network = _Network()
    local = None

    def __init__(self, rank: int, hosts: tuple[int, ...]) -> None:
        self.rank, self.size, self.timeout, self.hosts = rank, len(hosts), 10.0, hosts


@pytest.mark.parametrize("hosts", [(0, 0, 1, 1), (0, 0, 1, 1, 2, 2), (0, 0, 0, 1, 1)], ids=str)
@pytest.mark.parametrize("count", [1000, 100_000])  # below and above the 64 KiB from which auto goes hierarchical
def test_across_hosts_the_schedules_are_the_communicators(hosts, count):
    from hybrid_ext.comm.communicator import Communicator
    from hybrid_ext.parallel.step_traffic import allgather_transfer, allreduce_transfer, reduce_scatter_transfer

    links = Links("shm", hosts=hosts)
    for rank in range(len(hosts)):
        comm = Communicator(_HostLayout(rank, hosts))
        group = links.group(list(range(len(hosts))), rank)
        for request in ("butterfly", "auto", "ring", "hierarchical"):
            plan = comm._allreduce_plan(request, count, 4 * count)[0]
            predicted = allreduce_transfer("x", "gradients", request, count, 4, group)
            assert (predicted.algorithm, predicted.bytes_sent) == (plan.algorithm, plan.elements_sent * 4), request
        blocks = tuple(count // len(hosts) + (r % 2) for r in range(len(hosts)))
        gathered = comm._block_plan("allgather", "auto", blocks, 4)
        scattered = comm._block_plan("reduce_scatter", "auto", blocks, 4)
        assert allgather_transfer("x", "forward", blocks, 4, group).bytes_sent == gathered.elements_sent * 4
        assert reduce_scatter_transfer("x", "forward", blocks, 4, group).bytes_sent == scattered.elements_sent * 4


def test_hierarchical_allgather_sends_each_block_out_of_its_host_once():
    """2 hosts × 2 ranks, 100,000 elements per rank: each host's two blocks cross its link once."""
    from hybrid_ext.parallel.step_traffic import allgather_transfer

    hosts, block = (0, 0, 1, 1), 100_000
    links = Links("shm", hosts=hosts)
    sent = [allgather_transfer("x", "forward", (block,) * 4, 4, links.group([0, 1, 2, 3], r)) for r in range(4)]
    assert {t.algorithm for t in sent} == {"hierarchical"}
    assert sum(t.network_bytes for t in sent[:2]) == 2 * block * 4
    flat = [allgather_transfer("x", "forward", (block,) * 4, 4, Links("shm").group([0, 1, 2, 3], r)) for r in range(4)]
    assert all(t.network_bytes == 0 for t in flat)  # one host: nothing crosses a network


def test_a_group_inside_one_host_runs_on_shared_memory():
    links = Links("shm", hosts=(0, 0, 1, 1))
    inside = links.group([2, 3], 0)
    assert inside.hosts is None and inside.transport == "shm"
    across = links.group([1, 3], 1)  # a data-parallel group: rank 1 on host 0, rank 3 on host 1
    assert across.hosts == (0, 1) and across.transport == "shm+torch-gloo" and across.remote(0)
    with pytest.raises(ValueError, match="hosts of 3 ranks, not of the world's 4"):
        step_transfers(small_cnn(), layer_shapes(small_cnn(), torch.randn(1, 3, 16, 16)), {}, "dp", 4, 1, 0, B,
                       links=Links(hosts=(0, 0, 1)))  # fmt: skip


def _heavy_conv_steps(links: Links):
    """head_heavy_cnn with its second 256-channel convolution split over 4 ranks under hybrid, every parameter its
    own bucket (so the last convolution's buckets are on the wire when the split one runs backward), each layer
    with parameters 10 ms forward and 20 ms backward, the others as layer_shapes leaves them (none)."""
    model = head_heavy_cnn()
    table = layer_shapes(model, torch.randn(4, 3, 32, 32))
    weighted = {path for path, module in model.named_modules() if list(module.parameters(recurse=False))}
    table.layers = {
        p: replace(r, forward_s=0.01, backward_s=0.02) if p in weighted else r for p, r in table.layers.items()
    }
    styles = {"5": "channel"}
    link = CostModel(alpha=50e-6, beta=32e-9, gamma=0.4e-9)  # 250 Mbit/s
    step = predict_step(model, table, styles, "hybrid", 4, 4, 4, bucket_bytes=1, links=links,
                        network_constants=link)  # fmt: skip
    return step, link


def test_a_backward_exchange_shares_the_link_with_a_bucket_on_it():
    from hybrid_ext.parallel.step_model import link_bytes_s, transfer_split

    two_hosts = Links("shm", hosts=(0, 0, 1, 1))
    step, link = _heavy_conv_steps(two_hosts)
    layer = next(layer for layer in step.layers if layer.path == "5")
    own = [t for t in step.layer_transfers if t.name == "5"]
    alone = sum(sum(transfer_split(t, two_hosts, network_constants=link, cpu_sharing=1.0)) for t in own)
    on_link = sum(link_bytes_s(t, two_hosts, network_constants=link) for t in own if t.phase == "backward")
    shared = layer.communication_s - alone
    # the buckets of the layers after it (in forward order) are on the wire during its backward: its exchanges
    # there move at half rate, for at most their own time on the link
    assert 0 < shared <= on_link + 1e-12
    # on one host there is no link to share
    one_host, _ = _heavy_conv_steps(Links("shm"))
    assert next(x for x in one_host.layers if x.path == "5").communication_s == pytest.approx(
        sum(
            sum(transfer_split(t, Links("shm"), network_constants=link, cpu_sharing=1.0))
            for t in one_host.layer_transfers
            if t.name == "5"
        )
    )


@pytest.mark.parametrize(
    ("strategy", "world", "mp_size", "hosts", "fewer"),
    [
        ("dp", 16, 1, tuple(r // 4 for r in range(16)), True),  # powers of two: hosts alike
        ("hybrid", 16, 4, tuple(r // 4 for r in range(16)), True),
        ("dp", 12, 1, tuple(r // 3 for r in range(12)), False),  # the butterfly's fold sets ranks apart
        ("hybrid", 12, 4, tuple(r // 3 for r in range(12)), False),  # model-parallel groups across hosts
        ("hybrid", 10, 5, (0, 0, 0, 1, 1, 2, 2, 2, 2, 3), False),  # unequal hosts
        ("mp", 6, 6, (0, 0, 1, 1, 2, 2), False),
    ],
)
def test_ranks_alike_are_predicted_once_and_the_step_is_the_slowest_ranks(
    strategy, world, mp_size, hosts, fewer, monkeypatch
):
    """predict_step predicts each class of ranks with the same shards and transfers once: its answer is the one
    predicting every rank on its own gives (small_cnn's 100 and 10 features split unevenly; buckets of one
    parameter)."""
    from hybrid_ext.parallel import step_model
    from hybrid_ext.parallel.step_model import _predict_rank
    from hybrid_ext.parallel.step_traffic import parameters_after_wrap

    model = small_cnn()
    table = layer_shapes(model, torch.randn(1, 3, 16, 16))
    table.layers = {p: replace(r, forward_s=1e-3 * (i + 1), backward_s=2e-3) for i, (p, r) in
                    enumerate(table.layers.items())}  # fmt: skip
    styles = make_plan(model, strategy).styles
    links = Links("shm", hosts=hosts)
    m = mp_size if strategy != "dp" else 1
    modules = dict(model.named_modules())
    one_by_one = []
    for rank in range(world):
        held = parameters_after_wrap(model, styles if strategy != "dp" else {}, m, rank % m)
        transfers = step_transfers(model, table, styles, strategy, world, mp_size, rank, B, "butterfly", 1, links, held)
        alone = _predict_rank(
            transfers, table, styles, strategy, world, mp_size, rank, B, links, None, None, 2.0, 2.0, True, modules,
            held,
        )  # fmt: skip
        one_by_one.append(alone)
    slowest = max(one_by_one, key=lambda p: p.step_s)
    predicted = []
    monkeypatch.setattr(step_model, "_predict_rank", lambda *a: predicted.append(a[6]) or _predict_rank(*a))
    step = predict_step(model, table, styles, strategy, world, mp_size, B, "butterfly", 1, links, compute_scale=2.0,
                        cores_busy=True)  # fmt: skip
    assert len(predicted) < world if fewer else len(predicted) <= world
    assert (step.rank, step.step_s, step.bytes_sent) == (slowest.rank, slowest.step_s, slowest.bytes_sent)
    leaving = {h: sum(p.network_bytes for r, p in enumerate(one_by_one) if hosts[r] == h) for h in set(hosts)}
    assert step.host_link_bytes == max(leaving.values()) > 0
    if strategy != "dp":  # the ranks differ (their shards, or more): the classes are not all one
        assert len({p.step_s for p in one_by_one}) > 1


def test_layers_are_timed_in_rounds_so_a_burst_of_noise_is_one_sample_of_each(monkeypatch):
    """A spell of noise that slows four timings in a row (10× the 1 s each takes) lands on one round's samples of
    two layers, not on every sample of one: the medians of three rounds keep every layer at 1 s."""
    from hybrid_ext.parallel import layer_profile

    calls = []

    def slowed_spell(module, args):
        calls.append(module)
        spell = 9 <= len(calls) < 13  # in the second timed round (rounds of 6: two leaves at b and 4·b, the whole ×2)
        seconds = (10.0 if spell else 1.0) * len(args[0]) / 2
        return seconds, 2 * seconds

    monkeypatch.setattr(layer_profile, "_time_leaf_once", slowed_spell)
    table = profile_layers(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), torch.randn(2, 8), steps=3)
    assert len(calls) == 4 * 6  # a warm-up round, then three
    for record in table.layers.values():
        assert (record.forward_s, record.backward_s) == (1.0, 2.0)
        assert record.forward_fixed_s == record.backward_fixed_s == 0.0  # 4 s at 4·b: proportional
    assert table.glue_forward_s == table.glue_backward_s == 0.0
