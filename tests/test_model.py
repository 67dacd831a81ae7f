"""The HLIP model is the paper's: window attention, CLS split/merge, masking, position embeddings,
losses, persistence. Every test compares against an independent computation."""

import copy
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hlip_fed.config import AttentionConfig, load_config
from hlip_fed.errors import HlipError
from hlip_fed.model import HLIP, create_model, create_tokenizer
from hlip_fed.model import vision as vision_module
from hlip_fed.model.loss import clip_loss, siglip_loss
from hlip_fed.model.pos_embed import scan_slots, sincos_1d, sincos_3d
from hlip_fed.model.vision import HLIPVisionTransformer, cut_patches


def vision(cfg, levels=None, mode="hierarchical", **changes):
    v = cfg.model.vision
    if levels is not None:
        v = dataclasses.replace(v, depth=len(levels), attention=AttentionConfig(mode=mode, levels=list(levels)))
    elif mode != v.attention.mode:
        v = dataclasses.replace(v, attention=AttentionConfig(mode=mode, levels=v.attention.levels))
    v = dataclasses.replace(v, **changes)
    torch.manual_seed(0)
    return HLIPVisionTransformer(v, cfg.model.embed_dim).eval()


def study(b=1, n=2, seed=1, size=(32, 96, 96)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 1, *size, generator=g)


def naive_full_attention(m: HLIPVisionTransformer, images):
    """A plain ViT over every token of the study, written without any window logic."""
    b = images.shape[0]
    tokens = m.embed(images, torch.ones(images.shape[:2], dtype=torch.bool)).flatten(1, 3)
    x = torch.cat([m.cls_token.expand(b, 1, -1), tokens], 1)
    for blk in m.blocks:
        x = x + blk.attn(blk.norm1(x))
        x = x + blk.mlp(blk.norm2(x))
    return m.proj(m.norm(x[:, 0]))


def test_all_study_layout_equals_full_attention(tiny_cfg):
    hier = vision(tiny_cfg, levels=["study"] * 3)
    full = vision(tiny_cfg, mode="full")
    full.load_state_dict(hier.state_dict())
    x = study(b=2, n=3)
    with torch.no_grad():
        ref = naive_full_attention(hier, x)
        torch.testing.assert_close(hier(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full(x), ref, atol=1e-5, rtol=1e-5)
        # ...and a hierarchical layout really is something else.
        h2 = vision(tiny_cfg)
        h2.load_state_dict(hier.state_dict())
        assert (h2(x) - ref).abs().max() > 1e-3


def last_block_windows(m, x):
    out = {}
    handle = m.blocks[-1].register_forward_hook(lambda mod, args, y: out.setdefault("y", y.detach()))
    with torch.no_grad():
        m(x)
    handle.remove()
    return out["y"]


def test_scan_windows_isolate_scans_and_study_blocks_mix_them(tiny_cfg):
    x = study(n=2)
    x2 = x.clone()
    x2[:, 1] += torch.randn_like(x2[:, 1])  # change the voxels of scan 2 only

    scan_only = vision(tiny_cfg, levels=["scan", "scan"])
    a, b = last_block_windows(scan_only, x), last_block_windows(scan_only, x2)
    assert a.shape[0] == 2  # one window per scan
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)  # scan-1 tokens (and CLS copy) untouched
    assert (a[1] - b[1]).abs().max() > 1e-3

    mixed = vision(tiny_cfg, levels=["scan", "study"])
    a, b = last_block_windows(mixed, x), last_block_windows(mixed, x2)
    tokens_scan1 = slice(1, 1 + mixed.tokens_per_scan)
    assert (a[0, tokens_scan1] - b[0, tokens_scan1]).abs().max() > 1e-4


def test_slice_windows_hold_one_depth_slab(tiny_cfg):
    m = vision(tiny_cfg, levels=["slice", "scan", "study"])
    x = study(n=2)
    y = last_block_windows(vision(tiny_cfg, levels=["slice"]), x)
    gd, gh, gw = m.grid
    assert y.shape[:2] == (2 * gd, 1 + gh * gw)


def test_cls_split_copies_and_merge_averages_real_windows(tiny_cfg):
    m = vision(tiny_cfg)
    b, n, s, c = 2, 3, 4, m.cfg.width
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    cls = torch.randn(b, 1, c)
    per_scan = m._regroup_cls(cls, b, "study", "scan", n, s, weights)
    assert per_scan.shape == (b * n, 1, c)
    torch.testing.assert_close(per_scan.view(b, n, c), cls.expand(b, n, c))
    per_slice = m._regroup_cls(per_scan, b, "scan", "slice", n, s, weights)
    torch.testing.assert_close(per_slice.view(b, n * s, c), cls.expand(b, n * s, c))

    distinct = torch.randn(b * n, 1, c)
    merged = m._regroup_cls(distinct, b, "scan", "study", n, s, weights).view(b, c)
    d = distinct.view(b, n, c)
    torch.testing.assert_close(merged[0], d[0, :2].mean(0))  # the padded third scan is ignored
    torch.testing.assert_close(merged[1], d[1].mean(0))

    slabs = torch.randn(b * n * s, 1, c)
    to_scan = m._regroup_cls(slabs, b, "slice", "scan", n, s, weights).view(b, n, c)
    real = weights.bool()
    torch.testing.assert_close(to_scan[real], slabs.view(b, n, s, c).mean(2)[real])
    to_study = m._regroup_cls(slabs, b, "slice", "study", n, s, weights).view(b, c)
    torch.testing.assert_close(to_study[0], slabs.view(b, n, s, c)[0, :2].mean((0, 1)))


@pytest.mark.parametrize("pool", ["token", "max", "avg", "avgmax"])
@pytest.mark.parametrize("levels", [["scan", "scan", "study"], ["slice", "scan", "study"], ["study"] * 3])
def test_padded_study_has_the_same_embedding(tiny_cfg, levels, pool):
    m = vision(tiny_cfg, levels=levels, pool=pool)
    two, four = study(n=2, seed=3), study(n=4, seed=4)
    batch = torch.cat([F.pad(two, (0,) * 8 + (0, 2)), four])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        alone = m(two)
        batched = m(batch, mask)
        alone4 = m(four)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[1], alone4[0], atol=1e-5, rtol=1e-4)


def test_pooled_embedding_is_the_max_mean_or_their_average_of_the_final_tokens(tiny_cfg):
    m = vision(tiny_cfg, pool="max")
    x = study(n=2, seed=5)
    captured = {}
    m.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.update(x=out))
    with torch.no_grad():
        pooled = m(x)
        tokens = m.norm(captured["x"][:, 1:])  # the last block is study-wide: one window
        torch.testing.assert_close(pooled[0], m.proj(tokens[0].amax(0)))
        m.cfg = dataclasses.replace(m.cfg, pool="avg")
        torch.testing.assert_close(m(x)[0], m.proj(tokens[0].mean(0)))
        m.cfg = dataclasses.replace(m.cfg, pool="avgmax")
        torch.testing.assert_close(m(x)[0], m.proj((tokens[0].mean(0) + tokens[0].amax(0)) / 2))


def test_sincos_embeddings_match_the_formula():
    pos = torch.tensor([0.0, 3.0])
    e = sincos_1d(8, pos)
    omega = 1.0 / 10000 ** (torch.arange(4) / 4.0)
    torch.testing.assert_close(e[1], torch.cat([torch.sin(3 * omega), torch.cos(3 * omega)]))
    s = sincos_3d(96, (2, 3, 4))
    assert s.shape == (2, 3, 4, 96)
    torch.testing.assert_close(s[1, 2, 3, :32], sincos_1d(32, torch.tensor(3.0)))  # width term
    torch.testing.assert_close(s[1, 2, 3, 64:], sincos_1d(32, torch.tensor(1.0)))  # depth term


def test_position_embeddings_follow_input_size_and_scan_count(tiny_cfg):
    m = vision(tiny_cfg)
    with torch.no_grad():
        assert m(study(size=(48, 112, 112))).shape == (1, tiny_cfg.model.embed_dim)
        # The resampled grid at the original size is the original embedding.
        tokens = m.embed(study(size=(32, 96, 96)) * 0, torch.ones(1, 2, dtype=torch.bool))
        bias = m.patch_embed.proj.bias
        expected = m.pos_spatial.reshape(4, 36, -1) + bias + m.pos_scan[1]
        torch.testing.assert_close(tokens[0, 1], expected, atol=1e-6, rtol=1e-6)
        # More scans than slots: interpolated at evaluation.
        small = vision(tiny_cfg, max_scans=3)
        assert torch.isfinite(small(study(n=5, size=(16, 32, 32)))).all()
    table = sincos_1d(12, torch.arange(40))
    evals = scan_slots(table, torch.tensor([3]), 3, training=False)
    torch.testing.assert_close(evals[0], table[:3])
    gen = torch.Generator().manual_seed(0)
    train = scan_slots(table, torch.tensor([5, 2]), 5, training=True, generator=gen)
    rows = [int((table == r).all(1).nonzero()) for r in train[0]]
    assert rows == sorted(rows) and len(set(rows)) == 5 and rows != list(range(5))
    rows2 = [int((table == r).all(1).nonzero()) for r in train[1, :2]]
    assert rows2 == sorted(rows2)


def test_patch_dropout_keeps_windows_consistent(tiny_cfg):
    for levels in (["slice", "scan", "study"], ["scan", "scan", "study"]):
        m = vision(tiny_cfg, levels=levels, patch_dropout=0.5).train()
        x = study(b=2, n=2)
        tokens = m.drop_patches(m.embed(x, torch.ones(2, 2, dtype=torch.bool)))
        assert tokens.shape[2] * tokens.shape[3] == m.tokens_per_scan // 2
        assert torch.isfinite(m(x)).all()
        m.eval()
        assert m.drop_patches(tokens).shape == tokens.shape  # evaluation never drops


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cfg):
    a = vision(tiny_cfg, drop_path=0.1).train()
    b = vision(tiny_cfg, drop_path=0.1, grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    x = study()
    torch.manual_seed(5)  # same scan slots and drop-path draws in both runs
    a(x).square().sum().backward()
    torch.manual_seed(5)
    b(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_gradients_reach_trainable_parameters_and_not_a_locked_text_encoder(tiny_cfg):
    torch.manual_seed(0)
    model = create_model(tiny_cfg.model).train()
    tok = create_tokenizer(tiny_cfg.model)
    batch = tok(["Large mass in the left frontal lobe.", "No acute intracranial abnormality."])
    out = model(study(b=2, n=2), torch.ones(2, 2, dtype=torch.bool), **batch)
    model.loss(**out).backward()
    for name, p in model.named_parameters():
        if name.startswith("text.encoder."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name

    unlocked = dataclasses.replace(tiny_cfg.model, text=dataclasses.replace(tiny_cfg.model.text, lock=False))
    model = create_model(unlocked).train()
    out = model(study(b=2, n=1), None, **batch)
    model.loss(**out).backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("text.encoder.")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_clip_and_siglip_losses_match_a_hand_computation():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    scale = torch.tensor(math.log(10.0))
    sim = [[sum(a * b for a, b in zip(i, t)) * 10.0 for t in txt.tolist()] for i in img.tolist()]

    def ce(rows):
        return sum(-r[k] + math.log(sum(math.exp(v) for v in r)) for k, r in enumerate(rows)) / len(rows)

    cols = [list(c) for c in zip(*sim)]
    assert clip_loss(img, txt, scale).item() == pytest.approx(0.5 * (ce(sim) + ce(cols)), rel=1e-6)

    bias = torch.tensor(-2.0)
    total = 0.0
    for i, row in enumerate(sim):
        for j, v in enumerate(row):
            z = (1.0 if i == j else -1.0) * (v - 2.0)
            total += math.log(1.0 + math.exp(-z))
    assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(total / 3, rel=1e-6)


def test_clip_with_report_similarity_targets_matches_a_hand_computation():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)  # reports 0 and 1 say the same
    scale = torch.tensor(math.log(10.0))
    sim = [[sum(a * b for a, b in zip(i, t)) * 10.0 for t in txt.tolist()] for i in img.tolist()]
    cols = [list(c) for c in zip(*sim)]
    tau = 0.1
    report_sim = [[sum(a * b for a, b in zip(u, v)) / tau for v in txt.tolist()] for u in txt.tolist()]
    targets = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in report_sim]

    def soft_ce(rows):
        return sum(-sum(p * (v - math.log(sum(math.exp(w) for w in r))) for p, v in zip(t, r))
                   for t, r in zip(targets, rows)) / len(rows)

    loss = clip_loss(img, txt, scale, target_temperature=tau)
    assert loss.item() == pytest.approx(0.5 * (soft_ce(sim) + soft_ce(cols)), rel=1e-6)
    assert targets[0][1] == pytest.approx(0.5, abs=1e-4)  # identical reports share the target
    distinct = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    # a cold target over distinct reports is CLIP's one-to-one target
    assert clip_loss(img, distinct, scale, target_temperature=1e-4).item() == pytest.approx(
        clip_loss(img, distinct, scale).item(), rel=1e-5)


def test_logit_scale_is_clamped_and_siglip_initialised(tiny_cfg):
    model = create_model(tiny_cfg.model)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    sig = dataclasses.replace(tiny_cfg.model, loss=dataclasses.replace(tiny_cfg.model.loss, name="siglip"))
    model = create_model(sig)
    assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10.0


def test_save_and_load_round_trip_bit_exactly(tiny_cfg, tmp_path):
    model = create_model(tiny_cfg.model, seed=3).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.21)
    model.save_pretrained(tmp_path / "m")
    loaded = HLIP.from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg == model.cfg
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    tok = create_tokenizer(tiny_cfg.model)
    batch = tok(["Ventricles are enlarged."])
    x = study()
    with torch.no_grad():
        assert torch.equal(model(x, None, **batch)["image"], loaded(x, None, **batch)["image"])
        assert torch.equal(model(x, None, **batch)["text"], loaded(x, None, **batch)["text"])


def test_minilm_loads_offline_from_the_installed_package_and_embeds_reports():
    cfg = load_config("tiny")
    assert cfg.model.text.pretrained and cfg.model.text.name.endswith("all-MiniLM-L6-v2")
    model = create_model(cfg.model, seed=0)
    tok = create_tokenizer(cfg.model)
    reports = [
        "There is an acute haemorrhage in the left parietal lobe.",
        "Acute bleeding is seen in the left parietal region.",
        "The ventricles and sulci are normal for age.",
    ]
    with torch.no_grad():
        feats = F.normalize(model.text.features(**tok(reports)), dim=-1)
    assert feats.shape == (3, 384)
    sims = feats @ feats.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # real sentence embeddings, not random weights


def test_model_info_reports_a_vit_base(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "hlip_fed.cli", "model", "info", "--preset", "vit_base_multiscan_h2_token1176", "--json"],
        capture_output=True, text=True, check=True,
    )
    info = json.loads(out.stdout)
    assert info["tokens_per_scan"] == 1176
    assert abs(info["params_vision"] - 86e6) / 86e6 < 0.05
    assert info["levels"] == ["scan", "scan", "study"] * 4
    assert info["input_shape"] == ["B", "N_scans", 1, 48, 224, 224]
    assert info["params_text"] > 0


def test_conv_stem_reaches_the_patch_grid_and_keeps_padding_invariance(tiny_cfg):
    from hlip_fed.model.vision import ConvStem3D

    cfg = dataclasses.replace(tiny_cfg.model, vision=dataclasses.replace(tiny_cfg.model.vision, stem="conv"))
    model = create_model(cfg, seed=0).eval()
    assert isinstance(model.visual.patch_embed, ConvStem3D)
    x = torch.randn(2, 2, 1, *cfg.vision.img_size)
    tokens = model.visual.embed(x, torch.ones(2, 2, dtype=torch.bool))
    assert tokens.shape[2:4] == (cfg.vision.img_size[0] // 8, (96 // 16) ** 2)  # the patch grid
    mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        padded = model.encode_image(x.masked_fill(~mask[:, :, None, None, None, None], 0.0), mask)
        alone = model.encode_image(x[1:, :1], mask[1:, :1])
    torch.testing.assert_close(padded[1:], alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(HlipError, match="power-of-two"):
        load_config("tiny", overrides=["model.vision.stem=conv", "model.vision.patch_size=[8,12,12]",
                                       "model.vision.img_size=[32,96,96]"])


def with_stem(tiny_cfg, stem: str):
    """The tiny model config with ``stem``, its model (seed 0) and a random batch of two studies of two scans."""
    cfg = dataclasses.replace(tiny_cfg.model, vision=dataclasses.replace(tiny_cfg.model.vision, stem=stem))
    return cfg, create_model(cfg, seed=0), torch.randn(2, 2, 1, *cfg.vision.img_size)


def test_patch_quantile_stem_starts_as_hlips_patch_embedding_and_learns_from_each_patchs_quantiles(tiny_cfg):
    from hlip_fed.model.vision import PATCH_QUANTILES, QuantilePatchEmbed3D, cut_patches

    cfg, model, x = with_stem(tiny_cfg, "patch_quantiles")
    embed = model.visual.patch_embed
    assert isinstance(embed, QuantilePatchEmbed3D)
    patches = cut_patches(x, cfg.vision.patch_size).reshape(2, 2, 4, 36, -1)  # [B, N, gd, gh*gw, P]
    nearest = torch.quantile(patches, PATCH_QUANTILES, dim=-1, interpolation="nearest").movedim(0, -1)
    torch.testing.assert_close(embed.quantiles(embed.patches(x)), nearest)
    hlip = F.linear(patches, embed.proj.weight.flatten(1), embed.proj.bias)
    torch.testing.assert_close(embed(x), hlip)  # zero-initialised: HLIP's patch embedding at the start
    embed(x).square().sum().backward()
    assert embed.quantile_proj.weight.grad.abs().sum() > 0
    mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        embed.quantile_proj.weight.normal_()
        padded = model.eval().encode_image(x.masked_fill(~mask[:, :, None, None, None, None], 0.0), mask)
        alone = model.encode_image(x[1:, :1], mask[1:, :1])
    torch.testing.assert_close(padded[1:], alone, atol=1e-5, rtol=1e-4)


def test_identity_text_projection_keeps_the_encoders_space(tiny_cfg):
    text = dataclasses.replace(tiny_cfg.model.text, proj="identity")
    model = create_model(dataclasses.replace(tiny_cfg.model, text=text, embed_dim=32), seed=0)  # tiny BERT: 32 wide
    tok = create_tokenizer(model.cfg)
    t = tok(["no bleed", "a large bleed"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(**t), F.normalize(model.text.features(**t), dim=-1))
    assert not any(n.startswith("text.") for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(HlipError, match="embed_dim = the text encoder's width"):
        create_model(dataclasses.replace(tiny_cfg.model, text=text, embed_dim=64), seed=0)


def test_finding_sections_keep_findings_and_impression_only(tiny_cfg):
    from hlip_fed.model.tokenizer import finding_sections

    report = ("CLINICAL HISTORY: Fall.\nTECHNIQUE: Non-contrast axial CT of the head, 4 mm reconstructions.\n"
              "FINDINGS:\nA left frontal haematoma. Mass: none.\nIMPRESSION:\nLeft frontal haematoma.\n")
    kept = finding_sections(report)
    assert kept == "FINDINGS:\nA left frontal haematoma. Mass: none.\nIMPRESSION:\nLeft frontal haematoma."
    assert finding_sections("CT head: No haemorrhage. No mass.") == "CT head: No haemorrhage. No mass."
    assert finding_sections("Indication: Seizure.\nReport: Atrophy.\nConclusion: Atrophy.") == "Report: Atrophy.\nConclusion: Atrophy."
    text = dataclasses.replace(tiny_cfg.model.text, sections="findings")
    tok = create_tokenizer(dataclasses.replace(tiny_cfg.model, text=text))
    assert "technique" not in tok.hf.decode(tok([report])["input_ids"][0])


def test_patch_embedding_is_the_strided_convolution_of_hlip(tiny_cfg):
    m = vision(tiny_cfg)
    pe = m.patch_embed
    x = study(b=2, n=3, size=(35, 100, 97))  # voxels beyond a whole patch are dropped, as by the conv
    with torch.no_grad():
        tokens = pe(x)
        conv = F.conv3d(x.flatten(0, 1), pe.proj.weight, pe.proj.bias, stride=pe.patch_size)
    c, gd, gh, gw = conv.shape[1:]
    assert tokens.shape == (2, 3, gd, gh * gw, c)
    torch.testing.assert_close(tokens, conv.permute(0, 2, 3, 4, 1).reshape(2, 3, gd, gh * gw, c),
                               atol=1e-5, rtol=1e-5)


def test_mirror_stem_starts_as_hlips_patch_embedding_and_reads_only_the_left_right_difference(tiny_cfg):
    from hlip_fed.model.vision import MirrorPatchEmbed3D

    cfg, model, x = with_stem(tiny_cfg, "patch_mirror")
    embed = model.visual.patch_embed
    assert isinstance(embed, MirrorPatchEmbed3D)
    hlip = F.linear(cut_patches(x[:, :, 0], cfg.vision.patch_size), embed.proj.weight.flatten(1), embed.proj.bias)
    torch.testing.assert_close(embed(x), hlip)  # zero-initialised: HLIP's patch embedding at the start
    embed(x).square().sum().backward()
    assert embed.mirror_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        embed.mirror_proj.weight.normal_()
        symmetric = x + x.flip(-1)  # nothing differs between left and right: HLIP's tokens still
        torch.testing.assert_close(embed(symmetric), embed.embed(embed.patches(symmetric)))
        lesion = symmetric.clone()
        lesion[..., 2:6, 10:20, 5:15] += 1.0  # one side only
        changed = (embed(lesion) - embed.embed(embed.patches(lesion))).abs().sum(-1) > 0
    expected = torch.zeros(4, 6, 6, dtype=torch.bool)  # 8 x 16 x 16 patches of a 32 x 96 x 96 scan
    expected[0, 0:2, 0] = expected[0, 0:2, 5] = True  # the lesion's patches and their mirror images
    assert (changed.reshape(2, 2, 4, 6, 6) == expected).all()


def test_patches_cut_in_another_dtype_are_the_cut_patches_cast():
    x = study(b=2, n=3, size=(35, 100, 97))
    torch.testing.assert_close(cut_patches(x, (8, 16, 16), torch.bfloat16), cut_patches(x, (8, 16, 16)).bfloat16(),
                               atol=0, rtol=0)


@pytest.mark.parametrize("stem", ["patch", "patch_quantiles", "patch_mirror"])
def test_patch_embedding_of_padded_scans_is_zero_and_the_real_scans_unchanged(tiny_cfg, stem, monkeypatch):
    """Given the scan mask, only the real scans are cut and embedded: a padded scan's tokens are
    zero (no part of a real output reads them) and each real scan's tokens are those it has when
    every scan is embedded."""
    m = vision(tiny_cfg, stem=stem)
    if stem == "patch_quantiles":
        torch.nn.init.normal_(m.patch_embed.quantile_proj.weight)
    if stem == "patch_mirror":
        torch.nn.init.normal_(m.patch_embed.mirror_proj.weight)
    x = study(b=2, n=3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x[~mask] = 0.0  # as collate_studies pads
    cut = []

    def counting(v, patch_size, dtype=None, rows=None):  # the scans each call cuts
        cut.append(math.prod(v.shape[:-3]) if rows is None else len(rows))
        return cut_patches(v, patch_size, dtype, rows)

    monkeypatch.setattr(vision_module, "cut_patches", counting)
    with torch.no_grad():
        tokens, every = m.patch_embed(x, mask), m.patch_embed(x)
    assert cut == ([3, 3, 6, 6] if stem == "patch_mirror" else [3, 6])  # the mirror stem cuts twice
    assert tokens.shape == every.shape
    assert (tokens[~mask] == 0).all()
    torch.testing.assert_close(tokens[mask], every[mask], atol=1e-6, rtol=1e-6)


@pytest.fixture
def sdpa_dtypes(monkeypatch):
    """The dtype of each call of ``F.scaled_dot_product_attention``, in order."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append(q.dtype)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


def test_cpu_autocast_attends_by_bf16_products(tiny_cfg, sdpa_dtypes):
    m = vision(tiny_cfg).train()  # every window of this study is within the bound
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(study())
    out.float().sum().backward()
    assert sdpa_dtypes == []
    assert m.blocks[0].attn.qkv.weight.grad is not None and torch.isfinite(m.blocks[0].attn.qkv.weight.grad).all()


@pytest.mark.parametrize("tokens", [37, 145, 433, vision_module.BF16_PRODUCTS_MAX_TOKENS,
                                    vision_module.BF16_PRODUCTS_MAX_TOKENS + 1])
def test_bf16_attention_on_cpu_by_bf16_products_up_to_a_bound(tokens, sdpa_dtypes):
    """On a CPU a bf16 tower attends within a window (the tiny presets' slice, scan and study
    windows here) as two bf16 matrix products and a bf16 softmax, and within a window beyond the
    bound through the fp32 kernel; both give fp32's attention to bf16 rounding, and a masked key
    takes no part."""
    torch.manual_seed(0)
    attn = vision_module.Attention(96, 3)
    held = copy.deepcopy(attn).to(torch.bfloat16)
    x = torch.randn(2, tokens, 96)
    mask = torch.ones(2, 1, 1, tokens, dtype=torch.bool)
    mask[1, ..., tokens // 2:] = False
    for m in (None, mask):
        want = attn(x, m)
        sdpa_dtypes.clear()
        got = held(x.bfloat16(), m)
        assert got.dtype == torch.bfloat16
        assert sdpa_dtypes == ([] if tokens <= vision_module.BF16_PRODUCTS_MAX_TOKENS else [torch.float32])
        assert (got.float() - want).abs().max() < 0.03 * want.abs().max()
    changed = x.clone()
    changed[1, tokens // 2:] += 5.0  # only masked keys change: the first half's rows see none of them
    again = held(changed.bfloat16(), mask)
    assert torch.equal(again[1, : tokens // 2], held(x.bfloat16(), mask)[1, : tokens // 2])


def test_bf16_softmax_is_fp32_softmax_rounded_once():
    """The products' softmax runs in bf16 because torch's CPU kernel computes a bf16 softmax in fp32
    and rounds its output once: within one bf16 unit (2**-7 relative) of the fp32 softmax rounded to
    bf16, which is what a cast to fp32 and back would give."""
    torch.manual_seed(0)
    scores = (torch.randn(6, 145, 145) * 4).bfloat16()
    got, want = scores.softmax(-1), scores.float().softmax(-1).bfloat16()
    assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float()).all()


@pytest.mark.parametrize("levels", [["scan", "scan", "study"], ["slice", "scan", "study"]])
def test_scan_and_slice_blocks_skip_padded_scans(tiny_cfg, levels):
    m = vision(tiny_cfg, levels=levels)  # evaluation mode: scan slots in order, so both runs agree
    rows = []
    for blk in m.blocks:
        blk.register_forward_pre_hook(lambda mod, inp: rows.append(inp[0].shape[0]))
    two, four = study(n=2, seed=3), study(n=4, seed=4)
    batch = torch.cat([F.pad(two, (0,) * 8 + (0, 2)), four])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    m(batch, mask).sum().backward()
    slabs = m.grid[0]
    per_level = {"slice": 6 * slabs, "scan": 6, "study": 2}  # 6 real scans in 2 studies
    assert rows == [per_level[lv] for lv in levels]
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    sum(m(x)[0] for x in (two, four)).sum().backward()  # each study alone: no padding at all
    for k, p in m.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, atol=1e-4, rtol=1e-3)
