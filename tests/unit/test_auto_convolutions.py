"""strategy="auto" splitting convolutions by output channels under hybrid, where the predicted step drops: a
convolution with many weights on a small feature map, across a slow link; never the stem on its large map."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from hybrid_ext.comm.cost_model import CostModel
from hybrid_ext.parallel.auto_plan import choose_plan, convolution_candidates
from hybrid_ext.parallel.layer_profile import layer_shapes
from hybrid_ext.parallel.step_model import predict_step
from hybrid_ext.parallel.step_traffic import Links

from helpers.parallel_reference import head_heavy_cnn

pytestmark = pytest.mark.timeout(120)

B = 4
TWO_HOSTS = Links("shm", hosts=(0, 0, 1, 1))
SLOW_LINK = CostModel(alpha=50e-6, beta=32e-9, gamma=0.4e-9)  # 250 Mbit/s
FAST_LINK = CostModel(alpha=50e-6, beta=0.08e-9, gamma=0.4e-9)  # 100 Gbit/s


def _table(model: nn.Module, seconds_per_sample: float = 1e-4):
    """The model's shapes, each leaf computing ``seconds_per_sample`` per sample forward and twice that backward."""
    table = layer_shapes(model, torch.randn(B, 3, 32, 32))
    table.layers = {
        path: replace(r, forward_s=seconds_per_sample * B, backward_s=2 * seconds_per_sample * B) if r.leaf else r
        for path, r in table.layers.items()
    }
    return table


def test_candidates_are_the_convolutions_whose_weights_outweigh_their_activations():
    model = head_heavy_cnn()
    table = _table(model)
    # most weight per activation first; the stem (448 weights, 19,456 activations a sample) and the grouped one
    # are not tried
    assert convolution_candidates(model, table, B, 2) == ["5", "3"]
    assert convolution_candidates(model, table, B, 512) == []  # 256 channels cannot make 512 shards


def test_auto_splits_the_heavy_convolutions_across_a_slow_link():
    model = head_heavy_cnn()
    table = _table(model)
    chosen = choose_plan(model, table, 4, B, links=TWO_HOSTS, network_constants=SLOW_LINK)
    assert chosen.strategy == "hybrid"
    assert chosen.styles["5"] == "channel" and chosen.styles["0"] == "dp" and chosen.styles["7"] == "dp"
    best = chosen.alternatives[0]
    assert "5" in best.convolutions and "convolutions split by channels at" in best.label
    # its prediction is predict_step's for that plan, and beats the same chains without split convolutions
    again = predict_step(
        model, table, chosen.styles, "hybrid", 4, chosen.mp_size, B, links=TWO_HOSTS, network_constants=SLOW_LINK
    )
    assert chosen.prediction.step_s == pytest.approx(again.step_s)
    plain = [c for c in chosen.alternatives if c.mp_size == chosen.mp_size and not c.convolutions]
    assert plain and plain[0].step_s > best.step_s
    assert "channel" in str(chosen)


def test_a_split_convolution_sends_its_activations_instead_of_its_gradients_over_the_link():
    model = head_heavy_cnn()
    table = _table(model)
    chosen = choose_plan(model, table, 4, B, links=TWO_HOSTS, network_constants=SLOW_LINK, mp_sizes=[4])
    assert chosen.styles["5"] == "channel"
    styles = {path: style for path, style in chosen.styles.items() if path != "5"}
    kept = predict_step(model, table, styles, "hybrid", 4, 4, B, links=TWO_HOSTS, network_constants=SLOW_LINK)
    # split over both hosts, the layer's 590,080 weights are each on one rank: their gradients go nowhere, and the
    # group exchanges its 2x2 activations instead
    saved = kept.host_link_bytes - chosen.prediction.host_link_bytes
    assert 0.9 * 590_080 * 4 / 2 < saved < 590_080 * 4
    assert chosen.prediction.step_s < kept.step_s


def test_only_dp_asked_splits_nothing():
    model = head_heavy_cnn()
    chosen = choose_plan(model, _table(model), 4, B, links=TWO_HOSTS, network_constants=SLOW_LINK, strategies=("dp",))
    assert chosen.strategy == "dp" and set(chosen.styles.values()) == {"dp"}
