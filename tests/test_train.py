import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from hlip_fed.model import create_model, create_tokenizer
from hlip_fed.training.train import lr_at, make_optimizer, train_steps

REPORTS = {
    0: "No focal abnormality. The brain parenchyma is unremarkable.",
    1: "There is a bright lesion in the left hemisphere.",
    2: "There is a bright lesion in the right hemisphere.",
}


def toy_batch(n: int, size: list[int], gen: torch.Generator):
    """Two-scan studies of smooth noise, some with a bright blob on one side, and reports saying so."""
    d, h, w = size
    base = F.interpolate(torch.randn(n, 2, d // 4, h // 8, w // 8, generator=gen), size=(d, h, w), mode="trilinear")
    kind = torch.randint(0, 3, (n,), generator=gen)
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in (d, h, w)), indexing="ij")
    for i, k in enumerate(kind.tolist()):
        if k:
            cx = -0.5 if k == 1 else 0.5
            base[i] += 3.0 * ((xx - cx) ** 2 + yy**2 + zz**2 < 0.3**2).float()
    images = base[:, :, None]  # [B, 2 scans, 1, D, H, W]
    return images, torch.ones(n, 2, dtype=torch.bool), [REPORTS[k] for k in kind.tolist()], [str(i) for i in range(n)]


def batches(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield toy_batch(2, [16, 32, 32], gen)


@pytest.fixture
def small_cfg(tiny_cfg):
    v = dataclasses.replace(tiny_cfg.model.vision, img_size=[16, 32, 32])
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, vision=v))


def test_train_steps_counts_and_clamps(small_cfg):
    model, tok = create_model(small_cfg.model, seed=0), create_tokenizer(small_cfg.model)
    cfg = dataclasses.replace(small_cfg.train, grad_accum=2, lr=1e-3)
    with torch.no_grad():
        model.logit_scale.fill_(4.6)
    stats = train_steps(model, tok, batches(cfg), cfg, steps=3)
    assert stats.steps == 3 and stats.examples == 3 * 2 * 2
    assert all(math.isfinite(x) for x in stats.losses)
    assert 0.0 <= model.logit_scale.item() <= math.log(100) + 1e-6


def test_proximal_term_keeps_weights_near_the_anchor(small_cfg):
    cfg = dataclasses.replace(small_cfg.train, lr=5e-3, warmup_steps=0, weight_decay=0.0)

    def drift(mu):
        model, tok = create_model(small_cfg.model, seed=0), create_tokenizer(small_cfg.model)
        anchor = {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith("visual.blocks")}
        torch.manual_seed(0)
        train_steps(model, tok, batches(cfg), cfg, steps=4, proximal_mu=mu, anchor=anchor)
        params = dict(model.named_parameters())
        return sum((params[k] - v).pow(2).sum().item() for k, v in anchor.items())

    assert drift(50.0) < 0.8 * drift(0.0)


def test_schedule_warms_up_then_decays(small_cfg):
    cfg = dataclasses.replace(small_cfg.train, lr=1.0, warmup_steps=2)
    lrs = [lr_at(s, cfg, total_steps=10) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.05


def test_optimizer_skips_decay_on_norms_and_frozen_weights(small_cfg):
    model = create_model(small_cfg.model, seed=0)
    opt = make_optimizer(model, small_cfg.train)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].endswith("weight") for i in decayed)
    assert not any(names[i].startswith("text.encoder") for g in opt.param_groups for i in map(id, g["params"]))


def test_bf16_on_a_cpu_without_bf16_instructions_is_named(small_cfg, monkeypatch):
    from hlip_fed.training.train import emulated_precision

    bf16 = dataclasses.replace(small_cfg.train, precision="bf16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert "bf16 instructions" in emulated_precision(bf16)
    assert "bf16 instructions" in emulated_precision(dataclasses.replace(bf16, precision="bf16-held"))
    assert emulated_precision(small_cfg.train) is None  # fp32 runs natively everywhere
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert emulated_precision(bf16) is None
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert emulated_precision(bf16) is None


def test_auto_precision_holds_the_tower_in_bf16_only_where_the_cpu_multiplies_bf16(small_cfg, monkeypatch):
    from hlip_fed.training.train import emulated_precision, step_precision

    auto = dataclasses.replace(small_cfg.train, precision="auto")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert step_precision(auto) == "bf16-held"
    assert step_precision(auto, masked=True) == "fp32"  # the tower is held in bf16 for the contrastive losses
    assert step_precision(dataclasses.replace(auto, precision="bf16-held"), masked=True) == "fp32"
    assert step_precision(dataclasses.replace(auto, device="cuda")) == "fp32"
    for explicit in ("fp32", "bf16", "bf16-held"):
        assert step_precision(dataclasses.replace(auto, precision=explicit)) == explicit
    for caps in ({"avx512_bf16": False, "amx_bf16": False}, {}):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert step_precision(auto) == "fp32"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert step_precision(auto) == "bf16-held"
    assert auto.autocast_precision == "fp32" and emulated_precision(auto) is None


def test_auto_precision_trains_as_the_precision_it_resolves_to(small_cfg, monkeypatch):
    fp32 = dataclasses.replace(small_cfg.train, lr=3e-3, warmup_steps=0)
    losses = {}
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda native=native: {"avx512_bf16": native})
        for precision in ("auto", "bf16-held" if native else "fp32"):
            model, tok = create_model(small_cfg.model, seed=0), create_tokenizer(small_cfg.model)
            torch.manual_seed(0)
            cfg = dataclasses.replace(fp32, precision=precision)
            losses[native, precision] = train_steps(model, tok, batches(cfg), cfg, steps=3).losses
    assert losses[True, "auto"] == losses[True, "bf16-held"]
    assert losses[False, "auto"] == losses[False, "fp32"]
    assert losses[True, "auto"] != losses[False, "auto"]


def test_a_site_asked_for_emulated_bf16_says_so_in_its_log(mini_consortium, tmp_path, monkeypatch, caplog):
    from conftest import FAST_RUN

    from hlip_fed.config import load_config
    from hlip_fed.federation.local import LocalSite
    from hlip_fed.federation.run import Site

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    site = Site("site0", mini_consortium / "sites" / "site0", tmp_path / "state", None)
    with caplog.at_level("WARNING", logger="hlip_fed.federation"):
        LocalSite(load_config("tiny", overrides=FAST_RUN), site)
        assert not caplog.records
        LocalSite(load_config("tiny", overrides=FAST_RUN + ["train.precision=bf16"]), site)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["site site0"]
    assert "train.precision bf16" in caplog.records[0].getMessage()


def test_a_held_tower_reads_scans_collated_in_bf16_as_it_reads_fp32_ones(small_cfg):
    """A site that holds the tower in bf16 collates its training batches in bf16 (half the bytes to
    move): the tower's patch embedding reads scans in its own dtype, so its output is the same."""
    from hlip_fed.training.bf16_tower import Bf16Tower
    from hlip_fed.training.train import scan_dtype

    def run(precision, loss="clip"):
        return dataclasses.replace(small_cfg, train=dataclasses.replace(small_cfg.train, precision=precision),
                                   model=dataclasses.replace(small_cfg.model, loss=dataclasses.replace(
                                       small_cfg.model.loss, name=loss)))

    assert scan_dtype(run("bf16-held")) == torch.bfloat16
    assert all(scan_dtype(run(p)) is None for p in ("fp32", "bf16"))  # autocast's fp32 weights read fp32 scans
    assert scan_dtype(run("bf16-held", loss="masked")) is None  # masked modelling trains the tower in fp32
    model = create_model(small_cfg.model, seed=0).eval()  # scan slots in order, so both forwards agree
    images, mask, _, _ = next(batches(small_cfg.train))
    held = Bf16Tower(model)
    with torch.no_grad(), held.step():
        assert torch.equal(model.visual(images, mask), model.visual(images.to(scan_dtype(run("bf16-held"))), mask))


def test_bf16_held_tower_steps_the_fp32_weights_with_bf16_gradients(small_cfg):
    """``train.precision: bf16-held`` runs the vision tower's forward and backward in bf16 while the
    model keeps fp32 weights, which the optimiser steps (master weights): the losses and gradients
    are fp32's to bf16's precision, and each step starts from the weights the last one left."""
    fp32 = dataclasses.replace(small_cfg.train, lr=3e-3, warmup_steps=0, weight_decay=0.0)
    runs = {}
    for cfg in (fp32, dataclasses.replace(fp32, precision="bf16-held")):
        model, tok = create_model(small_cfg.model, seed=0), create_tokenizer(small_cfg.model)
        visual = model.visual
        torch.manual_seed(0)
        stats = train_steps(model, tok, batches(cfg), cfg, steps=6)
        assert model.visual is visual and all(p.dtype == torch.float32 for p in model.parameters())
        grads = torch.cat([p.grad.flatten() for p in visual.parameters() if p.grad is not None])
        runs[cfg.precision] = stats.losses, grads, visual.state_dict()
    (loss32, grad32, w32), (loss16, grad16, w16) = runs["fp32"], runs["bf16-held"]
    assert all(abs(a - b) < 0.03 for a, b in zip(loss32, loss16)), (loss32, loss16)  # a stale tower: 0.3
    assert F.cosine_similarity(grad32, grad16, dim=0) > 0.98
    init = create_model(small_cfg.model, seed=0).visual.state_dict()
    moved = {k: (w32[k] - init[k]).norm() for k in w32}
    assert all(moved[k] == 0 or (w16[k] - init[k]).norm() > 0.5 * moved[k] for k in w32)  # the master weights stepped
