"""Masked image modelling (``model.loss.name: masked``): what a hidden patch hides, what the loss
scores, that training lowers it without reports, and that a contrastive run starts from its tower."""

import dataclasses
import itertools

import pytest
import torch

from hlip_fed.config import ConfigError, load_config
from hlip_fed.federation.params import federated_keys, start_from
from hlip_fed.model import create_model, create_tokenizer
from hlip_fed.model.vision import cut_patches
from hlip_fed.training.train import train_steps
from test_train import batches


@pytest.fixture
def masked_cfg(tiny_cfg):
    v = dataclasses.replace(tiny_cfg.model.vision, img_size=[16, 32, 32])
    loss = dataclasses.replace(tiny_cfg.model.loss, name="masked")
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, vision=v, loss=loss))


def images_and_hidden(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 1, 16, 32, 32, generator=g)
    hidden = torch.rand(2, 3, 2, 4, generator=g) < 0.5  # a 2 x 2 x 2 grid of 8x16x16 patches per scan
    return images, hidden


def test_a_hidden_patch_reaches_no_token(masked_cfg):
    model = create_model(masked_cfg.model, seed=0).eval()
    tower, head = model.visual, model.masked
    images, hidden = images_and_hidden()
    scans = torch.tensor([[True, True, False], [True, False, False]])
    _, tokens = tower.forward_tokens(images, scans, hidden, head.mask_token)

    blocks = cut_patches(images[:, :, 0], tower.patch_embed.patch_size)  # [B, N, 2, 4, P]
    changed = blocks + 10.0 * hidden[..., None]  # only the hidden patches' voxels change
    rebuilt = changed.reshape(2, 3, 2, 2, 2, 8, 16, 16).permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(2, 3, 1, 16, 32, 32)
    _, same = tower.forward_tokens(rebuilt, scans, hidden, head.mask_token)
    assert torch.allclose(same, tokens, atol=1e-5)

    shown = images.clone()
    b, n, d, t = (~hidden & scans[:, :, None, None]).nonzero()[0].tolist()  # a visible patch of a real scan
    shown[b, n, 0, d * 8:(d + 1) * 8, (t // 2) * 16:(t // 2 + 1) * 16, (t % 2) * 16:(t % 2 + 1) * 16] += 10.0
    _, moved = tower.forward_tokens(shown, scans, hidden, head.mask_token)
    assert not torch.allclose(moved, tokens, atol=1e-3)


def test_the_loss_scores_hidden_patches_of_real_scans_only(masked_cfg):
    model = create_model(masked_cfg.model, seed=0).eval()
    images, _ = images_and_hidden()
    scans = torch.tensor([[True, True, False], [True, False, False]])
    torch.manual_seed(3)
    loss = model.masked_loss(images, scans)
    padded = images.clone()
    padded[~scans] = 5.0  # what a padded scan holds is never a target
    torch.manual_seed(3)
    assert model.masked_loss(padded, scans).item() == pytest.approx(loss.item(), rel=1e-6)

    torch.manual_seed(3)
    hidden = torch.rand(2, 3, 2, 4) < masked_cfg.model.loss.mask_ratio
    _, tokens = model.visual.forward_tokens(images, scans, hidden, model.masked.mask_token)
    scored = hidden.flatten(2) & scans[:, :, None]
    predicted = model.masked.decoder(model.visual.norm(tokens[scored]))
    target = cut_patches(images[:, :, 0], (8, 16, 16)).flatten(2, 3)[scored]
    assert loss.item() == pytest.approx(((predicted - target) ** 2).mean().item(), rel=1e-5)


def test_norm_pix_normalises_each_target_patch(masked_cfg):
    loss = dataclasses.replace(masked_cfg.model.loss, norm_pix=True)
    model = create_model(dataclasses.replace(masked_cfg.model, loss=loss), seed=0)
    images, _ = images_and_hidden()
    targets = model.masked.targets(3.0 * images + 7.0, (8, 16, 16))
    assert torch.allclose(targets.mean(-1), torch.zeros(2, 3, 8), atol=1e-4)
    assert torch.allclose(targets, model.masked.targets(images, (8, 16, 16)), atol=1e-3)


def test_training_lowers_the_loss_without_reading_a_report(masked_cfg):
    model, tok = create_model(masked_cfg.model, seed=0), create_tokenizer(masked_cfg.model)
    cfg = dataclasses.replace(masked_cfg.train, lr=3e-3, warmup_steps=0)

    images, scans, _, ids = next(batches(cfg))
    torch.manual_seed(0)
    stats = train_steps(model, tok, itertools.repeat((images, scans, None, ids)), cfg, steps=80)  # no report
    first, last = sum(stats.losses[:10]) / 10, sum(stats.losses[-10:]) / 10
    assert last < 0.9 * first and last < 0.9 * images.var().item()  # below predicting the mean voxel


def test_the_head_travels_with_the_tower_and_a_contrastive_run_starts_from_it(masked_cfg, tiny_cfg, tmp_path):
    masked = create_model(masked_cfg.model, seed=1)
    keys = federated_keys(masked, masked_cfg.federation.groups)
    assert {"masked.mask_token", "masked.decoder.weight", "masked.decoder.bias"} <= set(keys)
    masked.save_pretrained(tmp_path / "mim")

    clip_model_cfg = dataclasses.replace(masked_cfg.model, loss=tiny_cfg.model.loss)
    clip = create_model(clip_model_cfg, seed=2)
    assert clip.masked is None
    start_from(clip, str(tmp_path / "mim"), federated_keys(clip, tiny_cfg.federation.groups))
    theirs = masked.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in clip.state_dict().items() if k.startswith("visual."))


def test_mask_ratio_outside_zero_one_is_refused():
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config("tiny", overrides=["model.loss.name=masked", "model.loss.mask_ratio=1.0"])


def test_a_batch_with_no_hidden_patch_gives_a_zero_loss_not_nan(masked_cfg):
    loss_cfg = dataclasses.replace(masked_cfg.model.loss, mask_ratio=1e-9)
    model = create_model(dataclasses.replace(masked_cfg.model, loss=loss_cfg), seed=0)
    images, _ = images_and_hidden()
    loss = model.masked_loss(images)
    loss.backward()
    assert loss.item() == 0.0
