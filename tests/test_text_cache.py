"""The report-feature cache of a locked text encoder: same training, fewer encoder passes."""

import dataclasses

import pytest
import torch
from test_train import batches

from hlip_fed.errors import HlipError
from hlip_fed.model import create_model, create_tokenizer
from hlip_fed.model.text_cache import TextFeatureCache, usable
from hlip_fed.training.train import train_steps


@pytest.fixture
def small_cfg(tiny_cfg):
    v = dataclasses.replace(tiny_cfg.model.vision, img_size=[16, 32, 32])
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, vision=v))


def same_length_batches(cfg):
    """The toy batches with reports of one token length: no padding, so batched and one-by-one
    encoding run the same arithmetic."""
    for images, mask, reports, ids in batches(cfg):
        yield images, mask, [r if "lesion" in r else "There is a bright lesion in the upper hemisphere." for r in reports], ids


def _train(cfg, use_cache=False, steps=3, padded=True):
    model, tok = create_model(cfg.model, seed=0), create_tokenizer(cfg.model)
    cache = TextFeatureCache.for_model(model, tok, cfg.train.precision, cfg.train.device) if use_cache else None
    torch.manual_seed(0)
    data = batches(cfg.train) if padded else same_length_batches(cfg.train)
    stats = train_steps(model, tok, data, dataclasses.replace(cfg.train, lr=1e-3), steps=steps, text_cache=cache)
    return model, stats, cache


def test_cached_and_uncached_training_steps_are_identical(small_cfg):
    plain, s_plain, _ = _train(small_cfg, padded=False)
    cached, s_cached, cache = _train(small_cfg, use_cache=True, padded=False)
    assert s_cached.losses == s_plain.losses
    for (name, a), b in zip(plain.named_parameters(), cached.parameters()):
        assert torch.equal(a, b), name
    assert cache.misses == len(cache) == 3  # three distinct reports, each encoded once
    assert cache.hits == 3 * 2 - 3


def test_with_padded_batches_the_losses_agree_to_rounding(small_cfg):
    # Reports of different lengths: the uncached batch is padded, the cache encodes each report
    # alone, so features differ by float rounding (about 1e-8) and so do the losses.
    _, s_plain, _ = _train(small_cfg)
    _, s_cached, _ = _train(small_cfg, use_cache=True)
    assert s_cached.losses == pytest.approx(s_plain.losses, rel=1e-6, abs=1e-6)


def test_cached_gradients_equal_uncached_gradients(small_cfg):
    import torch.nn.functional as F

    model, tok = create_model(small_cfg.model, seed=0), create_tokenizer(small_cfg.model)
    images, mask, reports, _ = next(same_length_batches(small_cfg.train))
    cache = TextFeatureCache.for_model(model, tok, "fp32", "cpu")
    grads = []
    for cached in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        image = model.encode_image(images, mask)
        if cached:
            feats = cache.features(reports, lambda r: model.text.features(**tok(r)))
            text = F.normalize(model.text.proj(feats), dim=-1)
        else:
            text = model.encode_text(**tok(reports, train=True))
        model.loss(image, text).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and not any(k.startswith("text.encoder") for k in grads[0])
    for k in grads[0]:
        assert torch.equal(grads[1][k], grads[0][k]), k


def test_a_changed_report_or_text_model_misses_the_cache(small_cfg, tmp_path):
    model, tok = create_model(small_cfg.model, seed=0), create_tokenizer(small_cfg.model)

    def encode(m):
        return lambda r: m.text.features(**tok(r))

    cache = TextFeatureCache.for_model(model, tok, "fp32", "cpu", tmp_path)
    cache.features(["No focal abnormality.", "A lesion."], encode(model))
    cache.flush()
    again = TextFeatureCache.for_model(model, tok, "fp32", "cpu", tmp_path)
    assert len(again) == 2
    again.features(["No focal abnormality.", "A lesion.", "A lesion. New sentence."], encode(model))
    assert (again.hits, again.misses) == (2, 1)
    # Another text model: other weights (a random tower seeded differently), another config, another
    # precision -- each is a new identity that finds nothing of the old one.
    other = create_model(small_cfg.model, seed=1)
    prefixed = dataclasses.replace(small_cfg.model, text=dataclasses.replace(small_cfg.model.text, prefix="Report: "))
    for m, precision in ((other, "fp32"), (model, "bf16")):
        c = TextFeatureCache.for_model(m, tok, precision, "cpu", tmp_path)
        assert c.model_id != cache.model_id and len(c) == 0
    torch.manual_seed(0)
    p = create_model(prefixed, seed=0)
    c = TextFeatureCache.for_model(p, create_tokenizer(prefixed), "fp32", "cpu", tmp_path)
    assert c.model_id != cache.model_id and len(c) == 0
    # A new identity's features replace the old file.
    c.features(["A lesion."], lambda r: p.text.features(**create_tokenizer(prefixed)(r)))
    c.flush()
    assert [f.name for f in tmp_path.glob("text-features-*.pt")] == [c.path.name]


def test_a_damaged_cache_file_is_rebuilt(small_cfg, tmp_path):
    model, tok = create_model(small_cfg.model, seed=0), create_tokenizer(small_cfg.model)
    cache = TextFeatureCache.for_model(model, tok, "fp32", "cpu", tmp_path)
    cache.path.write_bytes(b"not a torch file")
    again = TextFeatureCache.for_model(model, tok, "fp32", "cpu", tmp_path)
    assert len(again) == 0


def test_no_cache_for_a_trained_or_shuffled_text_encoder(small_cfg):
    for change in ({"lock": False}, {"shuffle_sentences": True}):
        text = dataclasses.replace(small_cfg.model.text, **change)
        assert not usable(text)
        mcfg = dataclasses.replace(small_cfg.model, text=text)
        with pytest.raises(HlipError, match="cannot be cached"):
            TextFeatureCache.for_model(create_model(mcfg, seed=0), create_tokenizer(mcfg), "fp32", "cpu")
        # Every training path asks for_training, which leaves such a tower uncached.
        assert TextFeatureCache.for_training(create_model(mcfg, seed=0), create_tokenizer(mcfg), small_cfg.train) is None


def test_training_paths_cache_a_locked_tower_unless_told_not_to(small_cfg):
    model, tok = create_model(small_cfg.model, seed=0), create_tokenizer(small_cfg.model)
    cache = TextFeatureCache.for_training(model, tok, small_cfg.train)
    assert cache is not None and cache.model_id == TextFeatureCache.for_model(model, tok, "fp32", "cpu").model_id
    off = dataclasses.replace(small_cfg.train, text_cache=False)
    assert TextFeatureCache.for_training(model, tok, off) is None


def test_a_site_encodes_each_report_once_across_rounds(mini_consortium, tmp_path):
    from conftest import FAST_RUN

    from hlip_fed.config import load_config
    from hlip_fed.federation.local import LocalSite
    from hlip_fed.federation.params import get_arrays
    from hlip_fed.federation.run import Site

    cfg = load_config("tiny", overrides=FAST_RUN)
    site = Site("site0", mini_consortium / "sites" / "site0", tmp_path / "state", None)
    local = LocalSite(cfg, site)
    arrays = get_arrays(local.model, local.keys)
    local.train_round(arrays, server_round=1)
    first = local.text_cache.misses
    assert first >= 1 and list((tmp_path / "state" / "text-features").glob("text-features-*.pt"))
    local.train_round(arrays, server_round=2)
    assert local.text_cache.misses == first  # round 2 drew only reports already encoded
    fresh = LocalSite(cfg, site)  # a new ClientApp process reads them from the state folder
    assert len(fresh.text_cache) == len(local.text_cache)
    off = LocalSite(load_config("tiny", overrides=FAST_RUN + ["train.text_cache=false"]), site)
    assert off.text_cache is None


def test_evaluation_encodes_reports_and_prompts_once_and_agrees_with_uncached(mini_consortium, tmp_path):
    from conftest import FAST_RUN

    from hlip_fed.config import load_config
    from hlip_fed.federation.coordinator import Coordinator
    from hlip_fed.federation.local import LocalSite
    from hlip_fed.federation.params import get_arrays
    from hlip_fed.federation.run import Site, read_prompts

    cfg = load_config("tiny", overrides=FAST_RUN)
    prompts = read_prompts(mini_consortium)
    local = LocalSite(cfg, Site("site1", mini_consortium / "sites" / "site1", tmp_path / "state", None))
    arrays = get_arrays(local.model, local.keys)
    assert local.eval_text_cache is local.text_cache  # fp32 training: one cache
    first = local.evaluate(arrays, prompts)
    encoded = local.text_cache.misses
    assert encoded >= 1 + 2 * len(prompts)  # the test reports and every prompt
    again = local.evaluate(arrays, prompts)
    assert local.text_cache.misses == encoded and again == first
    plain = LocalSite(load_config("tiny", overrides=FAST_RUN + ["train.text_cache=false"]),
                      Site("site1", mini_consortium / "sites" / "site1", tmp_path / "plain", None))
    assert plain.eval_text_cache is None
    assert plain.evaluate(arrays, prompts) == pytest.approx(first, abs=1e-5)
    # the server's held-out evaluation keeps its own cache in memory
    coord = Coordinator(cfg, tmp_path / "run", mini_consortium)
    heldout = coord.evaluate_global(arrays)
    encoded = coord.text_cache.misses
    assert encoded >= 1 and coord.evaluate_global(arrays) == heldout and coord.text_cache.misses == encoded
