"""Would Winograd convolutions make the reference UNet faster on this CPU? (issue 5, the diffusers goals)

Both ldmcore and diffusers spend most of the reference configuration's forward (see
bench/vs_diffusers.py) in 3x3 convolutions run by oneDNN's direct kernels. The Winograd algorithms
F(2x2, 3x3) and F(4x4, 3x3) compute the same convolution with 2.25x and 4x fewer multiplications
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016; the transform
matrices below are theirs), at the price of transforming every input tile and output tile. This
probe writes both in plain PyTorch -- tile gather, separable input transform, one batched matrix
product over the a x a tile points, separable output transform -- and times them against
``F.conv2d`` on every distinct 3x3 convolution of the reference UNet's forward (batch 32, fp32,
inference), interleaved, medians. From the per-layer medians it bounds what the best choice per
layer would save in one forward, against the whole forward's measured time.

    python bench/winograd_probe.py              # writes bench/results/winograd_probe.json
    python bench/winograd_probe.py --keep-freed-memory --out bench/results/winograd_probe_keep_freed.json
    python bench/winograd_probe.py --quick      # batch 2, 3 rounds: checks that it runs

It is a probe, not a library feature: ldmcore keeps oneDNN's convolutions (docs/performance.md
says why, with the numbers of this script).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_common import machine, write_json  # noqa: E402
from vs_diffusers import interleaved, keep_freed_memory  # noqa: E402
from vs_diffusers_models import ROOT, forward_call, inputs, load, make_weights  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "winograd_probe.json"

# F(m x m, 3 x 3): input transform B^T (a x a), filter transform G (a x 3), output transform A^T (m x a), a = m + 2.
TRANSFORMS = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0],
         [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6],
         [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


class WinogradConv3x3:
    """A stride-1, padding-1 3x3 convolution computed as F(m x m, 3 x 3) for inference."""

    def __init__(self, conv: torch.nn.Conv2d, m: int):
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
            raise ValueError(f"WinogradConv3x3 takes a 3x3 convolution with stride 1, padding 1, one group; got {conv}")
        b_t, g, a_t = (torch.tensor(t, dtype=torch.float64) for t in TRANSFORMS[m])
        self.m, self.a = m, m + 2
        self.b_t, self.a_t = b_t.float(), a_t.float()
        # U = G w G^T per (out, in) pair, laid out (a*a, in, out) for one batched product per tile point.
        u = g @ conv.weight.detach().double() @ g.T  # (out, in, a, a)
        self.u = u.permute(2, 3, 1, 0).reshape(self.a * self.a, conv.in_channels, conv.out_channels).float().contiguous()
        self.bias = None if conv.bias is None else conv.bias.detach().view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        m, a = self.m, self.a
        rows, cols = -(-h // m), -(-w // m)  # tiles per column and per row
        tiles = n * rows * cols
        padded = F.pad(x, (1, 1 + cols * m - w, 1, 1 + rows * m - h))
        d = padded.unfold(2, a, m).unfold(3, a, m)  # (n, c, rows, cols, a, a): overlapping a x a tiles
        d = d.permute(4, 5, 0, 2, 3, 1).contiguous().view(a, a * tiles * c)  # tile point (i, j) first
        v = torch.matmul(self.b_t, (self.b_t @ d).view(a, a, tiles * c))  # B^T d B, one axis at a time
        product = torch.bmm(v.view(a * a, tiles, c), self.u)  # (a*a, tiles, out)
        out = product.shape[-1]
        y = (self.a_t @ product.view(a, a * tiles * out)).view(m, a, tiles * out)
        y = torch.matmul(self.a_t, y)  # A^T M A: (m, m, tiles * out)
        y = y.view(m, m, n, rows, cols, out).permute(2, 5, 3, 0, 4, 1).reshape(n, out, rows * m, cols * m)
        y = y[:, :, :h, :w]
        return y + self.bias if self.bias is not None else y


def conv_shapes(unet: torch.nn.Module, call) -> Counter:
    """(in, out, height, width) -> number of calls per forward, for every 3x3 stride-1 convolution."""
    shapes: Counter = Counter()

    def record(module, args, output):
        shapes[(module.in_channels, module.out_channels, *args[0].shape[-2:])] += 1

    hooks = [m.register_forward_hook(record) for m in unet.modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)]
    with torch.inference_mode():
        call()
    for hook in hooks:
        hook.remove()
    return shapes


def medians(cases: dict, rounds: int) -> dict[str, float]:
    """Median seconds per case, in inference mode, interleaved as bench/vs_diffusers.py times."""
    with torch.inference_mode():
        times, _ = interleaved(cases, rounds, torch.device("cpu"))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc: keep freed memory (mallopt), so that fresh temporaries cost no page faults")
    parser.add_argument("--quick", action="store_true", help="batch 2, 3 rounds, output under /tmp")
    parser.add_argument("--out", type=Path, default=None, help=f"the JSON (default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.quick:
        args.batch, args.rounds = 2, 3
    out = args.out or (Path("/tmp/ldmcore_quick/winograd_probe.json") if args.quick else RESULTS)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        make_weights(Path(folder))
        unet = load("ldmcore", Path(folder), "unet").eval()
    x, t, context = inputs(args.batch, torch.device("cpu"), torch.float32)
    forward = forward_call("ldmcore", unet, x, t, context)
    shapes = conv_shapes(unet, forward)
    forward_seconds = medians({"forward": forward}, args.rounds)["forward"]

    rows = []
    for (c_in, c_out, h, w), calls in sorted(shapes.items(), key=lambda item: (-item[0][2], item[0][:2])):
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        sample = torch.randn(args.batch, c_in, h, w)
        variants = {"direct": conv, **{f"F({m},3)": WinogradConv3x3(conv, m) for m in TRANSFORMS}}
        with torch.inference_mode():
            reference = conv(sample)
            errors = {name: ((fn(sample) - reference).abs().max() / reference.abs().max()).item()
                      for name, fn in variants.items() if name != "direct"}
        seconds = medians({name: (lambda fn=fn: fn(sample)) for name, fn in variants.items()}, args.rounds)
        best = min(seconds, key=seconds.get)
        rows.append({"in": c_in, "out": c_out, "height": h, "width": w, "calls": calls,
                     "gflop": 2 * args.batch * h * w * c_in * c_out * 9 / 1e9, "seconds": seconds, "best": best,
                     "relative_error": errors})
        print(f"{c_in:4d}->{c_out:<4d} {h:2d}x{w:<2d} x{calls}: "
              + "  ".join(f"{name} {s * 1e3:6.2f} ms" for name, s in seconds.items())
              + f"  best {best}; max rel. error " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()), flush=True)

    direct = sum(r["calls"] * r["seconds"]["direct"] for r in rows)
    best = sum(r["calls"] * min(r["seconds"].values()) for r in rows)
    result = {"machine": machine(), "batch": args.batch, "rounds": args.rounds, "quick": args.quick,
              "keep_freed_memory": args.keep_freed_memory,
              "forward_seconds": forward_seconds, "conv3x3_seconds_direct": direct, "conv3x3_seconds_best_per_layer": best,
              "conv3x3_share_of_forward": direct / forward_seconds,
              "forward_speedup_bound": forward_seconds / (forward_seconds - (direct - best)), "layers": rows}
    print(f"forward {forward_seconds * 1e3:.1f} ms; its 3x3 convolutions, timed alone: {direct * 1e3:.1f} ms direct, "
          f"{best * 1e3:.1f} ms with the best algorithm per layer -> the forward at most "
          f"{result['forward_speedup_bound']:.2f}x faster")
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
