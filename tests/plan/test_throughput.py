"""Tokens/s per GPU: the recipe's measurement, the benchmark table, a transferred MFU, an
assumed one."""

import pytest

from vicuna_sky.plan.errors import PlanError
from vicuna_sky.plan.throughput import throughput

from .conftest import recipe, replace


def test_throughput_measured_scaled_transferred_or_assumed():
    r = replace(
        replace(recipe("vicuna-7b"), "train", packing=True), "resources", accelerator="A100"
    )
    # The recipe's own measurement wins on its GPU; another GPU gets its MFU at its own peak.
    measured = replace(r, "plan", tokens_per_gpu_second=3000)
    assert throughput(measured).per_gpu == 3000 and throughput(measured).source == "recipe"
    moved = throughput(measured, "H100")
    assert moved.source == "transferred" and moved.per_gpu == pytest.approx(3000 * 989 / 312)
    # The same GPU measured (H200, packed): scaled by FLOPs per token from the 1.88B shape.
    h200 = throughput(r, "h200")  # any case
    assert h200.source == "measured"
    assert h200.per_gpu == pytest.approx(30_857 * 1.88 / 6.74)
    assert "30,857 tokens/s" in h200.basis and "scaled by FLOPs per token" in h200.basis
    # Nothing measured on A100: the H200 row's MFU (6N: 35.2 %) moved to A100's peak.
    a100 = throughput(r)
    mfu = 6 * 1.88e9 * 30_857 / 989e12
    assert a100.source == "transferred"
    assert a100.per_gpu == pytest.approx(mfu * 312e12 / (6 * 6.74e9))
    assert a100.basis.startswith("transferred: MFU 35.2% measured on H200")
    # Unpacked: the unpacked measurement (2.9 %), never the packed one.
    unpacked = throughput(r, packing=False)
    assert unpacked.per_gpu == pytest.approx(2_535 * 6 * 1.88e9 / 989e12 * 312e12 / (6 * 6.74e9))
    # Nothing measured of the kind: the recipe's MFU, at 6 x params FLOPs per token.
    assumed = throughput(r, rows=[])
    assert assumed.source == "assumed"
    assert assumed.per_gpu == pytest.approx(0.4 * 312e12 / (6 * 6.74e9))
    assert assumed.basis.startswith("assumed: 40% MFU")
    with pytest.raises(PlanError, match="no peak FLOP/s known for GPU 'X100'"):
        throughput(r, "X100", rows=[])
