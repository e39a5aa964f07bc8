"""``hybrid-ext bench train``: runs every kind of run and counts each byte once."""

from __future__ import annotations

import pytest

from hybrid_ext.bench.train import build_model, run_train_bench


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_native_and_butterfly_dp_send_the_same_bytes_counted_once():
    runs = [("dp-native", "dp", "native"), ("dp-butterfly", "dp", "butterfly"), ("compute-only", "hybrid", "butterfly")]
    rows = {row.run: row for row in run_train_bench("digits_alexnet", 2, runs, micro_batch=4, size=32, steps=1)}
    params = sum(p.numel() * p.element_size() for p in build_model("digits_alexnet").parameters())
    # Two ranks: every algorithm sends the whole gradient once per step (ring: 2(p-1)/p·n = n).
    assert rows["dp-native"].bytes_per_step == pytest.approx(params, rel=1e-6)
    assert rows["dp-butterfly"].bytes_per_step == pytest.approx(params, rel=1e-6)
    assert all(row.samples_per_sec > 0 for row in rows.values())
