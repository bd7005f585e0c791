"""The contract between the core and a condition plugin.

A condition plugin is a module (or object) registered under the ``ldmcore.plugins`` entry-point
group. It implements some of the hooks below with ``@hookimpl``. Every hook is called for one
plugin at a time (see :class:`ldmcore.pluginmanager.Condition`), so an implementation never has
to check whether a call is meant for it. As in pluggy generally, an implementation may accept
fewer arguments than its specification names: specifications can grow without breaking plugins.

Words used below:
    options   the plugin's own Hydra config (``cfg.condition.<name>``), a DictConfig.
    data      the :class:`ldmcore.data.DataInfo` of the run's data source (resolution,
              class names, an optional exact reader of images).
    batch     a plain dict of batch keys (``image``, ``class_label``, ``caption`` ...).
    cache_dir the run's cache folder (``cfg.cache_dir``), a :class:`pathlib.Path` with ``~``
              expanded, or None where there is none. It is where a plugin keeps what it can rebuild
              (a fitted tokenizer, files it writes). Never put it in a plugin's own config: the config
              is saved with each checkpoint and compared on resume, and a cache is no part of the model.
"""

from __future__ import annotations

import pluggy

PROJECT = "ldmcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- identity and configuration -------------------------------------------------------------


@hookspec(firstresult=True)
def ldmcore_condition_name() -> str:
    """Required. The condition's name: ``+condition=NAME`` selects it and conditions files key
    user values by it. Lower case, unique among installed plugins."""


@hookspec(firstresult=True)
def ldmcore_config_dir() -> str:
    """Required. A folder that holds ``condition/NAME.yaml``, the plugin's Hydra config. The file
    starts with ``# @package condition.NAME`` and sets at least ``dropout`` (the probability
    that training replaces the condition by its null condition)."""


@hookspec(firstresult=True)
def ldmcore_batch_keys(options) -> list[str]:
    """Required. The batch keys the plugin reads. The run checks them against the keys the data
    source provides before any training step."""


# --- the encoder tau_theta ---------------------------------------------------------------------


@hookspec(firstresult=True)
def ldmcore_build_encoder(options, data, latent_shape, first_stage, cache_dir):
    """Required. Build the condition encoder tau_theta: an :class:`ldmcore.conditioning.ConditionEncoder`.

    The encoder declares its injection(s) in ``encoder.outputs`` (a dict from ``"concat"``,
    ``"crossattn"`` or ``"vector"`` to the per-sample shape it produces), maps a batch to a dict
    with those keys, and gives its null condition (learned or zero) for guidance and dropout.
    An encoder whose tokens each apply to a known part of the image sets ``token_regions`` and
    also returns ``crossattn_regions`` (``ConditionEncoder``'s docstring).
    ``latent_shape`` is the first stage's latent (C, h, w) at ``data.resolution``: a concat
    encoder brings its condition to that size (``data.resolution // h`` is the downsampling
    factor). Sampling may use a larger latent (convolutional sampling), so a concat encoder
    should scale its input by that factor rather than resize it to a fixed (h, w).
    ``first_stage`` is the run's autoencoder, for an encoder that works in latent space (e.g. the
    latent of a known image). Its weights and ``scale_factor`` are set only after this hook (trained,
    cached or loaded from a checkpoint, always in place), so read them at call time, never copy them;
    hold it without registering it as a submodule (``ldmcore.conditioning.FrozenReference``): it is
    frozen, and not part of the denoiser's weights, optimizer, EMA or checkpoint.
    ``cache_dir`` (see above) is where an encoder may keep what it derives from the data (e.g. a
    tokenizer fitted to the captions); the same model is built whatever the folder.
    """


# --- user-facing values (conditions files, manifests) -----------------------------------------


@hookspec(firstresult=True)
def ldmcore_parse_value(value, options, data, root) -> dict:
    """Required. Read one user-given value (a JSON value from a conditions file, e.g. a class name)
    into the batch keys of ONE sample (tensors without a batch dimension, or python values).
    A value the plugin cannot read raises ``ValueError`` whose message says what is allowed.
    ``root`` is the folder of the conditions file (a :class:`pathlib.Path`): a relative file path in
    a value is relative to it, not to the working directory; an absolute path (or ``~/...``) stays as
    it is. ``root / Path(path).expanduser()`` gives both."""


@hookspec(firstresult=True)
def ldmcore_format_value(batch, index, options, data, cache_dir):
    """Required. The inverse of ``ldmcore_parse_value``: the JSON value describing sample ``index``
    of ``batch``, as a conditions file would give it. A value that names files (e.g. images) names
    absolute paths; the plugin writes those files under ``cache_dir`` (see above), or a temporary
    folder where it is None."""


# --- sampling (optional) -----------------------------------------------------------------------


@hookspec(firstresult=True)
def ldmcore_finalize(images, batch, options, data):
    """Optional. Post-process images decoded from samples that were given this condition:
    ``images`` (B x 3 x H x W in [-1, 1]) and the ``batch`` of their conditions -> images of the
    same shape (e.g. paste back pixels the condition fixes). Called after decoding, once for each
    condition present; return a new tensor, never change ``images`` in place."""


# --- evaluation and display (optional) ---------------------------------------------------------


@hookspec(firstresult=True)
def ldmcore_draw_condition(batch, options, data):
    """Optional. A picture of each sample's condition, B x 3 x H x W in [-1, 1] at the images'
    size, shown beside each sample in the evaluation grid."""


@hookspec(firstresult=True)
def ldmcore_grid_conditions(rows: int, columns: int, options, data):
    """Optional. The conditions of a sample grid: ``(batch, row_labels)`` where ``batch`` holds
    ``rows * columns`` samples in row-major order and ``row_labels`` names each row (e.g. one row
    per class). Without it, grids show conditions drawn from the data source."""


@hookspec(firstresult=True)
def ldmcore_score(images, batch, options, data) -> dict:
    """Optional. Faithfulness of generated ``images`` (B x 3 x H x W in [-1, 1]) to the
    conditions in ``batch``: a dict of named floats (e.g. ``{"class_accuracy": 0.97}``). Use
    ``data.reader`` where the data source offers an exact reader of images. Scores are ratios in
    [0, 1] unless their name ends in ``_db`` (decibels, e.g. ``psnr_db``)."""


@hookspec(firstresult=True)
def ldmcore_sample_success(images, batch, options, data) -> list:
    """Optional. Whether each generated image is faithful to its condition: one bool per sample
    (the per-sample form of the plugin's headline score, e.g. "every box recalled"). Where two or
    more scored conditions implement it, the evaluation reports ``joint_accuracy``: the share of
    samples faithful to all of them at once (e.g. the caption AND every box of a layout). Return
    None where the plugin cannot judge (e.g. ``data.reader`` is None)."""
