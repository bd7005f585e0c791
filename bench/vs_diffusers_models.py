"""The matched models of bench/vs_diffusers.py (imported by it; bench/ is not a package).

The reference configuration built as diffusers models with random weights and loaded into ldmcore
through ``ldmcore.interop``; the parity check of the two; the sampling runs of both frameworks from
the same noise; and an older ldmcore (``--baseline``) with the changes to put back for the ablation.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=256, attention_head_dim=(2, 4, 8),  # heads per level: a head width of 32
)
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
)
# Stable Diffusion v1's DDIM settings (its scheduler_config.json)
SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1, clip_sample=False,
                 set_alpha_to_one=False)
TOKENS, GUIDANCE = 77, 7.5
# the memory probes' names for the sampling runs of `samplers`
SAMPLE_RUNS = {"diffusers": "diffusers pipeline", "ldmcore": "ldmcore", "ldmcore-reuse": "ldmcore + reuse_context"}
# ldmcore changes of this issue, by the classes whose forward each one touched (for the ablation)
CHANGES = {
    "in-place intermediates": ("ResBlock", "GEGLU", "BasicTransformerBlock", "UNet"),
    "merged q/k/v products": ("Attention",),
    "token-layout projections": ("SpatialTransformer",),
}


# ----- models ---------------------------------------------------------------------------------


def quiet_diffusers() -> None:
    """diffusers' advice on loading (accelerate, dtype casts) is noise in a benchmark's output."""
    from diffusers.utils import logging

    logging.set_verbosity_error()


def make_weights(folder: Path, seed: int = 0) -> None:
    """A diffusers pipeline folder (unet/, vae/, scheduler/) with random weights: diffusers' init
    plus noise on every tensor, so that no zero-initialized layer hides a difference."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    for name, model in (("unet", UNet2DConditionModel(**UNET)), ("vae", AutoencoderKL(**VAE))):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(folder / name)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))


def load(framework: str, folder: Path, part: str):
    """The unet or vae of ``folder`` as ``framework`` builds it, float32, eval mode."""
    if framework == "diffusers":
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
        return cls.from_pretrained(folder / part).eval()
    from ldmcore.interop import load_autoencoder, load_unet

    return (load_unet if part == "unet" else load_autoencoder)(folder)


def forward_call(framework: str, model, x, t, context) -> Callable[[], torch.Tensor]:
    if framework == "diffusers":
        return lambda: model(x, t, encoder_hidden_states=context, return_dict=False)[0]
    return lambda: model(x, t, context)


def inputs(batch: int, device, dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)  # (B, 4, 16, 16) latents
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, TOKENS, UNET["cross_attention_dim"], generator=g)  # (B, 77, 256)
    return x.to(device, dtype), t.to(device), context.to(device, dtype)


def baseline_modules(source: str) -> types.SimpleNamespace:
    """ldmcore's nn and denoiser packages of an older version, imported under another name.
    source: a git revision of this repository, or a folder holding that version's ldmcore/."""
    folder = Path(tempfile.mkdtemp(prefix="ldmcore-baseline-"))
    package = "ldmcore_baseline"
    if Path(source).is_dir():
        for part in ("nn", "denoiser"):
            shutil.copytree(Path(source) / "ldmcore" / part, folder / package / part)
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", source, "ldmcore/nn", "ldmcore/denoiser"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
        (folder / "ldmcore").rename(folder / package)
    (folder / package / "__init__.py").write_text("")
    sys.path.insert(0, str(folder))
    nn_mod, denoiser = importlib.import_module(f"{package}.nn"), importlib.import_module(f"{package}.denoiser")
    return types.SimpleNamespace(UNet=denoiser.UNet, classes={**vars(nn_mod), "UNet": denoiser.UNet})


def revert(model: torch.nn.Module, base: types.SimpleNamespace, classes: tuple[str, ...]) -> torch.nn.Module:
    """A copy of ldmcore's ``model`` whose modules of the named classes run the baseline's forward."""
    model = copy.deepcopy(model)
    for m in model.modules():
        name = type(m).__name__
        if name in classes:
            m.forward = types.MethodType(older_forward(base.classes[name].forward), m)  # deepcopy rebinds it
            if name == "SpatialTransformer":  # the older forward branched on the layer type
                m.use_linear = isinstance(m.proj_in, torch.nn.Linear)
    return model


def older_forward(forward: Callable) -> Callable:
    """An older version's (unbound) ``forward``, callable the way today's code calls it: arguments
    that today's callers pass and the older signature lacks (features added since, e.g. token-region
    biases) are dropped while they are None, and refused otherwise."""
    signature = inspect.signature(forward).parameters
    parameters = list(signature)[1:]  # without self
    takes_any = any(signature[p].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in parameters)

    def call(module, *args, **kwargs):
        if not takes_any:
            extra = [*args[len(parameters):], *(v for k, v in kwargs.items() if k not in parameters)]
            if any(value is not None for value in extra):
                raise TypeError(f"{type(module).__name__}: the baseline's forward{tuple(parameters)} cannot take an "
                                "argument that today's code passed (a feature added since); time the ablation without it")
            args, kwargs = args[: len(parameters)], {k: v for k, v in kwargs.items() if k in parameters}
        return forward(module, *args, **kwargs)

    return call


# ----- parity and sampling runs -------------------------------------------------------------------


def check_parity(folder: Path) -> dict:
    """Max abs differences of ldmcore against diffusers (fp32, CPU): UNet forward and VAE decode."""
    x, t, context = inputs(4, "cpu", torch.float32)
    with torch.inference_mode():
        unet = forward_call("diffusers", load("diffusers", folder, "unet"), x, t, context)()
        ours = forward_call("ldmcore", load("ldmcore", folder, "unet"), x, t, context)()
        image = load("diffusers", folder, "vae").decode(x).sample
        our_image = load("ldmcore", folder, "vae").decode(x)
    result = {"unet_max_abs": float((unet - ours).abs().max()), "vae_max_abs": float((image - our_image).abs().max())}
    assert unet.abs().max() > 0.1 and result["unet_max_abs"] < 1e-4 and result["vae_max_abs"] < 1e-4, result
    return result


def samplers(folder: Path, batch: int, steps: int, device, dtype, compile: bool, only: str | None = None,
             seed: int = 2) -> dict[str, Callable]:
    """name -> a function that samples ``batch`` images of 64 px, (B, 3, 64, 64) in [0, 1], from the
    same noise and contexts: diffusers' pipeline, and ldmcore's sampler + first stage; each with
    models of its own. only: build just that one."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldmcore.diffusion import classifier_free_guidance, sample_ddim
    from ldmcore.interop import diffusers_sigmas, load_noise_process
    from ldmcore.nn import reuse_context

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, 16, 16, generator=g).to(device, dtype)  # z_T
    cond = torch.randn(batch, TOKENS, UNET["cross_attention_dim"], generator=g).to(device, dtype)
    uncond = torch.zeros_like(cond)

    def diffusers_run(unet):
        pipe = StableDiffusionPipeline(
            vae=load("diffusers", folder, "vae"), text_encoder=None, tokenizer=None, unet=unet,
            scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        ).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        return lambda: pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=64, width=64, num_inference_steps=steps,
                            guidance_scale=GUIDANCE, latents=noise, output_type="pt").images

    process = load_noise_process(folder)
    sigmas = diffusers_sigmas(SCHEDULER, steps, process.schedule).to(device)

    def ldmcore_run(net, reuse: bool, channels_last: bool = False):
        vae = load("ldmcore", folder, "vae").to(device, dtype)
        denoiser = process.denoiser(lambda z, t, c: net(z, t, c["crossattn"]))
        model = classifier_free_guidance(denoiser, {"crossattn": cond}, {"crossattn": uncond}, GUIDANCE)
        z_T = noise.contiguous(memory_format=torch.channels_last) if channels_last else noise

        def run():
            with torch.inference_mode(), reuse_context(net) if reuse else nullcontext():
                x = sample_ddim(model, process.initial_noise(z_T, sigmas[0]), sigmas)
                z0 = x / (1 + sigmas[-1] ** 2).sqrt()  # VE -> VP: the last σ is σ_0 > 0 (set_alpha_to_one=False)
                return (vae.decode(z0 / vae.scale_factor) / 2 + 0.5).clamp(0, 1)
        return run

    def theirs():
        return load("diffusers", folder, "unet").to(device, dtype)

    def ours(memory_format=torch.contiguous_format):
        return load("ldmcore", folder, "unet").to(device, dtype, memory_format=memory_format)

    factories = {
        "diffusers pipeline": lambda: diffusers_run(theirs()),
        "ldmcore": lambda: ldmcore_run(ours(), reuse=False),
        "ldmcore + reuse_context": lambda: ldmcore_run(ours(), reuse=True),
        "ldmcore + reuse_context, channels-last": lambda: ldmcore_run(
            ours(torch.channels_last), reuse=True, channels_last=True),
    }
    if compile:
        factories["diffusers pipeline compiled"] = lambda: diffusers_run(torch.compile(theirs()))
        factories["ldmcore compiled"] = lambda: ldmcore_run(torch.compile(ours()), reuse=False)
    return {name: factories[name]() for name in ([only] if only else factories)}
