"""bench/vs_diffusers.py's ablation (``--baseline REV``): today's UNet with one change at a time put
back to an older version's forward must still run, give today's outputs (the changes are rewrites,
not new maths) and, once deep-copied for the train step, run the copy's own weights."""

from __future__ import annotations

import copy
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "abc026b"  # the revision docs/performance.md's ablation rows were measured against


def test_older_forward_drops_missing_arguments_only_while_they_are_none():
    models = load_bench("vs_diffusers_models")

    class Old(torch.nn.Module):
        def forward(self, x, context=None):
            return x if context is None else x + context

    module = Old()
    call = models.older_forward(Old.forward)
    x = torch.ones(2)
    assert torch.equal(call(module, x, None, None), x)  # today's extra argument (None) is dropped
    assert torch.equal(call(module, x, x, bias=None), 2 * x)
    with pytest.raises(TypeError, match=r"Old: the baseline's forward\('x', 'context'\) cannot take"):
        call(module, x, None, torch.zeros(2))


def test_every_reverted_change_runs_with_todays_outputs():
    pytest.importorskip("diffusers")
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{BASELINE}^{{commit}}"], capture_output=True).returncode:
        pytest.skip(f"revision {BASELINE} is not in this clone's history")
    models = load_bench("vs_diffusers_models")
    with tempfile.TemporaryDirectory() as folder:
        models.make_weights(Path(folder))
        ours = models.load("ldmcore", Path(folder), "unet").eval()
    base = models.baseline_modules(BASELINE)
    x, t, context = models.inputs(2, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        expected = ours(x, t, context)
        for change, classes in models.CHANGES.items():
            reverted = models.revert(ours, base, classes)
            torch.testing.assert_close(reverted(x, t, context), expected, rtol=1e-4, atol=1e-4, msg=change)
            copied = copy.deepcopy(reverted)
            for p in copied.parameters():
                p.zero_()
            # The copy's zero weights change the output: its forwards are bound to the copy, not the original.
            assert not torch.allclose(copied(x, t, context), expected, atol=1e-3), change
