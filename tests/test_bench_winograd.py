"""bench/winograd_probe.py: its Winograd convolutions compute what F.conv2d computes (else its
timings would compare different things), and its quick mode runs and writes its JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_bench

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_matches_the_direct_convolution(m, bias):
    probe = load_bench("winograd_probe")
    torch.manual_seed(m)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, bias=bias)
    for height, width in ((8, 8), (5, 7), (1, 3)):  # whole tiles, ragged edges, less than one tile
        x = torch.randn(2, 5, height, width)
        with torch.no_grad():
            expected = conv(x)
            got = probe.WinogradConv3x3(conv, m)(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_winograd_refuses_other_convolutions():
    probe = load_bench("winograd_probe")
    for conv in (torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.Conv2d(4, 4, 1),
                 torch.nn.Conv2d(4, 4, 3, padding=1, groups=2)):
        with pytest.raises(ValueError, match="3x3 convolution with stride 1, padding 1, one group"):
            probe.WinogradConv3x3(conv, 4)


def test_probe_quick_writes_every_3x3_layer(tmp_path):
    pytest.importorskip("diffusers")  # the probe builds the reference UNet through bench/vs_diffusers_models.py
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(BENCH / "winograd_probe.py"), "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    layers = result["layers"]
    # The reference UNet (64/128/256, 2 ResBlocks per level) runs 3x3 convolutions at 16x16, 8x8 and 4x4.
    assert {(r["height"], r["width"]) for r in layers} == {(16, 16), (8, 8), (4, 4)}
    assert sum(r["calls"] for r in layers) > 30
    for r in layers:
        assert set(r["seconds"]) == {"direct", "F(2,3)", "F(4,3)"} and r["best"] in r["seconds"]
        assert all(math.isfinite(s) and s > 0 for s in r["seconds"].values())
        assert max(r["relative_error"].values()) < 1e-4
    assert 0 < result["conv3x3_seconds_best_per_layer"] <= result["conv3x3_seconds_direct"]
    assert result["forward_speedup_bound"] >= 1.0
