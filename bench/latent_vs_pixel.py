"""The paper's downsampling-factor study (Sec. 4.1) on the shapes world (issue 5): class-conditional
models with f = 1 (pixel space), 2, 4 and 8, each trained for the same budget of training FLOPs.

    python bench/latent_vs_pixel.py [--budget-tflop 60] [--factors 1 2 4 8]
    python bench/latent_vs_pixel.py --factors 1 4 --budget-tflop 240 --budget-shares 4=0.333
    python bench/latent_vs_pixel.py --family full_width --factors 1 4 --budget-tflop 600 --budget-shares 4=0.1333
    python bench/latent_vs_pixel.py --quick            # tiny models: a smoke check in seconds
    python bench/latent_vs_pixel.py --merge A.json B.json --out DIR   # one table and plot from runs of the same
                                                                     # settings (e.g. f=1, 4 and later f=2, 8)

The budget is training FLOPs, counted with ``torch.utils.flop_counter`` on one training step
(forward + backward of the denoiser and its condition encoder; the AdamW update is elementwise and
not counted), so a model of f gets floor(budget / FLOPs per step) steps at the same batch size
(learning-rate schedule, EMA and everything else as the default run). Wall time is recorded too,
but on a shared CPU it is not a fair budget. The first stages are trained (or reused from the
cache) before any denoiser and are not charged to the budget, as in the paper (one first stage
serves many denoisers); their training time is recorded. ``--budget-shares F=S`` trains factor F for
S times the budget instead (the pixel model keeps the whole budget): with ``4=0.333`` the goal's
question, whether f=4 reaches the pixel model's final score with a third of its compute, is
answered by training f=4 for only that third.

First stages: f=1 the identity (``conf/autoencoder/identity.yaml``, pixel space), f=2/4/8 the KL
autoencoders ``kl_f2`` / ``kl_f4`` / ``kl_f8``. Denoisers (``unet_overrides``), family
``equal_params`` (the default): the UNet runs from the latent's resolution down to 4x4, with the
width that the default f=4 UNet has at each resolution (32x32: 16 channels, 16x16: 32, 8x8: 64,
4x4: 128) and one SpatialTransformer at 4x4; every f then has ~4.1 M parameters (the paper keeps
the parameter count fixed too) and f=1 costs 1.7x the FLOPs of f=4 per step; the pixel model is thin
(16 channels) where it works at full resolution. Family ``full_width``: the f=4 UNet (64 channels
at 8x8, 128 at 4x4) with 64-channel levels added above 8x8, so every f works at 64 channels at its
latent's resolution and the parameter count grows only by those levels (f=1: 5.0 M, f=4: 4.1 M) --
as we read the paper's appendix, its Sec. 4.1 models likewise keep a wide first level at every f
at near-equal parameter counts (391-396 M). Family ``same_base``: 64 channels at the latent's
resolution for every f and 128 below (the default UNet with levels added), which makes f=1 7.8x as
expensive per step as f=4.

Measured per f: the EMA's scores (``task=eval``'s evaluation: class accuracy read back by the exact
reader) at fractions of the budget and at its end, and sampling throughput with the default sampler
(DDIM, 50 steps, classifier-free guidance, decode included): images/s, median of interleaved
repeats, and FLOPs per image. Writes bench/results/latent_vs_pixel.json,
docs/images/latent_vs_pixel_{faithfulness,throughput}.png and the block of docs/performance-studies.md.
The summary, the doc block, the plots and ``--merge`` work on the JSON alone: bench/latent_vs_pixel_report.py.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_vs_pixel_report import NAME, merge, summarize, write_outputs  # noqa: E402
from study_common import add_output_options, compose_run, machine, output_paths  # noqa: E402

from ldmcore.config import validate  # noqa: E402
from ldmcore.sampling import generate  # noqa: E402
from ldmcore.system import DenoiserModel, LatentDiffusion, build, build_system  # noqa: E402
from ldmcore.tasks import evaluate, grid_batch  # noqa: E402
from ldmcore.training.first_stage import obtain_first_stage  # noqa: E402
from ldmcore.training.loop import DenoisingLoss, LatentPool, train_denoiser  # noqa: E402

FIRST_STAGES = {1: "identity", 2: "kl_f2", 4: "kl_f4", 8: "kl_f8", 16: "kl_f16"}
BOTTOM = 4  # every denoiser's deepest level is 4x4 (where the default f=4 UNet attends)
FAMILIES = ("equal_params", "full_width", "same_base")  # denoiser families, see unet_overrides
# Quick mode: tiny first stages and 1/4 of the widths, so each model trains a few steps in a second.
QUICK_FIRST_STAGE = ["autoencoder.model.base_channels=8", "autoencoder.model.decoder_res_blocks=1",
                     "autoencoder.train.steps=4", "autoencoder.train.batch_size=8", "autoencoder.gate.images=16",
                     "autoencoder.gate.min_psnr=0", "autoencoder.gate.min_readback=0"]
QUICK_RUN = ["data.size=256", "sampler.steps=3", "trainer.warmup_steps=1"]


def unet_overrides(f: int, resolution: int, family: str, width_divisor: int = 1) -> list[str]:
    """The denoiser of factor f on ``resolution``-px images (see the module docstring)."""
    latent = resolution // f
    if latent < BOTTOM or latent & (latent - 1):
        raise SystemExit(f"f={f} on {resolution}-px images gives a {latent}x{latent} latent; the study needs a power "
                         f"of two of at least {BOTTOM}")
    levels = int(math.log2(latent // BOTTOM)) + 1  # latent, latent/2, ..., 4
    if family == "equal_params":  # the default f=4 UNet's width at each resolution: 64 channels at 8x8, x2 per halving
        widths = [64 * 8 // (latent >> level) for level in range(levels)]
        attention = [2 ** (levels - 1)]
    elif family == "full_width":  # the default f=4 UNet (64 at 8x8, 128 at 4x4) with 64-channel levels added above
        widths = [64] * (levels - 1) + [128]
        attention = [2 ** (levels - 1)]
    elif family == "same_base":  # 64 channels at the latent's resolution, as the default, and levels added
        levels = max(levels, 2)
        widths = [64] + [128] * (levels - 1)
        attention = [2 ** k for k in range(levels) if latent >> k <= BOTTOM]
    else:
        raise SystemExit(f"--family {family!r}: choose one of {', '.join(FAMILIES)}")
    base = widths[0] // width_divisor
    mult = [w // widths[0] for w in widths]
    return [f"denoiser.model_channels={base}", f"denoiser.channel_mult=[{','.join(map(str, mult))}]",
            f"denoiser.attention_resolutions=[{','.join(map(str, attention))}]"]


@dataclass
class Arm:
    """One downsampling factor: its config, model, latent pool and measurements."""

    f: int
    cfg: DictConfig
    dataset: object  # the data source (the shapes world)
    system: LatentDiffusion
    pool: LatentPool
    first_stage: dict
    flops_per_step: float
    steps: int = 0
    curve: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    ema: DenoiserModel | None = None
    sample_flops: float = 0.0
    sample_seconds: list[float] = field(default_factory=list)
    sampled: int = 0  # images per timed sampling


def run_overrides(f: int, args) -> list[str]:
    overrides = ["+condition=class", f"autoencoder={FIRST_STAGES[f]}", f"seed={args.seed}",
                 f"trainer.batch_size={args.batch_size}", "trainer.checkpoint_every=0", "trainer.sample_every=1"]
    if args.cache_dir:
        overrides.append(f"cache_dir={args.cache_dir}")
    if args.quick:
        overrides += [*QUICK_RUN, "denoiser.num_heads=2", *(QUICK_FIRST_STAGE if f > 1 else [])]
    resolution = compose_run(overrides).data.resolution
    return [*overrides, *unet_overrides(f, resolution, args.family, 4 if args.quick else 1)]


@torch.no_grad()
def count_sampling_flops(arm: Arm, images: int = 2) -> float:
    """FLOPs of sampling one image with the run's sampler (guidance and decode included)."""
    batch, _, _ = grid_batch(arm.system, arm.dataset, arm.cfg)
    part = {k: v[:images] for k, v in batch.items()}
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        generate(arm.system, arm.system.model.eval(), part, images, arm.cfg.sampler, torch.Generator().manual_seed(0))
    return counter.get_total_flops() / images


def count_training_flops(system, dataset, pool: LatentPool, cfg: DictConfig) -> float:
    """FLOPs of one training step's forward and backward (attention through the math kernel, whose
    products the counter sees); the global RNG is left as it was."""
    objective = DenoisingLoss(system.model, system.process, system.latent_shape[1:], "fp32")
    n = cfg.trainer.batch_size
    with torch.random.fork_rng(devices=[]):
        generator = torch.Generator().manual_seed(0)
        indices = torch.randint(len(dataset), (n,), generator=generator)
        z0 = pool.sample(indices, generator)  # (B, C, h, w)
        t = system.process.sample_t(n, generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        keep = system.model.conditioner.draw_keep(n, generator)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            objective(dataset.batch(indices.tolist()), z0, t, noise, keep).mean().backward()
    system.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def prepare(f: int, args, run_dir: Path) -> Arm:
    """Config, first stage (trained, cached or the identity; gated), latent pool and FLOPs per step."""
    cfg = validate(compose_run(run_overrides(f, args)))
    torch.manual_seed(cfg.seed)  # as tasks.train: the same initial weights for the same config
    dataset = build("data", cfg.data)
    system = build_system(cfg, dataset)
    shutil.rmtree(run_dir, ignore_errors=True)  # the study's own run folder: a fresh run every time
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    obtained, record = obtain_first_stage(cfg, dataset, system.data.reader, run_dir)
    system.first_stage.load_state_dict(obtained.state_dict())
    system.first_stage.eval().requires_grad_(False)
    pool = LatentPool.encode(system.first_stage, dataset, seed=cfg.seed)
    system.first_stage.scale_factor.fill_(pool.scale_factor)
    cfg.trainer.grid_columns = 1
    cfg.trainer.grid_columns = math.ceil(args.eval_samples / grid_batch(system, dataset, cfg)[1])  # rows: one per class
    first_stage = {"config": FIRST_STAGES[f], "source": record["source"], "reused": record.get("reused"),
                   "train_seconds": record.get("train_seconds"), "seconds": time.perf_counter() - start,
                   **{k: record["metrics"].get(k) for k in ("psnr", "readback")}}
    return Arm(f, cfg, dataset, system, pool, first_stage, count_training_flops(system, dataset, pool, cfg))


def train_arm(arm: Arm, budget: float, fractions: list[float], run_dir: Path, score: str) -> None:
    """Train for floor(budget / FLOPs per step) steps; evaluate the EMA at the fractions and at the end.
    Training time excludes the evaluations."""
    arm.steps = max(1, int(budget // arm.flops_per_step))
    arm.cfg.trainer.steps = arm.steps
    eval_steps = {max(1, round(fr * arm.steps)): fr for fr in fractions if round(fr * arm.steps) < arm.steps}
    evaluating = 0.0

    def on_sample(step: int, ema) -> None:
        nonlocal evaluating
        if step in eval_steps:
            paused = time.perf_counter()
            arm.curve.append(curve_point(arm, step, eval_steps[step], ema, paused - start - evaluating, run_dir, score))
            evaluating += time.perf_counter() - paused

    start = time.perf_counter()
    result = train_denoiser(arm.system, arm.dataset, arm.pool, arm.cfg, run_dir, on_sample=on_sample)
    arm.train_seconds = result["train_seconds"] - evaluating
    arm.ema = result["ema"]
    arm.curve.append(curve_point(arm, result["step"], 1.0, arm.ema, arm.train_seconds, run_dir, score))


def curve_point(arm: Arm, step: int, target: float, model, train_seconds: float, run_dir: Path, score: str) -> dict:
    """The scores of ``model`` after ``step`` steps (task=eval's evaluation), with the compute spent;
    ``target``: the fraction of the budget asked for (``fraction`` is the one reached in whole steps)."""
    scores = evaluate(arm.system, model, arm.dataset, arm.cfg, run_dir, f"samples/step_{step:07d}.png")
    print(f"  f={arm.f} step {step}/{arm.steps}: {score} {scores.get(score, float('nan')):.3f}", flush=True)
    return {"step": step, "target": target, "fraction": step / arm.steps, "tflop": step * arm.flops_per_step / 1e12,
            "train_seconds": train_seconds, "samples": scores["samples"], **{k: scores[k] for k in scores["score_names"]}}


def measure_throughput(arms: list[Arm], samples: int, repeats: int) -> None:
    """Seconds to sample ``samples`` images with each arm's sampler config, interleaved: every arm
    once per repeat, the order reversed on every other repeat, so load falls on all alike."""
    for arm in arms:
        arm.sample_flops = count_sampling_flops(arm)
    for r in range(repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            batch, n, _ = grid_batch(arm.system, arm.dataset, arm.cfg)
            arm.sampled = min(samples, n)
            part = {k: v[: arm.sampled] for k, v in batch.items()}
            start = time.perf_counter()
            generate(arm.system, arm.ema, part, arm.sampled, arm.cfg.sampler, torch.Generator().manual_seed(r))
            arm.sample_seconds.append(time.perf_counter() - start)


def images_per_second(arm: Arm) -> float:
    return arm.sampled / statistics.median(arm.sample_seconds)


def parse_shares(items: list[str]) -> dict[int, float]:
    """``["4=0.333"]`` -> {4: 0.333}: the share of the budget each named factor trains for."""
    shares = {}
    for item in items:
        f, _, share = item.partition("=")
        try:
            shares[int(f)] = float(share)
        except ValueError:
            raise SystemExit(f"--budget-shares {item!r}: write FACTOR=SHARE, e.g. 4=0.333") from None
        if int(f) not in FIRST_STAGES or not 0 < shares[int(f)] <= 1:
            raise SystemExit(f"--budget-shares {item!r}: the factor must be one of {sorted(FIRST_STAGES)} and the share in (0, 1]")
    return shares


def arm_record(arm: Arm) -> dict:
    unet = arm.system.model.unet
    return {"f": arm.f, "latent_shape": list(arm.system.latent_shape), "first_stage": arm.first_stage,
            "denoiser": {"model_channels": unet.model_channels, "channel_mult": list(arm.cfg.denoiser.channel_mult),
                         "attention_resolutions": list(arm.cfg.denoiser.attention_resolutions),
                         "parameters": sum(p.numel() for p in arm.system.model.parameters())},
            "scale_factor": arm.pool.scale_factor, "batch_size": arm.cfg.trainer.batch_size,
            "gflop_per_step": arm.flops_per_step / 1e9, "steps": arm.steps, "train_seconds": arm.train_seconds,
            "train_gflop_per_second": arm.steps * arm.flops_per_step / 1e9 / arm.train_seconds,
            "curve": arm.curve, "sampling": {"gflop_per_image": arm.sample_flops / 1e9, "images": arm.sampled,
                                             "seconds": arm.sample_seconds, "images_per_second": images_per_second(arm)}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8], choices=sorted(FIRST_STAGES))
    parser.add_argument("--budget-tflop", type=float, default=None,
                        help="training FLOPs per model, in TFLOP (default 60, about 1.2x the default f=4 run's 1600 steps of 64; "
                             "quick: 6 steps of the costliest model)")
    parser.add_argument("--budget-shares", nargs="+", default=[], metavar="F=SHARE",
                        help="train factor F for SHARE times the budget (e.g. 4=0.333); the others, f=1 always, the whole budget")
    parser.add_argument("--eval-fractions", type=float, nargs="+", default=None,
                        help="fractions of the budget at which the EMA is evaluated (default 0.125 0.25 0.333 0.5 0.75); "
                             "the end is always evaluated")
    parser.add_argument("--family", default="equal_params", choices=FAMILIES)
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 128; quick 8)")
    parser.add_argument("--eval-samples", type=int, default=None, help="samples per evaluation (default 180; quick 18)")
    parser.add_argument("--throughput-samples", type=int, default=None, help="images per timed sampling (default 90; quick 18)")
    parser.add_argument("--repeats", type=int, default=None, help="timed sampling repeats per f (default 3; quick 1)")
    parser.add_argument("--score", default="class_accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="first-stage cache (default the run config's; quick: under --out)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="RUNS/fN: one run folder per f, replaced by each run (default /tmp/ldmcore_bench/latent_vs_pixel)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="train nothing: merge the results of earlier runs (same settings, each f once) into one "
                             "JSON, plots and doc block")
    add_output_options(parser, NAME)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    json_path, images, doc = output_paths(args, NAME)
    if args.merge:
        result = merge(args.merge)
        write_outputs(result, json_path, images, doc)
        return result
    quick = args.quick
    args.batch_size = args.batch_size or (8 if quick else 128)
    args.eval_samples = args.eval_samples or (18 if quick else 180)
    samples = args.throughput_samples or (18 if quick else 90)
    repeats = args.repeats or (1 if quick else 3)
    fractions = args.eval_fractions or ([0.5] if quick else [0.125, 0.25, 0.333, 0.5, 0.75])
    runs = args.runs or (images / "runs" if quick else Path("/tmp/ldmcore_bench/latent_vs_pixel"))
    if quick:
        args.cache_dir = args.cache_dir or images / "cache"
    factors = sorted(set(args.factors))
    shares = parse_shares(args.budget_shares)
    if shares.get(1, 1.0) != 1.0:
        raise SystemExit("--budget-shares: the pixel model (f=1) is the reference and trains for the whole budget")

    print("first stages, latent pools and FLOPs per step", flush=True)
    arms = [prepare(f, args, runs / f"f{f}") for f in factors]
    for arm in arms:
        print(f"  f={arm.f}: latent {arm.system.latent_shape}, {arm.flops_per_step / 1e9:.1f} GFLOP/step, first stage "
              f"{arm.first_stage['source']}", flush=True)
    budget = (args.budget_tflop * 1e12 if args.budget_tflop is not None
              else (6 * max(a.flops_per_step for a in arms) if quick else 60e12))
    for arm in arms:
        print(f"training f={arm.f}", flush=True)
        train_arm(arm, budget * shares.get(arm.f, 1.0), fractions, runs / f"f{arm.f}", args.score)
    print("sampling throughput", flush=True)
    measure_throughput(arms, samples, repeats)

    records = [arm_record(arm) for arm in arms]
    result = {"score": args.score, "budget_tflop": budget / 1e12, "budget_kind": "training FLOPs (torch.utils.flop_counter)",
              "family": args.family, "budget_shares": {str(f): share for f, share in shares.items()},
              "eval_samples": arms[0].curve[-1]["samples"], "eval_fractions": fractions,
              "sampler": arms[0].cfg.sampler.name, "sampler_steps": arms[0].cfg.sampler.steps,
              "guidance_scale": arms[0].cfg.sampler.guidance_scale, "quick": quick, "machine": machine(),
              "command": " ".join(["python", "bench/latent_vs_pixel.py", *(sys.argv[1:] if argv is None else argv)]),
              "arms": records, "summary": summarize(records, budget / 1e12, args.score)}
    write_outputs(result, json_path, images, doc)
    return result


if __name__ == "__main__":
    main()
