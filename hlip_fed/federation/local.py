"""One hospital's side of a federated round, independent of Flower's runtime.

:class:`LocalSite` holds what a site needs across rounds: its local HLIP copy, the tokenizer, its
training and test loaders, its labels. Building these costs seconds (the text encoder, the dataset
index), so :func:`local_site` keeps one per process keyed by run and site: in simulation, and in a
SuperNode that keeps its ClientApp process, later rounds reuse them. What must survive a fresh
process (the optimiser moments, and the site-local parameters of ``federation.site_local``, which
never leave the site) is written to the site's state folder after every round and read back from
the previous round's file only, so a repeated round starts from the same state; so are the locked
text encoder's report features (:mod:`hlip_fed.model.text_cache`), computed once per report and
site.

Only the federated arrays and scalar metrics leave :meth:`LocalSite.train_round` and
:meth:`LocalSite.evaluate`; no voxel, report text or study id does.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from hlip_fed.config import Config
from hlip_fed.data.dataset import SiteDataset, collate_studies
from hlip_fed.errors import HlipError
from hlip_fed.federation.params import federated_keys, get_arrays, set_arrays, site_local_keys, text_tower_hash
from hlip_fed.federation.run import Site, read_labels
from hlip_fed.federation.transport import wire_bytes
from hlip_fed.model import create_model, create_tokenizer
from hlip_fed.model.text_cache import TextFeatureCache
from hlip_fed.training.evaluate import evaluate
from hlip_fed.training.train import (cycle, emulated_precision, make_optimizer, scan_dtype, train_steps,
                                    training_precision)

log = logging.getLogger("hlip_fed.federation")


def round_seed(seed: int, server_round: int, site: str) -> int:
    """A seed that differs per round and site but is the same when a round is repeated."""
    return (seed * 1_000_003 + server_round * 10_007 + zlib.crc32(site.encode())) % (2**31)


class TextTowerMismatch(HlipError):
    """The site's locked text tower is not the one the server's run uses."""


class LocalSite:
    def __init__(self, cfg: Config, site: Site):
        self.cfg, self.site = cfg, site
        site.state_dir.mkdir(parents=True, exist_ok=True)
        if cfg.data.cache_dir is None:  # preprocessed tensors live with the site's state, not its data
            cfg.data.cache_dir = str(site.state_dir / "cache")
        if site.memory_cache_mb is not None:  # the site's bound, not the run's
            cfg.data.memory_cache_mb = site.memory_cache_mb
        if site.precision is not None:  # the site's hardware, not the run's
            cfg.train.precision = site.precision
        if slow := emulated_precision(cfg.train):
            log.warning("site %s: %s", site.name, slow)
        log.info("site %s: training precision %s", site.name, training_precision(cfg))
        self.model = create_model(cfg.model, seed=cfg.train.seed)
        self.tokenizer = create_tokenizer(cfg.model)
        self.keys = federated_keys(self.model, cfg.federation.groups, cfg.federation.site_local)
        self.local_keys = site_local_keys(self.model, cfg.federation.site_local)  # never leave the site
        self._initial_local = get_arrays(self.model, self.local_keys)
        img = cfg.model.vision.img_size
        self.train_set = SiteDataset(site.data_dir, cfg.data, img, split="train", train=True)
        self.test_set = SiteDataset(site.data_dir, cfg.data, img, split="test")
        self.labels = read_labels(site.truth_path)
        # A locked text encoder's report features, reused across steps and rounds (kept on site).
        self.eval_text_cache = None
        self._text_hash: str | None = None
        self.text_cache = TextFeatureCache.for_training(self.model, self.tokenizer, cfg.train,
                                                        site.state_dir / "text-features")
        if self.text_cache is not None:
            # Evaluation encodes in fp32: the same features as training's unless training autocasts.
            self.eval_text_cache = self.text_cache if cfg.train.autocast_precision == "fp32" else \
                TextFeatureCache.for_model(self.model, self.tokenizer, "fp32", cfg.train.device)

    def check_text_tower(self, expected: str | None) -> None:
        """Refuse a message whose text tower (``text-tower`` in its config) is not this site's."""
        if expected is None or "text_encoder" in self.cfg.federation.groups:  # a federated tower arrives
            return
        if self._text_hash is None:
            self._text_hash = text_tower_hash(self.model)
        if expected != self._text_hash:
            raise TextTowerMismatch(f"site {self.site.name}: its text tower ({self.cfg.model.text.name}, sha256 "
                                    f"{self._text_hash[:16]}) is not the server's ({expected[:16]})")

    def _optimizer_file(self, server_round: int) -> Path:
        return self.site.state_dir / f"optimizer-round-{server_round:04d}.pt"

    def _load_local(self, before_round: int | None = None) -> None:
        """The site-local parameters as the site's last round before ``before_round`` (any round if
        None) left them; the initial ones if it has none."""
        if self.local_keys:
            path = latest_site_local(self.site.state_dir, before_round)
            set_arrays(self.model, load_file(path) if path is not None else self._initial_local)

    def train_round(
        self, global_arrays: dict[str, torch.Tensor], server_round: int, proximal_mu: float = 0.0
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        cfg, fed = self.cfg, self.cfg.federation
        if len(self.train_set) == 0:
            raise RuntimeError(f"site {self.site.name}: no usable training studies in {self.site.data_dir}")
        set_arrays(self.model, global_arrays)
        self._load_local(before_round=server_round)
        seed = round_seed(cfg.train.seed, server_round, self.site.name)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            self.train_set, batch_size=cfg.train.batch_size, shuffle=True, generator=gen,
            collate_fn=functools.partial(collate_studies, dtype=scan_dtype(cfg)),
            num_workers=cfg.data.num_workers, drop_last=len(self.train_set) > cfg.train.batch_size,
        )
        optimizer = make_optimizer(self.model, cfg.train)
        previous = self._optimizer_file(server_round - 1)
        if previous.exists():
            optimizer.load_state_dict(torch.load(previous, weights_only=True))
        anchor = {k: v.detach().clone() for k, v in global_arrays.items()} if proximal_mu > 0 else None
        t0 = time.perf_counter()
        stats = train_steps(
            self.model, self.tokenizer, cycle(loader, seed), cfg.train, fed.local_steps,
            optimizer=optimizer, start_step=(server_round - 1) * fed.local_steps,
            total_steps=fed.rounds * fed.local_steps, proximal_mu=proximal_mu, anchor=anchor,
            text_cache=self.text_cache,
        )
        if self.text_cache is not None:
            self.text_cache.flush()
        torch.save(optimizer.state_dict(), self._optimizer_file(server_round))
        for old in self.site.state_dir.glob("optimizer-round-*.pt"):
            if old.name < self._optimizer_file(server_round - 1).name:
                old.unlink()
        if self.local_keys:  # this round's and the one it started from, should this round be repeated
            save_file(get_arrays(self.model, self.local_keys), site_local_file(self.site.state_dir, server_round))
            for old in sorted(self.site.state_dir.glob("site-local-round-*.safetensors"))[:-2]:
                old.unlink()
        arrays = get_arrays(self.model, self.keys)
        metrics = {
            "num-examples": float(stats.examples),
            "train-loss": float(stats.loss),
            "train-seconds": float(time.perf_counter() - t0),
            "train-steps": float(stats.steps),
            "bytes-sent": float(wire_bytes(arrays, fed.transport)),  # as encoded by the transport
        }
        log.info("site %s round %d: loss %.4f, %d examples, %.1f s", self.site.name, server_round,
                 stats.loss, stats.examples, metrics["train-seconds"])
        return arrays, metrics

    def evaluate(self, global_arrays: dict[str, torch.Tensor], prompts: dict[str, tuple[list[str], list[str]]]) -> dict[str, float]:
        set_arrays(self.model, global_arrays)
        self._load_local()  # the site's own model: the global weights and its own site-local ones
        loader = DataLoader(self.test_set, batch_size=self.cfg.train.batch_size, collate_fn=collate_studies)
        metrics = evaluate(self.model, self.tokenizer, loader, self.labels, prompts, device=self.cfg.train.device,
                           text_cache=self.eval_text_cache)
        if self.eval_text_cache is not None:
            self.eval_text_cache.flush()
        return metrics


def site_local_file(state_dir: Path, server_round: int) -> Path:
    """Where a site keeps its site-local parameters after ``server_round``."""
    return Path(state_dir) / f"site-local-round-{server_round:04d}.safetensors"


def latest_site_local(state_dir: Path, before_round: int | None = None) -> Path | None:
    """A site's newest site-local parameter file (of a round before ``before_round``), if any."""
    files = sorted(Path(state_dir).glob("site-local-round-*.safetensors"))
    if before_round is not None:
        files = [f for f in files if f.name < site_local_file(state_dir, before_round).name]
    return files[-1] if files else None


_SITES: dict[tuple, LocalSite] = {}


def local_site(run_id: int, site: Site, make_config: Callable[[], Config]) -> LocalSite:
    """The process-wide :class:`LocalSite` of this run and site, built on first use.

    A simulation worker serves several sites in turn, so every site of the current run is kept;
    sites of earlier runs are dropped to free their models. ``make_config`` (the run config parsed
    into a :class:`Config`) is called only to build a site: a run's config does not change, so it is
    parsed once per site rather than on every message.
    """
    key = (run_id, site.name, str(site.data_dir))
    if key not in _SITES:
        for old in [k for k in _SITES if k[0] != run_id]:
            del _SITES[old]
        _SITES[key] = LocalSite(make_config(), site)
    return _SITES[key]
