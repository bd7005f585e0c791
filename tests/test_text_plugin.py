"""The text condition: its tokenizer (fitted to the data's captions, cached by caption set), the
learned and the pretrained (local Hugging Face) encoders, user values, scoring, and its data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from ldmcore.config import validate
from ldmcore.data.base import DataInfo, data_info
from ldmcore.data.shapes import ShapesWorld
from ldmcore.pluginmanager import installed
from ldmcore.system import build_system
from ldmcore.model_config import check_same_model, checkpoint_run_config
from ldmcore.nn.tokenizer import BEGIN, END, PAD, Tokenizer, fit_sentencepiece, obtain_tokenizer

LATENT = (8, 8)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(resolution=32, kind="multi", size=96, seed=5)


@pytest.fixture(scope="module")
def info(world):
    return data_info(world)


@pytest.fixture(scope="module")
def text():
    return installed().get("text")


def options(**changes):
    path = Path(installed().get("text").call("ldmcore_config_dir")) / "condition" / "text.yaml"
    opts = OmegaConf.load(path)
    opts.merge_with({"embed_dim": 32, "depth": 1, "num_heads": 2, **changes})
    return opts


def build(text, info, cache_dir=None, **changes):
    # text reads neither the latent's shape nor the first stage: the hookspec's arguments, given as None
    return text.call("ldmcore_build_encoder", options=options(**changes), data=info, latent_shape=None, first_stage=None,
                     cache_dir=cache_dir)


# --- tokenizer ---------------------------------------------------------------------------------


def test_data_lists_the_values_of_a_batch_key(world, info):
    assert info.values("caption", 10) == world.batch(list(range(10)))["caption"]
    assert len(info.values("caption")) == len(world)


def test_tokenizer_fits_the_caption_words_and_frames_each_caption(info):
    tokenizer = Tokenizer(fit_sentencepiece(sorted(set(info.values("caption"))), 128, "bpe"))
    assert tokenizer.pieces("a red circle and a blue square") == ["▁a", "▁red", "▁circle", "▁and", "▁a", "▁blue", "▁square"]
    tokens, keep = tokenizer.encode(["a red circle", ""], 8)
    assert tokens[0, 0] == BEGIN and tokens[0, 4] == END and tokens[0, 5:].eq(PAD).all()
    assert tokens[1, :2].tolist() == [BEGIN, END] and keep[1].tolist() == [True, True] + [False] * 6
    long, _ = tokenizer.encode(["a red circle, a blue square and a green triangle"], 5)  # cut, end kept
    assert long[0, 0] == BEGIN and long[0, -1] == END
    unseen, _ = tokenizer.encode(["a purple hexagon"], 24)  # unknown words still encode
    assert unseen[0, 0] == BEGIN


def test_tokenizer_is_deterministic_and_cached_by_caption_set(info, tmp_path):
    captions = info.values("caption")
    first = obtain_tokenizer(captions, 128, "bpe", str(tmp_path))
    cached = list((tmp_path / "tokenizers").glob("*.model"))
    assert len(cached) == 1 and first.source == str(cached[0])
    again = obtain_tokenizer(list(reversed(captions)) + captions[:5], 128, "bpe", str(tmp_path))  # same set
    assert again.source == first.source and again.digest == first.digest
    assert Tokenizer(fit_sentencepiece(sorted(set(captions)), 128, "bpe")).digest == first.digest  # refit: same bytes
    obtain_tokenizer(captions[:20], 128, "bpe", str(tmp_path))  # another caption set: another file
    assert len(list((tmp_path / "tokenizers").glob("*.model"))) == 2


def test_build_caches_the_tokenizer_in_the_cache_dir_it_is_given(text, info, tmp_path):
    encoder = build(text, info, cache_dir=tmp_path)
    assert encoder.tokenizer.source.startswith(str(tmp_path / "tokenizers"))
    assert build(text, info, cache_dir=tmp_path).tokenizer.source == encoder.tokenizer.source
    assert build(text, info).tokenizer.source == "memory"  # no cache folder: fitted, kept nowhere


def test_the_run_cache_dir_reaches_the_tokenizer_but_not_the_model_config(tmp_path):
    """The cache folder is handed to the hook: a model resumed or sampled with another cache_dir is the same model."""
    cfgs = [validate(compose_config(["+condition=text", "+experiment=tiny", "condition.text.embed_dim=32",
                                     f"cache_dir={tmp_path / name}"])) for name in ("a", "b")]
    assert "tokenizer_cache" not in cfgs[0].condition.text
    check_same_model(cfgs[0], cfgs[1], "RUN")  # only cache_dir differs: not refused
    system = build_system(cfgs[0], ShapesWorld(resolution=32, kind="multi", size=32, seed=1))
    assert system.model.conditioner.encoders["text"].tokenizer.source.startswith(str(tmp_path / "a" / "tokenizers"))


def test_a_checkpoint_config_that_still_names_a_tokenizer_cache_loads(tmp_path):
    """Checkpoints written while the cache path was a condition option keep it in their config.yaml."""
    current = validate(compose_config(["+condition=text", "+experiment=tiny", f"cache_dir={tmp_path / 'now'}"]))
    saved = OmegaConf.create(OmegaConf.to_yaml(current, resolve=True))
    saved.condition.text.tokenizer_cache = str(tmp_path / "then")
    check_same_model(saved, current, "RUN")
    rebuilt = checkpoint_run_config(current, saved)  # as load_trained rebuilds the checkpoint's model
    encoder = build_system(rebuilt, ShapesWorld(resolution=32, kind="multi", size=32, seed=1)).model.conditioner.encoders["text"]
    assert encoder.tokenizer.source.startswith(str(tmp_path / "now"))  # the option is ignored: the run's cache_dir


# --- the learned encoder -----------------------------------------------------------------------


def test_learned_encoder_tokens_null_and_gradients(text, world, info):
    encoder = build(text, info, max_length=16)
    assert encoder.outputs == {"crossattn": (16, 32)}
    batch = world.batch([0, 1, 2])
    out = encoder(batch)["crossattn"]
    assert out.shape == (3, 16, 32)
    null = encoder.null(3, LATENT, torch.device("cpu"))["crossattn"]
    torch.testing.assert_close(null, encoder.encode([""] * 3))  # the encoding of the empty caption
    out.sum().backward()
    assert encoder.transformer.token_embedding.weight.grad is not None  # trained with the denoiser
    zeros = build(text, info, null_condition="zeros").null(2, LATENT, torch.device("cpu"))["crossattn"]
    assert zeros.shape == (2, 24, 32) and not zeros.any()


def test_token_embedding_adds_each_pieces_own_embedding_to_its_output(text, world, info):
    captions = {"caption": ["a red circle", "a blue circle"]}
    torch.manual_seed(0)
    plain = build(text, info, token_embedding=False, position_embedding=False)
    torch.manual_seed(0)
    named = build(text, info, token_embedding=True, position_embedding=False)
    assert plain.token_embedding is None and "token_embedding.weight" in named.state_dict()
    tokens, _ = named.tokenizer.encode(captions["caption"], named.max_length)
    torch.testing.assert_close(named(captions)["crossattn"] - plain(captions)["crossattn"], named.token_embedding(tokens))
    out = named(captions)["crossattn"]
    differs = (tokens[0] != tokens[1]).nonzero().flatten().tolist()  # the colour's piece(s)
    assert differs and all(not torch.allclose(out[0, i], out[1, i], atol=0.5) for i in differs)


def test_position_embedding_tells_the_objects_of_a_caption_apart(text, world, info):
    """The same piece at the first and at the second object's place reaches the denoiser as two
    different tokens: the position's own embedding is added to each output token."""
    captions = {"caption": ["a red circle and a blue square", "a blue square and a red circle"]}
    torch.manual_seed(0)
    plain = build(text, info, token_embedding=True, position_embedding=False)
    torch.manual_seed(0)
    placed = build(text, info, token_embedding=True, position_embedding=True)
    assert plain.position_embedding is None and placed.state_dict()["position_embedding"].shape == (24, 32)
    difference = placed(captions)["crossattn"] - plain(captions)["crossattn"]
    torch.testing.assert_close(difference, placed.position_embedding.expand_as(difference))
    pieces = placed.tokenizer.pieces(captions["caption"][0])
    red = pieces.index("▁red") + 1  # after the begin token: the first object's colour, the second object's in the other
    other = placed.tokenizer.pieces(captions["caption"][1]).index("▁red") + 1
    assert red != other
    out, before = placed(captions)["crossattn"], plain(captions)["crossattn"]
    assert (out[0, red] - out[1, other]).norm() > 2 * (before[0, red] - before[1, other]).norm()
    placed(captions)["crossattn"].sum().backward()
    assert placed.position_embedding.grad is not None  # learned with the denoiser


def test_weights_of_another_tokenizer_are_refused(text, world, info):
    encoder = build(text, info)
    other = build(text, data_info(ShapesWorld(resolution=32, kind="single", size=40, seed=1)))
    assert other.tokenizer.digest != encoder.tokenizer.digest
    with pytest.raises(ValueError, match="another tokenizer"):
        encoder.load_state_dict(other.state_dict())
    encoder.load_state_dict(build(text, info).state_dict())  # the same tokenizer loads


def test_learned_encoder_needs_a_data_source_that_lists_captions(text, info):
    blind = DataInfo(name="Stream", resolution=32, provides=("image", "caption"))
    with pytest.raises(ValueError, match="Stream"):
        build(text, blind)


def test_bad_options_are_named(text, info):
    with pytest.raises(ValueError, match="null_condition"):
        build(text, info, null_condition="nothing")
    with pytest.raises(ValueError, match="condition.text.encoder"):
        build(text, info, encoder="magic")
    with pytest.raises(ValueError, match="condition.text.pretrained"):
        build(text, info, encoder="pretrained")


# --- the pretrained encoder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny BERT and a WordPiece vocabulary written here: no download."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = ["a", "and", ",", "red", "green", "blue", "yellow", "magenta", "cyan", "circle", "square", "triangle"]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    config = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def test_pretrained_encoder_from_a_local_folder_is_frozen(text, world, info, tiny_bert):
    encoder = build(text, info, encoder="pretrained", pretrained=str(tiny_bert), max_length=12)
    assert encoder.outputs == {"crossattn": (12, 16)}
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training  # no dropout in a frozen encoder
    batch = world.batch([0, 1])
    out = encoder(batch)["crossattn"]
    assert out.shape == (2, 12, 16)
    null = encoder.null(2, LATENT, torch.device("cpu"))["crossattn"]
    torch.testing.assert_close(null, encoder.encode(["", ""]))
    assert not torch.allclose(out, null)


def test_pretrained_path_that_is_not_a_model_is_named(text, info, tmp_path):
    with pytest.raises(ValueError, match="not a local Hugging Face model folder"):
        build(text, info, encoder="pretrained", pretrained=str(tmp_path / "nothing"))


# --- user values and scores --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "   ", 3, None, ["a red circle"], {"caption": "a red circle"}])
def test_parse_refuses_what_is_not_a_caption(text, info, value):
    with pytest.raises(ValueError, match="non-empty caption"):
        text.call("ldmcore_parse_value", value=value, options=options(), data=info, root=None)


def test_parse_and_format(text, world, info):
    parsed = text.call("ldmcore_parse_value", value="a red circle", options=options(), data=info, root=None)
    assert parsed == {"caption": "a red circle"}
    batch = world.batch([3, 4])
    assert text.call("ldmcore_format_value", batch=batch, index=1, options=options(), data=info, cache_dir=None) == batch["caption"][1]


def test_caption_accuracy_of_true_and_of_swapped_captions(text, world, info):
    batch = world.batch(list(range(8)))
    scores = text.call("ldmcore_score", images=batch["image"], batch=batch, options=options(), data=info)
    assert scores["caption_accuracy"] == 1.0 and scores["caption_accuracy_1_2"] == 1.0
    counts = {len(b) for b in batch["boxes"]}  # objects per scene
    assert {k for k in scores if "/" in k} == {f"caption_accuracy/{n}" for n in counts}
    assert all(v == 1.0 for v in scores.values())
    blank = torch.full_like(batch["image"], batch["image"][0, :, 0, 0].mean())  # nothing to read
    assert all(v == 0.0 for v in text.call("ldmcore_score", images=blank, batch=batch, options=options(), data=info).values())
    shifted = {**batch, "caption": batch["caption"][1:] + batch["caption"][:1]}
    assert text.call("ldmcore_score", images=batch["image"], batch=shifted, options=options(), data=info)["caption_accuracy"] < 0.5


# --- the data it needs -------------------------------------------------------------------------


def test_text_selects_multi_object_scenes_unless_told_otherwise():
    assert validate(compose_config(["+condition=text"])).data.kind == "multi"
    assert validate(compose_config(["+condition=[text,layout]"])).data.kind == "multi"
    assert validate(compose_config(["+condition=class"])).data.kind == "single"
    assert validate(compose_config(["+condition=text", "data=shapes"])).data.kind == "single"  # the user's choice wins
