"""The run's tasks: ``train`` (stage 1, stage 2, grid and scores), ``sample`` (from a conditions
file) and ``eval`` (score a checkpoint). Each writes into ``run_dir``."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from ldmcore.config import ConfigError, validate
from ldmcore.data.base import DataInfo, skip_summary
from ldmcore.data.stream import data_config, head, streams
from ldmcore.model_config import check_same_model, checkpoint_run_config
from ldmcore.sampling import generate, guidance_plan
from ldmcore.pluginmanager import installed
from ldmcore.system import build, build_system, set_threads
from ldmcore.training import distributed
from ldmcore.training.checkpoint import CheckpointError, load_checkpoint, load_module_state
from ldmcore.training.first_stage import obtain_first_stage
from ldmcore.training.loop import LatentPool, train_denoiser
from ldmcore.training.streaming import LatentStream, estimate_scale_factor
from ldmcore.visualize import save_grid, save_image

log = logging.getLogger(__name__)


# --- evaluation shared by train and eval -------------------------------------------------------


def given_conditions(system, cfg: DictConfig) -> list[str]:
    """The conditions an evaluation gives the model, in the model's order: ``present``, or all."""
    return list(system.conditions) if cfg.present is None else [n for n in system.conditions if n in cfg.present]


def grid_batch(system, dataset, cfg: DictConfig) -> tuple[dict, int, list[str] | None]:
    """The conditions of the evaluation grid: rows from the first given plugin that lays out a grid
    (e.g. one row per class), the remaining batch keys drawn from the data source."""
    columns, rows, labels, planned = cfg.trainer.grid_columns, cfg.trainer.grid_rows, None, {}
    for name in given_conditions(system, cfg):
        condition = system.conditions[name]
        if condition.implements("ldmcore_grid_conditions"):
            planned, labels = condition.call("ldmcore_grid_conditions", rows=rows, columns=columns,
                                              options=cfg.condition[name], data=system.data)
            rows = len(labels)
            break
    n = rows * columns
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    if streams(dataset):  # nothing to index: the data's first n samples
        drawn = head(dataset, n)
    else:
        drawn = dataset.batch(torch.randint(len(dataset), (n,), generator=generator).tolist())
    return {**drawn, **planned}, n, labels


def score(system, images: torch.Tensor, batch: dict, score_with=()) -> dict:
    scores = {}
    reader = system.data.reader
    if reader is not None:
        objects = reader.read_batch(images)
        scores["readable"] = sum(reader.readable(o) for o in objects) / len(objects)
    successes = {}
    for name, (condition, options) in scoring_conditions(system, score_with).items():
        if condition.implements("ldmcore_score"):
            scores.update(condition.call("ldmcore_score", images=images, batch=batch, options=options, data=system.data))
        verdicts = (condition.call("ldmcore_sample_success", images=images, batch=batch, options=options, data=system.data)
                    if condition.implements("ldmcore_sample_success") else None)
        if verdicts is not None:  # None: the plugin cannot judge these images (e.g. no exact reader)
            success = [bool(s) for s in verdicts]
            if len(success) != len(images):
                raise ValueError(f"plugin {name!r}: ldmcore_sample_success gave {len(success)} values for {len(images)} images")
            successes[name] = success
    if len(successes) >= 2:  # faithful to every scored condition at once, sample by sample
        scores["joint_accuracy"] = sum(all(s) for s in zip(*successes.values())) / len(images)
    return scores


def scoring_conditions(system, score_with=()) -> dict:
    """The model's conditions with their options, then each ``score_with`` plugin the model lacks
    with its default options (its own ``condition/NAME.yaml``): these score samples generated
    without their condition, the baseline of a model trained without it."""
    chosen = {name: (c, system.condition_options[name]) for name, c in system.conditions.items()}
    registry = installed()
    for name in score_with:
        if name in chosen:
            continue
        try:
            condition = registry.get(name)
        except KeyError as error:
            raise ConfigError(f"score_with: {error.args[0]}") from None
        options = condition.default_options()
        missing = [k for k in condition.call("ldmcore_batch_keys", options=options) if k not in system.data.provides]
        if missing:
            raise ConfigError(f"score_with: {name!r} reads batch keys {missing} that the data source {system.data.name} does not provide")
        chosen[name] = (condition, options)
    return chosen


def condition_pictures(system, batch: dict) -> list[torch.Tensor]:
    """The pictures of the grid's conditions (plugins implementing ``ldmcore_draw_condition``)."""
    return [condition.call("ldmcore_draw_condition", batch=batch, options=system.condition_options[name], data=system.data).cpu()
            for name, condition in system.conditions.items() if condition.implements("ldmcore_draw_condition")]


def evaluate(system, model, dataset, cfg: DictConfig, run_dir: Path, grid_name: str = "samples.png") -> dict:
    start = time.perf_counter()
    batch, n, labels = grid_batch(system, dataset, cfg)
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    present = given_conditions(system, cfg)
    images = generate(system, model.eval(), batch, n, cfg.sampler, generator, present=present, weak_model=system.guide)
    pictures = condition_pictures(system, batch)  # each (n, 3, H, W)
    tiles = torch.stack([*pictures, images], dim=1).flatten(0, 1)  # each sample after the pictures of its conditions
    save_grid(tiles, Path(run_dir) / grid_name, cfg.trainer.grid_columns * (1 + len(pictures)), labels)
    scores = score(system, images, batch, cfg.get("score_with") or ())
    scores["score_names"] = list(scores)  # which metrics are faithfulness scores (a guidance sweep plots them)
    scores.update(present=present, samples=n, sampler=cfg.sampler.name, sampler_steps=cfg.sampler.steps,
                  guidance_scale=cfg.sampler.guidance_scale,
                  guidance_scales=guidance_plan(cfg.sampler, list(system.conditions), present)[1],  # per present condition
                  autoguidance_scale=cfg.sampler.autoguidance_scale if system.guide is not None else None,
                  conditional_autoguidance_scale=(cfg.sampler.get("conditional_autoguidance_scale", 1.0)
                                                  if system.guide is not None and present else None),
                  eval_seconds=time.perf_counter() - start)
    return scores


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


# --- train -------------------------------------------------------------------------------------


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Stage 1, stage 2, final grid and scores. Under torchrun (docs/scaling.md) rank 0 reads the
    checkpoint, obtains the first stage, encodes the latent pool and writes every file; the other
    ranks receive what it read or built and only train."""
    cfg = validate(cfg)
    set_threads(cfg)
    ctx = distributed.current()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    run_dir = Path(run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dataset = build("data", data_config(cfg.data, cfg.trainer.latents))  # stream mode: its streaming form, if any
    system = build_system(cfg, dataset)  # checks plugins and batch keys before any work
    scoring_conditions(system, cfg.score_with)  # a bad score_with fails now, not after training
    resume = None
    if cfg.checkpoint:  # task=train with a checkpoint continues that run

        def read_checkpoint() -> tuple[dict, dict, Path]:
            tensors, state, saved_cfg, folder = load_checkpoint(cfg.checkpoint)
            if saved_cfg is not None:
                check_same_model(saved_cfg, cfg, folder)
            return tensors, state, folder

        tensors, state, folder = distributed.on_main(read_checkpoint, ctx)
        load_module_state(system.first_stage, tensors, "first_stage", source=str(folder))
        system.first_stage.eval().requires_grad_(False)
        resume = {"tensors": tensors, "state": state, "folder": folder}
        first_stage_record = {"source": str(folder), "resumed": True}
    else:

        def first_stage() -> dict:
            obtained, record = obtain_first_stage(cfg, dataset, system.data.reader, run_dir)
            # In place, never a new object: condition encoders built with the first stage hold this one.
            system.first_stage.load_state_dict(obtained.state_dict())
            return record

        first_stage_record = distributed.on_main(first_stage, ctx)
        distributed.broadcast_module(system.first_stage, ctx)  # rank 0's weights on every rank
        system.first_stage.eval().requires_grad_(False)
    first_stage_seconds = time.perf_counter() - start

    if cfg.trainer.latents == "stream":  # no pool: each batch is encoded as it is read (docs/data.md "Streaming")
        measured = distributed.on_main(lambda: estimate_scale_factor(
            system.first_stage, dataset, cfg.trainer.scale_batches, cfg.trainer.batch_size, cfg.seed), ctx)
        latents = LatentStream(system.first_stage, dataset, measured, cfg.seed)
    else:
        latents = distributed.on_main(lambda: LatentPool.encode(system.first_stage, dataset, seed=cfg.seed), ctx)
    if resume is not None:
        latents.scale_factor = resume["state"]["scale_factor"]
    elif cfg.autoencoder.scale_factor is not None:  # given (e.g. a pretrained VAE's own) instead of the measured 1/std
        log.info("latent scale factor %s as given (1/std measured on this data: %.5f)", cfg.autoencoder.scale_factor, latents.scale_factor)
        latents.scale_factor = cfg.autoencoder.scale_factor
    system.first_stage.scale_factor.fill_(latents.scale_factor)
    result = train_denoiser(system, dataset, latents, cfg, run_dir, resume,
                            on_sample=lambda step, ema: evaluate(system, ema, dataset, cfg, run_dir, f"samples/step_{step:07d}.png"))
    if not ctx.is_main:  # rank 0 writes the grid and the metrics
        return {key: result[key] for key in ("stopped_by", "step", "skipped_steps")}
    if result["stopped_by"]:  # SIGTERM / SIGINT: the checkpoint is written; leave without the final grid
        stopped = {**{key: result[key] for key in ("stopped_by", "step", "skipped_steps")}, "checkpoint": str(result["checkpoint"])}
        write_json(run_dir / "metrics.json", stopped)
        return stopped
    system.attach_guide({f"guide.{k}": v for k, v in (result["guide"] or {}).items()})
    metrics = evaluate(system, result["ema"], dataset, cfg, run_dir)
    metrics.update(
        first_stage=first_stage_record.get("metrics"),
        first_stage_seconds=first_stage_seconds,
        denoiser_seconds=result["train_seconds"],
        total_seconds=time.perf_counter() - start,
        checkpoint=str(result["checkpoint"]),
        skipped_steps=result["skipped_steps"],
        data_skips=skip_summary(dataset),
        resumed_from=str(resume["folder"]) if resume else None,
        conditions=list(system.conditions),
        seed=cfg.seed,
    )
    write_json(run_dir / "metrics.json", metrics)
    log.info("metrics: %s", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


# --- loading a trained model -------------------------------------------------------------------


def load_trained(cfg: DictConfig):
    """The checkpoint's system (its own resolved config) with EMA weights; sampler and seed
    come from the current config."""
    if not cfg.checkpoint:
        raise ConfigError(f"task={cfg.task} needs checkpoint=PATH (a run folder or a checkpoint folder)")
    tensors, state, saved_cfg, folder = load_checkpoint(cfg.checkpoint)
    if saved_cfg is None:
        raise CheckpointError(f"{folder} carries no config.yaml; it cannot be rebuilt")
    merged = checkpoint_run_config(cfg, saved_cfg)
    dataset = build("data", data_config(merged.data, merged.trainer.latents))
    system = build_system(merged, dataset)
    load_module_state(system.first_stage, tensors, "first_stage", source=str(folder))
    load_module_state(system.model, tensors, "ema", source=str(folder))
    system.attach_guide(tensors)
    system.first_stage.eval()
    system.model.eval()
    return system, dataset, merged


def evaluate_checkpoint(cfg: DictConfig, run_dir: Path) -> dict:
    cfg = validate(cfg)
    set_threads(cfg)
    system, dataset, merged = load_trained(cfg)
    scoring_conditions(system, cfg.score_with)  # before sampling
    metrics = evaluate(system, system.model, dataset, merged, run_dir)
    metrics["checkpoint"] = str(cfg.checkpoint)
    write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics


# --- sample from a conditions file -------------------------------------------------------------


def read_conditions(path: Path, system, data: DataInfo | None = None) -> list[tuple[dict, dict]]:
    """Each line: ``{condition: user value}``. Returns (line, parsed batch keys) per line; any
    bad line stops the run before sampling, naming the file, line and condition. Values are read
    against ``data`` (default the model's data; its resolution is the output's); file paths in them
    are relative to the file's folder."""
    data = data or system.data
    if not path.is_file():
        raise ConfigError(f"conditions file {path} does not exist")
    root = path.absolute().parent
    entries = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(line, dict):
            raise ConfigError(f"{where}: each line must be a JSON object of {{condition: value}}")
        unknown = set(line) - set(system.conditions)
        if unknown:
            raise ConfigError(f"{where}: unknown condition(s) {sorted(unknown)}; this model has {sorted(system.conditions) or 'none'}")
        parsed = {}
        for name, value in line.items():
            try:
                parsed.update(system.conditions[name].call("ldmcore_parse_value", value=value,
                                                          options=system.condition_options[name], data=data, root=root))
            except ValueError as error:
                raise ConfigError(f"{where}: condition {name!r}: {error}") from None
        entries.append((line, parsed))
    return entries


def collate(samples: list[dict]) -> dict:
    keys = samples[0].keys()
    out = {}
    for key in keys:
        values = [s[key] for s in samples]
        same_shape = all(torch.is_tensor(v) for v in values) and len({tuple(v.shape) for v in values}) == 1
        out[key] = torch.stack(values) if same_shape else values
    return out


def sample(cfg: DictConfig, run_dir: Path) -> dict:
    cfg = validate(cfg)
    set_threads(cfg)
    if not cfg.conditions:
        raise ConfigError("task=sample needs conditions=FILE (JSON lines, one {condition: value} object per image)")
    system, _, merged = load_trained(cfg)
    # Convolutional sampling (paper Sec. 4.3.2): a larger latent, and conditions read at the output size.
    scale = cfg.sample_scale
    c, h, w = system.latent_shape
    output_data = dataclasses.replace(system.data, resolution=system.data.resolution * scale)
    entries = read_conditions(Path(cfg.conditions).expanduser(), system, output_data)
    run_dir = Path(run_dir)
    generator = torch.Generator().manual_seed(cfg.seed)
    groups: dict[tuple, list[int]] = {}
    for i, (line, _) in enumerate(entries):  # lines giving the same conditions are sampled together
        groups.setdefault(tuple(sorted(line)), []).append(i)
    files = [None] * len(entries)
    for present, indices in groups.items():
        batch = collate([entries[i][1] for i in indices]) if present else {}
        images = generate(system, system.model, batch, len(indices), merged.sampler, generator, present=present,
                          latent_shape=(c, h * scale, w * scale), weak_model=system.guide)
        for i, image in zip(indices, images):
            files[i] = f"{i:06d}.png"
            save_image(image, run_dir / files[i])
    with open(run_dir / "manifest.jsonl", "w") as manifest:
        for (line, _), file in zip(entries, files):
            manifest.write(json.dumps({**line, "file": file}) + "\n")
    return {"images": len(entries)}


TASKS = {"train": train, "sample": sample, "eval": evaluate_checkpoint}
