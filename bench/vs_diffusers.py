"""ldmcore against diffusers on the same weights, side by side in one process (issue 5).

The reference configuration: 4×16×16 latents (64 px images, f=4), a UNet of 64/128/256 channels,
2 ResBlocks per level, cross-attention (context width 256, 77 tokens, heads of width 32) at the two
lower resolutions, batch 32. It is built as a diffusers ``UNet2DConditionModel`` with random
weights, saved, and loaded into ldmcore's ``UNet`` through ``ldmcore.interop`` (outputs asserted
equal to 1e-4 before any timing); a small KL autoencoder (f=4) goes the same way for decoding.

Measured over interleaved rounds (every variant once per round, the order reversed every other
round): speeds from the median time, ratios as the median of each round's paired ratio, so that
load from other processes falls on all variants alike and a burst of it cancels out:
- forward: one denoiser forward in inference mode, images/s;
- train: forward + backward + AdamW step, images/s;
- GFLOP/s: FLOPs counted once with ``torch.utils.flop_counter`` (attention through the math
  kernel, so that its products are counted) over the median time, against the best of several
  large square matmuls in this run's dtype;
- sampling: 50 DDIM steps with classifier-free guidance + decode, diffusers' StableDiffusionPipeline
  (DDIMScheduler, SD v1's settings) against ldmcore's samplers, same noise (outputs asserted equal);
- memory: each (framework, task) in a subprocess of its own that builds only its models: the peak
  RSS while running it minus the RSS before (heap trimmed, peak reset), on CPU;
  ``torch.cuda.max_memory_allocated`` above the allocation after building, on CUDA.

    python bench/vs_diffusers.py                        # CPU, fp32: writes the JSON and the table
    python bench/vs_diffusers.py --quick                # a smoke check: few rounds, 5 sampling steps
    python bench/vs_diffusers.py --compile --baseline abc026b
    python bench/vs_diffusers.py --render               # only rewrite the table from the JSON

--baseline adds the ldmcore UNet of an older version (a git revision, read with ``git archive``, or
a folder holding its ldmcore/) and, for the ablation, today's UNet with one change at a time put
back to that version's code (the forward of the classes the change touched, see CHANGES).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_diffusers_models import (  # noqa: E402
    CHANGES, GUIDANCE, ROOT, SAMPLE_RUNS, SCHEDULER, UNET, VAE, baseline_modules, check_parity, forward_call, inputs,
    load, make_weights, quiet_diffusers, revert, samplers,
)
from vs_diffusers_report import goals, machine, render, write_doc  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "vs_diffusers.json"
DOC = ROOT / "docs" / "performance.md"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----- timing ---------------------------------------------------------------------------------


def log(message: str) -> None:
    """Progress on stderr (the tables go to stdout at the end)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(cases: dict[str, Callable], rounds: int, device, warmup: int = 2) -> tuple[dict, dict]:
    """Per case: the times of ``rounds`` interleaved calls, and the time of its first warm-up call
    (which holds any compilation), after ``warmup`` untimed calls of each."""
    def timed(fn: Callable) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    first = {name: [timed(fn) for _ in range(warmup)][0] for name, fn in cases.items()} if warmup else {}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        for name in list(cases)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(cases[name]))
    return times, first


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse (mallopt) instead of handing large blocks back
    to the kernel: otherwise every fresh activation-sized tensor costs page faults, on CPU often
    more than the op that fills it. It affects every library in the process alike."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    ok = [libc.mallopt(m_mmap_threshold, 32 * 2**20),  # glibc's largest: blocks below come from the heap
          libc.mallopt(m_trim_threshold, 2**31 - 1),  # never give the heap's top back
          libc.mallopt(m_top_pad, 64 * 2**20)]
    if not all(ok):
        raise RuntimeError("mallopt refused a setting (not glibc?)")


def matmul_peak(device, dtype, n: int, repeats: int = 5) -> float:
    """Best GFLOP/s of an n×n×n matmul in ``dtype``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def count_flops(fn: Callable) -> float:
    """FLOPs of one call; attention through the math kernel so that its matmuls are counted."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def summarize(times: dict, items: int, flops: float | None, reference: str) -> dict:
    """Per case: median time, items/s, achieved GFLOP/s, and the speed relative to ``reference``
    as the median over rounds of the paired ratio (the calls of one round ran back to back, so a
    burst of load from other processes cancels out of their ratio)."""
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = statistics.median(r / t for r, t in zip(times[reference], ts))
        out[name] = {"median_s": med, "per_s": items / med, "vs_diffusers": ratio, "times_s": ts}
        if flops is not None:
            out[name]["gflops"] = flops / med / 1e9
    return out


# ----- the measurements ------------------------------------------------------------------------


def build_variants(folder: Path, args, device, dtype, base) -> dict[str, tuple[str, torch.nn.Module, bool]]:
    """name -> (framework, model, channels_last)."""
    theirs = load("diffusers", folder, "unet").to(device, dtype)
    ours = load("ldmcore", folder, "unet").to(device, dtype)
    variants = {"diffusers": ("diffusers", theirs, False),
                "diffusers channels-last": ("diffusers", copy.deepcopy(theirs).to(memory_format=torch.channels_last), True)}
    if base is not None:
        from ldmcore.interop import diffusers_config

        old = base.UNet(**diffusers_config.unet_kwargs(theirs.config)).eval()
        old.load_state_dict(load("ldmcore", folder, "unet").state_dict())
        variants[f"ldmcore @{Path(args.baseline).name}"] = ("ldmcore", old.to(device, dtype), False)
        for change, classes in CHANGES.items():
            variants[f"ldmcore without {change}"] = ("ldmcore", revert(ours, base, classes), False)
    variants["ldmcore"] = ("ldmcore", ours, False)
    variants["ldmcore channels-last"] = ("ldmcore", copy.deepcopy(ours).to(memory_format=torch.channels_last), True)
    if args.compile:
        variants["diffusers compiled"] = ("diffusers", torch.compile(copy.deepcopy(theirs)), False)
        variants["ldmcore compiled"] = ("ldmcore", torch.compile(copy.deepcopy(ours)), False)
    return variants


def network_benchmarks(folder: Path, args, device, dtype, base) -> dict:
    """FLOP counts, then forward and train-step times of every variant, interleaved."""
    x, t, context = inputs(args.batch, device, dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    variants = build_variants(folder, args, device, dtype, base)

    def call(name):
        framework, model, channels_last = variants[name]
        return forward_call(framework, model, x_cl if channels_last else x, t, context)

    def inference(fn):
        def run():
            with torch.inference_mode():
                fn()
        return run

    flops = {f: count_flops(inference(call(f))) for f in ("diffusers", "ldmcore")}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.mse_loss(call("ldmcore")(), x).backward()
    train_flops = float(counter.get_total_flops())
    for _, model, _ in variants.values():
        model.zero_grad(set_to_none=True)

    log(f"forward: {len(variants)} variants, {args.rounds} rounds (first calls compile)")
    with sdpa_context(args.sdpa):
        fwd_times, fwd_first = interleaved({n: inference(call(n)) for n in variants}, args.rounds, device)
        log("train steps")
        steps = {}
        for name, (framework, model, channels_last) in variants.items():
            trained = model if "compiled" in name else copy.deepcopy(model)  # a compiled module keeps its graph
            trained.train()
            optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-5)
            fn = forward_call(framework, trained, x_cl if channels_last else x, t, context)
            steps[name] = _train_step(fn, optimizer, torch.randn_like(x))
        train_times, train_first = interleaved(steps, args.rounds, device)
    compile_s = {n: {"forward": fwd_first[n] - statistics.median(fwd_times[n]),
                     "train": train_first[n] - statistics.median(train_times[n])} for n in variants if "compiled" in n}
    return {
        "flops": {"forward_gflop": flops["ldmcore"] / 1e9, "forward_gflop_diffusers": flops["diffusers"] / 1e9,
                  "train_gflop": train_flops / 1e9},
        "forward": summarize(fwd_times, args.batch, flops["ldmcore"], "diffusers"),
        "train": summarize(train_times, args.batch, train_flops, "diffusers"),
        "compile_s": compile_s,
    }


def _train_step(fn: Callable, optimizer: torch.optim.Optimizer, target: torch.Tensor) -> Callable[[], None]:
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(fn(), target).backward()
        optimizer.step()
    return step


def sdpa_context(backend: str):
    return nullcontext() if backend == "default" else sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[backend])


def sampling_benchmark(folder: Path, args, device, dtype) -> dict:
    runs = samplers(folder, args.sample_batch, args.steps, device, dtype, args.compile)
    log(f"sampling: {len(runs)} variants, {args.sample_rounds} rounds after one (compiling) run each")
    with sdpa_context(args.sdpa):
        # each run's own grad mode (the pipeline's no_grad, ldmcore's inference_mode): a compiled
        # network is compiled here, in the mode it is timed in
        images = {name: run().float() for name, run in runs.items()}  # also the warm-up
        times, _ = interleaved(runs, args.sample_rounds, device, warmup=0)
    parity = {name: float((im - images["diffusers pipeline"]).abs().max()) for name, im in images.items()}
    if dtype == torch.float32:  # compiled kernels may sum in another order: not held to this
        assert max(d for n, d in parity.items() if "compiled" not in n) < 1e-3, parity
    result = summarize(times, args.sample_batch, None, "diffusers pipeline")
    for name in result:
        result[name]["max_abs_vs_diffusers"] = parity[name]
    return {"steps": args.steps, "batch": args.sample_batch, "guidance_scale": GUIDANCE, "runs": result}


# ----- memory, in subprocesses -------------------------------------------------------------------


def probe_memory(folder: Path, framework: str, task: str, args) -> dict:
    """Run ``task`` twice with ``framework``'s models (only those are built); the peak memory above
    what the built models hold. CPU: the heap's free memory is handed back (``malloc_trim``), so
    that the RSS is what is live, the peak RSS is reset to it (Linux ``/proc/self/clear_refs``:
    loading weights peaks higher than some tasks), and the peak while running minus that RSS is
    returned; CUDA: the allocator's peak over its allocation."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if task == "sample":
        name = SAMPLE_RUNS[framework]
        run = samplers(folder, args.sample_batch, 3, device, dtype, compile=False, only=name)[name]
    else:
        unet = load(framework, folder, "unet").to(device, dtype)
        x, t, context = inputs(args.batch, device, dtype)
        fn = forward_call(framework, unet, x, t, context)
        if task == "forward":
            run = lambda: _no_grad(fn)  # noqa: E731
        else:
            unet.train()
            run = _train_step(fn, torch.optim.AdamW(unet.parameters(), lr=1e-5), torch.randn_like(x))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        return {"built_mib": before / 2**20, "peak_over_built_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap back to the kernel: the RSS is then what is live
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_mib("VmRSS")
    for _ in range(2):
        run()
    return {"built_mib": before, "peak_over_built_mib": _status_mib("VmHWM") - before}


def _no_grad(fn: Callable) -> None:
    with torch.inference_mode():
        fn()


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM: the peak RSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_benchmark(folder: Path, args) -> dict:
    method = ("torch.cuda.max_memory_allocated over the allocation after building, one subprocess per cell"
              if args.device == "cuda" else
              "peak RSS (VmHWM) while running, over the RSS after building the models and trimming the heap; "
              "one subprocess per cell, building only its models")
    out: dict = {"method": method}
    log("memory probes")
    for task in ("forward", "train", "sample"):
        out[task] = {}
        for name in SAMPLE_RUNS if task == "sample" else ("diffusers", "ldmcore"):
            command = [sys.executable, __file__, "--probe", name, task, "--folder", str(folder), *_shared_args(args)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"memory probe {name}/{task} failed:\n{done.stderr[-2000:]}")
            out[task][name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _shared_args(args) -> list[str]:
    return ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--batch", str(args.batch),
            "--sample-batch", str(args.sample_batch)]


# ----- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke check: few rounds, 5 sampling steps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants (minutes on a CPU)")
    parser.add_argument("--sdpa", default="default", choices=("default", "flash", "math"), help="attention kernel to force")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sample-batch", type=int, default=16, help="images per sampling run (the guided forward is twice this)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of forward and of train steps (default 15, quick 3)")
    parser.add_argument("--baseline", default=None,
                        help="an older ldmcore to add and ablate against: a git revision, or a folder holding its ldmcore/")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc: keep freed memory (mallopt) — fewer page faults for both frameworks")
    parser.add_argument("--skip", nargs="*", default=[], choices=("sampling", "memory"))
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--render", action="store_true", help="only rewrite the doc's table from --json")
    parser.add_argument("--probe", nargs=2, metavar=("FRAMEWORK", "TASK"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        write_doc(json.loads(args.json.read_text()), args.json, args.doc)
        return
    torch.set_num_threads(args.threads)
    quiet_diffusers()
    if args.probe:
        print(json.dumps(probe_memory(args.folder, *args.probe, args)))
        return
    if args.keep_freed_memory:
        keep_freed_memory()  # not in the memory probes: they measure the default allocator
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.steps, args.sample_rounds = (5, 1) if args.quick else (50, 3)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.compile and device.type == "cpu":
        import torch._inductor.config as inductor

        inductor.freezing = True  # inference graphs: weights as constants, prepacked for oneDNN

    load_start = os.getloadavg()
    peak_n = 2048 if device.type == "cpu" else 8192
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_weights(folder)
        result: dict = {"parity": check_parity(folder)}
        peak = matmul_peak(device, dtype, peak_n)
        base = baseline_modules(args.baseline) if args.baseline else None
        result.update(network_benchmarks(folder, args, device, dtype, base))
        if "sampling" not in args.skip:
            result["sampling"] = sampling_benchmark(folder, args, device, dtype)
        if "memory" not in args.skip:
            result["memory"] = memory_benchmark(folder, args)
        peak = max(peak, matmul_peak(device, dtype, peak_n))  # at the start and at the end: the best of both
    for table in ("forward", "train"):
        for row in result[table].values():
            row["pct_peak"] = 100 * row["gflops"] / peak
    import diffusers

    result["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + " ".join(sys.argv),
        "machine": machine(device), "threads": args.threads, "dtype": args.dtype, "device": args.device, "batch": args.batch,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "quick": args.quick, "compile": args.compile,
        "sdpa": args.sdpa, "keep_freed_memory": args.keep_freed_memory, "peak_gflops": peak, "peak_n": peak_n,
        "load_start": load_start, "load_end": os.getloadavg(),
        "unet_config": UNET, "vae_config": VAE, "scheduler": SCHEDULER,
    }
    result["goals"] = goals(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    write_doc(result, args.json, args.doc)
    print(render(result, args.json))


if __name__ == "__main__":
    main()
