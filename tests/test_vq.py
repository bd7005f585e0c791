"""The VQ-regularized first stage: quantizer (straight-through gradient, EMA updates, perplexity,
commitment loss, dead-code restart), training, and `autoencoder=vq_f4` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from ldmcore.autoencoder import PointPosterior, VectorQuantizer, VQAutoencoder
from ldmcore.config import validate
from ldmcore.data.shapes import ShapesWorld
from ldmcore.system import build, build_system
from ldmcore.tasks import train
from ldmcore.training.first_stage import train_first_stage


def tiny_vq(**kwargs) -> VQAutoencoder:
    return VQAutoencoder(base_channels=8, channel_mult=(1, 2), decoder_res_blocks=1, latent_channels=3,
                         codebook_size=32, num_groups=8, **kwargs)


def as_latent(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors -> a (1, D, 1, N) latent."""
    return vectors.T[None, :, None, :].contiguous()


def quantizer_with(codes: list[list[float]], **kwargs) -> VectorQuantizer:
    q = VectorQuantizer(len(codes), len(codes[0]), **kwargs)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor(codes))
        if q.update == "ema":
            q.embed_sum.copy_(q.codebook * q.cluster_size[:, None])
    return q


def test_straight_through_gradient_reaches_the_encoder():
    ae = tiny_vq()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = ae.reconstruct(x)
    out.image.pow(2).mean().backward()  # a loss of the decoder's output alone, no quantizer loss
    grad = ae.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert ae.quantizer.codebook.grad is None  # the codebook learns from its own loss, not through the decoder


def test_quantizer_forward_is_the_nearest_code_and_backward_the_identity():
    q = quantizer_with([[0.0, 0.0], [1.0, 1.0], [-2.0, 3.0]])
    z = as_latent(torch.tensor([[0.1, -0.2], [0.9, 1.3], [-1.5, 2.0]])).requires_grad_(True)
    out = q(z)
    assert out.indices.flatten().tolist() == [0, 1, 2]
    torch.testing.assert_close(out.latent, as_latent(q.codebook.detach()))
    torch.testing.assert_close(q.quantize(z), out.latent)
    (out.latent * torch.arange(6.0).view(1, 2, 1, 3)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(6.0).view(1, 2, 1, 3))  # straight through


@pytest.mark.parametrize("update,codebook_term", [("gradient", 1.0), ("ema", 0.0)])
def test_commitment_and_codebook_loss_values(update, codebook_term):
    q = quantizer_with([[0.0, 0.0], [4.0, 4.0]], beta=0.25, update=update)
    z = as_latent(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))  # each 1 away from its code in one coordinate
    mse = 2.0 / 4  # squared distances 1 + 1 over 4 elements
    assert q.eval()(z).loss.item() == pytest.approx((0.25 + codebook_term) * mse)


def test_gradient_mode_moves_the_codebook_through_its_loss():
    q = quantizer_with([[0.0, 0.0], [4.0, 4.0]], update="gradient")
    q(as_latent(torch.tensor([[1.0, 0.0]]))).loss.backward()
    assert q.codebook.grad[0, 0] < 0 and q.codebook.grad[1].abs().sum() == 0  # code 0 pulled towards (1, 0)


def test_ema_update_moves_codes_toward_their_assigned_vectors():
    q = quantizer_with([[0.0, 0.0], [10.0, 10.0]], update="ema", ema_decay=0.5)
    z = as_latent(torch.tensor([[1.0, 1.0]] * 4))  # all four assigned to code 0
    q.train()(z)
    # N_0 = 0.5·1 + 0.5·4 = 2.5,  m_0 = 0.5·(0, 0) + 0.5·(4, 4) = (2, 2),  e_0 = m_0 / N_0
    torch.testing.assert_close(q.codebook[0], torch.tensor([0.8, 0.8]))
    torch.testing.assert_close(q.codebook[1], torch.tensor([10.0, 10.0]))  # unused: stays put
    assert not q.codebook.requires_grad
    q.eval()(z)
    torch.testing.assert_close(q.codebook[0], torch.tensor([0.8, 0.8]))  # no update outside training


def test_perplexity_is_the_codebook_size_for_uniform_use_and_one_for_one_code():
    codes = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    q = quantizer_with(codes).eval()
    uniform = q(as_latent(torch.tensor(codes * 2)))
    assert uniform.perplexity == pytest.approx(4.0) and uniform.usage == 1.0
    single = q(as_latent(torch.tensor([[0.1, 0.0]] * 8)))
    assert single.perplexity == pytest.approx(1.0) and single.usage == 0.25


def test_dead_codes_restart_on_encoder_outputs():
    q = quantizer_with([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0]], ema_decay=0.5, restart_threshold=0.3)
    vectors = torch.tensor([[0.1, 0.2], [0.3, -0.1], [-0.2, 0.1]])
    q.train()
    q(as_latent(vectors))  # unused codes' counts: 1 -> 0.5, above the threshold
    assert q.codebook[1].tolist() == [50.0, 50.0]
    q(as_latent(vectors))  # 0.25 < 0.3: both restarted onto vectors of the batch
    for code in q.codebook[1:].detach():
        assert any(torch.equal(code, v) for v in vectors)
    assert bool((q.cluster_size[1:] >= 0.3).all())  # not restarted again at the next step


def test_quantizer_rejects_a_bad_update_mode():
    with pytest.raises(ValueError, match="codebook_update"):
        VectorQuantizer(8, 2, update="kmeans")


def test_encode_gives_pre_quantization_latents_and_decode_quantizes():
    ae = tiny_vq().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = ae.encode(x)
    assert isinstance(posterior, PointPosterior) and posterior.mean.shape == (2, 3, 8, 8)
    assert bool((posterior.std == 0).all()) and torch.equal(posterior.sample(), posterior.mean)
    codes = ae.quantizer.codebook.detach()
    assert not any(torch.equal(v, c) for v in posterior.mean.permute(0, 2, 3, 1).reshape(-1, 3) for c in codes)
    quantized = ae.quantizer.quantize(posterior.mean)
    torch.testing.assert_close(ae.decode(posterior.mean), ae.decoder(quantized))
    assert ae.downsample_factor == 2 and ae.latent_channels == 3 and ae.last_layer is ae.decoder.conv_out.weight
    ae.scale_factor = 0.5
    assert "scale_factor" in ae.state_dict() and float(ae.scale_factor) == 0.5


def test_a_tiny_vq_first_stage_learns_and_logs_its_codebook(one_thread):
    torch.manual_seed(0)
    ae = tiny_vq(codebook_update="ema", restart_threshold=0.1)
    options = OmegaConf.create(dict(steps=40, batch_size=8, lr=3e-3, warmup_steps=5))
    history = train_first_stage(ae, ShapesWorld(size=64), options, seed=0)
    first, last = history[0], history[-1]
    assert last["step"] == 39 and last["rec"] < 0.7 * first["rec"]
    for entry in history:
        assert 1.0 <= entry["perplexity"] <= 32 and 0 < entry["codebook_usage"] <= 1 and entry["codebook_loss"] >= 0


def test_vq_f4_composes_and_builds():
    cfg = validate(compose_config(["autoencoder=vq_f4"]))
    system = build_system(cfg, build("data", cfg.data))
    ae = system.first_stage
    assert isinstance(ae, VQAutoencoder) and ae.downsample_factor == 4 and ae.quantizer.beta == 0.25
    assert system.latent_shape == (3, 8, 8) and system.model.unet.in_channels == 3


def test_vq_f4_trains_end_to_end(tmp_path, tiny, one_thread):
    # +experiment=tiny narrows the model; channel_mult is set back to an f=4 layout.
    cfg = compose_config([*tiny, "autoencoder=vq_f4", "autoencoder.model.channel_mult=[1,2,2]",
                          "autoencoder.model.codebook_size=64"])
    metrics = train(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "first_stage.json").read_text())
    assert {"perplexity", "codebook_usage", "codebook_loss"} <= set(record["history"][0])
    assert (tmp_path / "run" / "samples.png").is_file() and metrics["checkpoint"]
