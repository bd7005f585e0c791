"""Scale of the work (issue 5): how the time and memory of the default denoiser grow with image size
(latent = size / 4, as the default f=4 first stage) and batch size, for a training step and for
one denoiser forward at inference, and where attention becomes the bottleneck.

    python bench/scaling.py [--sizes 32 64 128 256] [--batches 1 4 16 64] [--repeats 3]
    python bench/scaling.py --quick              # one small point per mode: a smoke check

The UNet is the run's (``conf/denoiser/unet.yaml`` with ``+condition=class``: one cross-attention
token of width 256). Each point runs in a subprocess of its own:
- time: median (and best) of ``--repeats`` timed repeats after one warm-up. Training step =
  forward + MSE to the noise + backward + AdamW step; inference = one forward under
  ``torch.inference_mode`` (a guided sampling step is one forward of twice the batch);
- attention share: the time inside the SpatialTransformer blocks (GroupNorm, projections,
  self- and cross-attention, feed-forward), and inside their attention layers alone
  (q/k/v/out projections and softmax(QKᵀ/√d)V), from forward hooks and, for training, full
  backward hooks on those modules;
- memory: peak RSS (``resource.getrusage().ru_maxrss``) over the RSS after building the model and
  the inputs: activations, gradients, AdamW's state and allocator slack, as the OS sees them;
- FLOPs: ``torch.utils.flop_counter`` on batch 1 (attention through the math kernel) times the batch.
Points with batch x size² above ``--max-pixels`` are skipped (they take minutes on a CPU).

Writes bench/results/scaling.json and the block of docs/performance-studies.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_common import (  # noqa: E402
    add_output_options, compose_run, machine, output_paths, replace_section, write_json,
)

from ldmcore.config import validate  # noqa: E402
from ldmcore.nn.attention import Attention, SpatialTransformer  # noqa: E402
from ldmcore.system import build, build_system  # noqa: E402

NAME = "scaling"
FACTOR = 4  # the default first stage's downsampling factor: latent = size / 4


# --- one point, in its own process -------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class SectionTimer:
    """Wall time spent inside modules of the given types, forward and (with ``backward``) backward;
    a module nested in another of the same set counts once (the outermost)."""

    def __init__(self, model: torch.nn.Module, types: tuple[type, ...], backward: bool):
        self.seconds, self._depth, self._start, self.handles = 0.0, 0, 0.0, []
        for module in model.modules():
            if isinstance(module, types):
                self.handles += [module.register_forward_pre_hook(lambda *_: self._enter()),
                                 module.register_forward_hook(lambda *_: self._leave())]
                if backward:
                    self.handles += [module.register_full_backward_pre_hook(lambda *_: self._enter()),
                                     module.register_full_backward_hook(lambda *_: self._leave())]

    def _enter(self) -> None:
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start


def measure_point(spec: dict) -> dict:
    """Time, attention share, peak RSS delta and FLOPs of one (size, batch, mode) point."""
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    unet = instantiate(OmegaConf.create(spec["denoiser"]), **spec["derived"])
    train = spec["mode"] == "train"
    unet.train(train)
    latent, tokens = spec["size"] // FACTOR, spec["context"]

    def inputs(batch: int) -> tuple:
        x = torch.randn(batch, unet.in_channels, latent, latent)  # (B, C, h, w)
        t = torch.rand(batch) * 999
        context = torch.randn(batch, *tokens) if tokens else None  # (B, L, D)
        y = torch.randn(batch, spec["derived"]["vector_dim"]) if spec["derived"]["vector_dim"] else None
        return x, t, context, y

    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4) if train else None
    target = torch.randn(spec["batch"], unet.out_channels, latent, latent)

    def step(args: tuple) -> None:
        if not train:
            with torch.inference_mode():
                unet(*args)
            return
        optimizer.zero_grad(set_to_none=True)
        (unet(*args) - target[: args[0].shape[0]]).pow(2).mean().backward()
        optimizer.step()

    one = inputs(1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if train:
            (unet(*one) - target[:1]).pow(2).mean().backward()
        else:
            with torch.no_grad():
                unet(*one)
    unet.zero_grad(set_to_none=True)
    args = inputs(spec["batch"])
    baseline = rss_bytes()
    transformers = SectionTimer(unet, (SpatialTransformer,), backward=train)
    attention = SectionTimer(unet, (Attention,), backward=train)
    times, shares, attention_shares = [], [], []
    for i in range(1 + spec["repeats"]):
        transformers.seconds = attention.seconds = 0.0
        start = time.perf_counter()
        step(args)
        elapsed = time.perf_counter() - start
        if i > 0:  # the first is a warm-up
            times.append(elapsed)
            shares.append(transformers.seconds / elapsed)
            attention_shares.append(attention.seconds / elapsed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    seconds = statistics.median(times)
    flops = counter.get_total_flops() * spec["batch"]
    return {"size": spec["size"], "latent": latent, "batch": spec["batch"], "mode": spec["mode"],
            "seconds_median": seconds, "seconds_best": min(times), "images_per_second": spec["batch"] / seconds,
            "gflop": flops / 1e9, "gflop_per_second": flops / 1e9 / seconds,
            "transformer_share": statistics.median(shares), "attention_share": statistics.median(attention_shares),
            "peak_rss_delta_mb": max(peak - baseline, 0) / 2**20, "threads": torch.get_num_threads()}


# --- the grid ---------------------------------------------------------------------------------


def denoiser_spec() -> tuple[dict, dict, list[int] | None, int]:
    """The run's UNet config, its derived sizes, the context's (L, D) and its parameter count."""
    cfg = validate(compose_run(["+condition=class"]))
    dataset = build("data", cfg.data)
    system = build_system(cfg, dataset)
    unet, conditioner = system.model.unet, system.model.conditioner
    f = system.first_stage.downsample_factor
    if f != FACTOR:
        raise SystemExit(f"the default first stage has f={f}; this study assumes f={FACTOR}")
    cond = conditioner(dataset.batch([0]), 1, system.latent_shape[1:]) or {}
    context = list(cond["crossattn"].shape[1:]) if "crossattn" in cond else None
    derived = {"in_channels": unet.in_channels, "out_channels": unet.out_channels,
               "context_dim": unet.context_dim, "vector_dim": unet.vector_dim}
    return OmegaConf.to_container(cfg.denoiser, resolve=True), derived, context, sum(p.numel() for p in unet.parameters())


def run_point(spec: dict, timeout: float) -> dict:
    done = subprocess.run([sys.executable, __file__, "--point", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"point {spec['mode']} size {spec['size']} batch {spec['batch']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(points: list[dict]) -> dict:
    """Per mode: per-image time growth with size (at the largest batch measured at every size) and
    the first size whose transformer blocks take at least half of the time."""
    summary = {}
    for mode in ("train", "infer"):
        mine = [p for p in points if p["mode"] == mode]
        if not mine:
            continue
        sizes = sorted({p["size"] for p in mine})
        measured = {(p["size"], p["batch"]) for p in mine}
        common = [b for b in sorted({p["batch"] for p in mine}) if all((s, b) in measured for s in sizes)]
        batch = common[-1] if common else None
        at = {p["size"]: p for p in mine if p["batch"] == batch}
        largest = {s: max((p for p in mine if p["size"] == s), key=lambda p: p["batch"]) for s in sizes}
        bottleneck = next((s for s in sizes if largest[s]["transformer_share"] >= 0.5), None)
        summary[mode] = {
            "batch_compared": batch,
            "seconds_per_image": {str(s): at[s]["seconds_median"] / batch for s in sizes} if batch else {},
            "transformer_share_at_largest_batch": {str(s): largest[s]["transformer_share"] for s in sizes},
            "attention_share_at_largest_batch": {str(s): largest[s]["attention_share"] for s in sizes},
            "transformer_bottleneck_size": bottleneck}
    return summary


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Default UNet ({result['parameters'] / 1e6:.2f} M parameters, attention at downsample factors "
             f"{result['denoiser']['attention_resolutions']}), latent = size / {FACTOR}, fp32; {m['machine']}, torch "
             f"{m['torch']}, {result['points'][0]['threads']} threads, {m['date']}. Times are medians of "
             f"{result['repeats']} repeats; shares are of the same steps; memory is peak RSS over the RSS after building "
             "the model and inputs, one process per point.", "",
             "| mode | size (latent) | batch | ms / step | images/s | GFLOP | GFLOP/s | transformer blocks "
             "| attention layers | peak RSS Δ MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['mode']} | {p['size']} ({p['latent']}x{p['latent']}) | {p['batch']} | "
                     f"{1000 * p['seconds_median']:.1f} | {p['images_per_second']:.1f} | {p['gflop']:.2f} | {p['gflop_per_second']:.1f} | "
                     f"{p['transformer_share']:.0%} | {p['attention_share']:.0%} | {p['peak_rss_delta_mb']:.0f} |")
    lines.append("")
    for mode, s in result["summary"].items():
        sizes = list(s["transformer_share_at_largest_batch"])
        growth = ""
        if s["seconds_per_image"] and len(sizes) > 1:
            first, last = s["seconds_per_image"][sizes[0]], s["seconds_per_image"][sizes[-1]]
            growth = (f"time per image grows {last / first:.1f}x from {sizes[0]} to {sizes[-1]} px "
                      f"({(int(sizes[-1]) / int(sizes[0])) ** 2:.0f}x the pixels) at batch {s['batch_compared']}; ")
        where = (f"the transformer blocks take half of the time or more from {s['transformer_bottleneck_size']} px on"
                 if s["transformer_bottleneck_size"] else
                 f"the transformer blocks stay under half of the time up to {sizes[-1]} px "
                 f"(at most {max(s['transformer_share_at_largest_batch'].values()):.0%})")
        lines.append(f"- {mode}: {growth}{where}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 32 64 128 256; quick 32)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 4 16 64; quick 2)")
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--max-pixels", type=int, default=16 * 256**2, help="skip points with batch x size² above this")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per point (default 3; quick 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per point")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: measure one point, print JSON
    add_output_options(parser, NAME)
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(measure_point(json.loads(args.point))))
        return None
    json_path, _, doc = output_paths(args, NAME)
    sizes = args.sizes or ([32] if args.quick else [32, 64, 128, 256])
    batches = args.batches or ([2] if args.quick else [1, 4, 16, 64])
    repeats = args.repeats or (1 if args.quick else 3)
    bad = [s for s in sizes if s % (FACTOR * 2) or s < FACTOR * 2]
    if bad:
        raise SystemExit(f"--sizes {bad}: each size must be a multiple of {FACTOR * 2} "
                         f"(latent = size / {FACTOR}, halved once by the UNet)")
    denoiser, derived, context, parameters = denoiser_spec()
    points = []
    start = time.perf_counter()
    for size in sizes:
        for batch in batches:
            if batch * size * size > args.max_pixels:
                continue
            for mode in args.modes:
                spec = {"size": size, "batch": batch, "mode": mode, "repeats": repeats, "threads": args.threads,
                        "denoiser": denoiser, "derived": derived, "context": context}
                point = run_point(spec, args.timeout)
                points.append(point)
                print(f"{mode:5s} size {size:3d} batch {batch:3d}: {1000 * point['seconds_median']:8.1f} ms, "
                      f"transformers {point['transformer_share']:.0%}, peak RSS Δ {point['peak_rss_delta_mb']:.0f} MB "
                      f"({time.perf_counter() - start:.0f} s so far)", flush=True)
    result = {"denoiser": denoiser, "parameters": parameters, "factor": FACTOR, "repeats": repeats, "quick": args.quick,
              "memory": "peak RSS (ru_maxrss) minus RSS after building model and inputs, one subprocess per point",
              "machine": machine(), "points": points, "summary": summarize(points)}
    write_json(json_path, result)
    replace_section(doc, NAME, markdown(result))
    print(f"wrote {json_path}, {doc}")
    return result


if __name__ == "__main__":
    main()
