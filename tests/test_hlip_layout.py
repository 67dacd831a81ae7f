"""HLIP's released checkpoint layout: import, the same embedding as HLIP computes it, export back.

The checkpoints are built here in the official layout (key names and shapes of the release) with
random weights and a spatial position embedding that is not the 3D sin-cos a fresh model computes;
the real released weights are not available offline.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hlip_fed.cli import main as cli
from hlip_fed.config import load_config
from hlip_fed.errors import HlipError
from hlip_fed.model.factory import load_pretrained
from hlip_fed.model.hlip_layout import export_model, import_checkpoint, read_checkpoint

PRESETS = ["vit_base_multiscan_h2_token1176", "vit_base_multiscan_h3_token1176"]


def official_vision(preset: str, seed: int = 0, overrides: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Random weights in the release's vision layout for a preset (ViT-B and a 512-d head for HLIP's)."""
    m = load_config(preset, overrides=list(overrides)).model
    v = m.vision
    g = torch.Generator().manual_seed(seed)
    c, (pd, ph, pw) = v.width, v.patch_size
    grid = [s // p for s, p in zip(v.img_size, v.patch_size)]

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {"visual.trunk.cls_token": rand(1, 1, c),
          "visual.trunk.patch_embed.proj.weight": rand(c, 1, pd, ph, pw), "visual.trunk.patch_embed.proj.bias": rand(c),
          "visual.trunk.spatial_posemb": rand(1, *grid, c, std=0.5),  # not sin-cos
          "visual.trunk.sequential_posemb": rand(1, v.max_scans, c, std=0.5)}
    for i in range(v.depth):
        p = f"visual.trunk.blocks.{i}."
        sd.update({p + "norm1.weight": 1 + rand(c), p + "norm1.bias": rand(c),
                   p + "attn.qkv.weight": rand(3 * c, c), p + "attn.qkv.bias": rand(3 * c),
                   p + "attn.proj.weight": rand(c, c), p + "attn.proj.bias": rand(c),
                   p + "norm2.weight": 1 + rand(c), p + "norm2.bias": rand(c),
                   p + "mlp.fc1.weight": rand(4 * c, c), p + "mlp.fc1.bias": rand(4 * c),
                   p + "mlp.fc2.weight": rand(c, 4 * c), p + "mlp.fc2.bias": rand(c)})
    sd.update({"visual.trunk.norm.weight": 1 + rand(c), "visual.trunk.norm.bias": rand(c),
               "visual.head.proj.weight": rand(m.embed_dim, c), "logit_scale": torch.tensor(math.log(1 / 0.07))})
    return sd


def hlip_embedding(sd: dict[str, torch.Tensor], levels: list[str], heads: int, scans: torch.Tensor) -> torch.Tensor:
    """One study's image embedding as HLIP's code computes it, from the official keys: patch
    embedding, stored spatial (resampled trilinearly) + the first scans' sequential embeddings,
    blocks in slice / scan / study windows (CLS copied on a split, averaged on a merge), the CLS
    token after the final norm, the head's projection."""
    w = sd["visual.trunk.patch_embed.proj.weight"]
    x = F.conv3d(scans, w, sd["visual.trunk.patch_embed.proj.bias"], stride=w.shape[2:]).permute(0, 2, 3, 4, 1)
    n, d, h, wd, c = x.shape
    spatial = sd["visual.trunk.spatial_posemb"]
    if tuple(spatial.shape[1:4]) != (d, h, wd):
        spatial = F.interpolate(spatial.permute(0, 4, 1, 2, 3), size=(d, h, wd), mode="trilinear").permute(0, 2, 3, 4, 1)
    x = x + spatial + sd["visual.trunk.sequential_posemb"][0, :n, None, None, None, :]
    tokens = x.reshape(n, d, h * wd, c)
    count = {"slice": n * d, "scan": n, "study": 1}

    def block(i: int, z: torch.Tensor) -> torch.Tensor:
        p = f"visual.trunk.blocks.{i}."
        ln = lambda t, k: F.layer_norm(t, (c,), sd[p + k + ".weight"], sd[p + k + ".bias"], 1e-6)  # noqa: E731
        q, k, v = F.linear(ln(z, "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, -1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
        attn = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads)).softmax(-1) @ split(v)
        z = z + F.linear(attn.transpose(1, 2).reshape(z.shape), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        hidden = F.gelu(F.linear(ln(z, "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        return z + F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])

    cls, level = sd["visual.trunk.cls_token"].reshape(1, c), "study"
    for i, new in enumerate(levels):
        if count[new] > count[level]:
            cls = cls.repeat_interleave(count[new] // count[level], 0)
        elif count[new] < count[level]:
            cls = cls.reshape(count[new], -1, c).mean(1)
        level = new
        z = torch.cat([cls[:, None], tokens.reshape(count[level], -1, c)], 1)
        z = block(i, z)
        cls, tokens = z[:, 0], z[:, 1:].reshape(n, d, h * wd, c)
    cls = cls.reshape(1, -1, c).mean(1)
    out = F.layer_norm(cls, (c,), sd["visual.trunk.norm.weight"], sd["visual.trunk.norm.bias"], 1e-6)
    return F.linear(out, sd["visual.head.proj.weight"])


@pytest.mark.parametrize("preset", PRESETS)
def test_an_official_checkpoint_imports_embeds_as_hlip_does_and_exports_back(preset, tmp_path):
    official = official_vision(preset)
    ckpt = tmp_path / "hlip.pt"
    extra = {"text.transformer.embeddings.word_embeddings.weight": torch.zeros(4, 8), "text.proj.weight": torch.zeros(512, 8)}
    torch.save({"epoch": 10, "name": "hlip", "state_dict": {f"module.{k}": v for k, v in {**official, **extra}.items()}},
               ckpt)
    assert cli(["model", "import", str(ckpt), "--preset", preset, "--out", str(tmp_path / "model"), "--vision-only"]) == 0
    model, _ = load_pretrained(tmp_path / "model")
    model.eval()
    assert model.cfg.vision.pos_embed == "stored"
    assert "HLIP checkpoint hlip.pt" in (tmp_path / "model" / "MODEL_CARD.md").read_text()

    torch.manual_seed(1)
    scans = torch.randn(2, 1, 16, 64, 64)  # one study of two scans, smaller than the preset's grid
    with torch.no_grad():
        ours = model.encode_image(scans[None], torch.ones(1, 2, dtype=torch.bool), normalize=False)[0]
        theirs = hlip_embedding(official, model.visual.levels, model.cfg.vision.heads, scans)[0]
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4

    for fmt, name in (("open_clip", "back.pt"), ("safetensors", "back.safetensors")):
        exported = read_checkpoint(export_model(tmp_path / "model", tmp_path / name, fmt=fmt, vision_only=True))
        assert exported.keys() == official.keys()
        assert all(torch.equal(exported[k], official[k]) for k in official)


def test_wrong_shapes_missing_keys_and_foreign_towers_are_refused(tmp_path):
    preset = "tiny"  # the checks do not depend on the model's size
    official = official_vision(preset)
    broken = dict(official, **{"visual.trunk.blocks.2.mlp.fc1.weight": torch.zeros(10, 96)})
    torch.save(broken, tmp_path / "shape.pt")
    with pytest.raises(HlipError, match=r"'visual.trunk.blocks.2.mlp.fc1.weight' has shape \[10, 96\]"):
        import_checkpoint(tmp_path / "shape.pt", preset, tmp_path / "a")
    missing = {k: v for k, v in official.items() if k != "visual.trunk.norm.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(HlipError, match="no weights for 'visual.norm.bias'"):
        import_checkpoint(tmp_path / "missing.pt", preset, tmp_path / "b")
    torch.save(dict(official, **{"visual.trunk.extra": torch.zeros(1)}), tmp_path / "extra.pt")
    with pytest.raises(HlipError, match="'visual.trunk.extra' has no place"):
        import_checkpoint(tmp_path / "extra.pt", preset, tmp_path / "c")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert cli(["model", "import", str(tmp_path / "junk.pt"), "--preset", preset, "--out", str(tmp_path / "d"),
                "--vision-only"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()

    # A model whose text tower is MiniLM exports its vision tower only.
    from hlip_fed.model.factory import create_model

    create_model(load_config("tiny").model, seed=0).save_pretrained(tmp_path / "tiny")
    with pytest.raises(HlipError, match="use --vision-only"):
        export_model(tmp_path / "tiny", tmp_path / "tiny.pt")
    assert "visual.trunk.spatial_posemb" in read_checkpoint(export_model(tmp_path / "tiny", tmp_path / "tiny.pt",
                                                                         vision_only=True))


def test_a_federation_starts_from_an_imported_model_and_its_card_says_so(mini_consortium, tmp_path):
    import shlex

    from conftest import FAST_RUN
    from simulations.inprocess import run_federation

    official = official_vision("tiny", overrides=tuple(FAST_RUN))
    torch.save(official, tmp_path / "hlip.pt")
    assert cli(["model", "import", str(tmp_path / "hlip.pt"), *FAST_RUN, "--preset", "tiny", "--out",
                str(tmp_path / "hlip"), "--vision-only"]) == 0
    run = tmp_path / "run"
    overrides = FAST_RUN + ["model.vision.pos_embed=stored", "federation.rounds=1", f"federation.init={tmp_path / 'hlip'}"]
    run_federation({"config": "", "overrides": shlex.join(overrides), "data-root": str(mini_consortium),
                    "run-dir": str(run)}, num_nodes=3, run_id=41)
    final, _ = load_pretrained(run / "model")
    # The stored embeddings are not trained: the federation kept the imported ones (up to the rounding
    # of averaging identical copies), and trained the rest.
    torch.testing.assert_close(final.visual.pos_spatial, official["visual.trunk.spatial_posemb"][0], rtol=1e-6, atol=1e-6)
    assert not torch.equal(final.visual.cls_token, official["visual.trunk.cls_token"])
    assert "the model in hlip, itself from HLIP checkpoint hlip.pt" in (run / "model" / "MODEL_CARD.md").read_text()

    with pytest.raises(HlipError, match="position embeddings"):
        from hlip_fed.federation.params import federated_keys, start_from
        from hlip_fed.model.factory import create_model

        model = create_model(load_config("tiny", overrides=FAST_RUN).model, seed=0)  # sin-cos: not the import's
        start_from(model, str(tmp_path / "hlip"), federated_keys(model, ["vision"]))


def test_text_weights_go_into_a_local_bert_folder(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hlip_fed.model.text import MINILM, resolve_text_model

    folder = tmp_path / "bert"
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_text_model(MINILM)).save_pretrained(folder)
    torch.manual_seed(0)
    bert = BertModel(config).eval()  # with its pooler, as open_clip's text tower holds it
    official = official_vision("tiny")
    embed_dim = official["visual.head.proj.weight"].shape[0]
    official.update({f"text.transformer.{k}": v for k, v in bert.state_dict().items()})
    official["text.proj.weight"] = torch.randn(embed_dim, 32)
    from safetensors.torch import save_file

    save_file(official, str(tmp_path / "hlip.safetensors"))
    assert cli(["model", "import", str(tmp_path / "hlip.safetensors"), "--preset", "tiny", "--out",
                str(tmp_path / "model"), "--text-dir", str(folder)]) == 0
    import json

    assert json.loads((tmp_path / "model" / "model_card.json").read_text())["text_model"] == str(folder.resolve())
    model, tok = load_pretrained(tmp_path / "model")
    model.eval()
    batch = tok(["No acute intracranial abnormality."])
    with torch.no_grad():
        ours = model.encode_text(**batch, normalize=False)
        theirs = F.linear(bert(**batch).last_hidden_state[:, 0], official["text.proj.weight"])
    torch.testing.assert_close(ours, theirs)
    # Its text folder is a whole text model: what every site names as model.text.name.
    from hlip_fed.federation.params import text_tower_hash
    from hlip_fed.model.factory import create_model

    site = create_model(load_config("tiny", overrides=[f"model.text.name={tmp_path / 'model' / 'text'}",
                                                       "model.text.pooling=cls"]).model, seed=1)
    assert text_tower_hash(site) == text_tower_hash(model)


@pytest.mark.parametrize("preset", ["hlip_brain_mri", "hlip_chest_ct"])
def test_hlip_preprocessing_presets_load_with_a_released_model_preset(preset):
    cfg = load_config(files=[preset], overrides=["model.preset=vit_base_multiscan_h3_token1176",
                                                 "model.vision.pos_embed=stored"])
    assert cfg.model.vision.width == 768 and cfg.data.ct_bone_hu is None
    assert (cfg.data.mean, cfg.data.std) == (0.449, 0.226)
    if preset == "hlip_chest_ct":
        assert cfg.data.ct_window == [-1150.0, 350.0] and cfg.data.target_spacing == [3.0, 1.0, 1.0]
    else:
        assert cfg.data.mri_percentiles == [0.5, 99.5] and cfg.model.text.prefix == "This MRI study shows: "


def test_a_2d_vit_inflates_as_hlip_inflates_mae(tmp_path):
    from hlip_fed.model.pos_embed import sincos_1d

    v = load_config("tiny").model.vision  # width 96, 8 x 16 x 16 patches, a 4 x 6 x 6 grid
    c = v.width
    torch.manual_seed(0)
    vit = {"cls_token": torch.randn(1, 1, c), "pos_embed": torch.randn(1, 1 + 6 * 6, c),
           "patch_embed.proj.weight": torch.randn(c, 3, 16, 16), "patch_embed.proj.bias": torch.randn(c),
           "norm.weight": torch.randn(c), "norm.bias": torch.randn(c), "head.weight": torch.randn(10, c)}
    for i in range(v.depth):
        ref = official_vision("tiny")
        vit.update({k.removeprefix("visual.trunk."): torch.randn_like(t) for k, t in ref.items()
                    if k.startswith(f"visual.trunk.blocks.{i}.")})
    torch.save({"model": vit, "epoch": 1600}, tmp_path / "vit.pth")  # as MAE's checkpoints hold it
    assert cli(["model", "inflate", str(tmp_path / "vit.pth"), "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    model, _ = load_pretrained(tmp_path / "m")
    vis = model.visual
    assert model.cfg.vision.pos_embed == "stored"
    torch.testing.assert_close(vis.cls_token, vit["cls_token"] + vit["pos_embed"][:, :1])
    kernel = vis.patch_embed.proj.weight  # [C, 1, 8, 16, 16]: the RGB sum, spread evenly over depth
    torch.testing.assert_close(kernel.sum(2)[:, 0], vit["patch_embed.proj.weight"].sum(1))
    assert torch.equal(kernel[:, :, 0], kernel[:, :, 7])
    depth = sincos_1d(c, torch.arange(4))
    for d in range(4):  # the 2D grid already matches the preset's: stored = depth sin-cos + 2D position
        torch.testing.assert_close(vis.pos_spatial[d] - depth[d], vit["pos_embed"][0, 1:].reshape(6, 6, c))
    assert torch.equal(vis.blocks[1].mlp.fc1.weight, vit["blocks.1.mlp.fc1.weight"])
    assert "inflated to tiny" in (tmp_path / "m" / "MODEL_CARD.md").read_text()

    # Another 2D grid is resampled in-plane; a block missing from the file is refused by its name.
    vit["pos_embed"] = torch.randn(1, 1 + 14 * 14, c)
    del vit["blocks.2.norm2.bias"]
    torch.save(vit, tmp_path / "vit14.pth")
    from hlip_fed.model.hlip_layout import inflate_2d

    with pytest.raises(HlipError, match="no weights for 'visual.blocks.2.norm2.bias'"):
        inflate_2d(tmp_path / "vit14.pth", "tiny", tmp_path / "m14")
    vit["blocks.2.norm2.bias"] = torch.zeros(c)
    torch.save(vit, tmp_path / "vit14.pth")
    assert load_pretrained(inflate_2d(tmp_path / "vit14.pth", "tiny", tmp_path / "m14"))[0].visual.pos_spatial.shape == (4, 6, 6, c)
