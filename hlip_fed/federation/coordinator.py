"""The aggregation server's bookkeeping, independent of Flower's runtime.

:class:`Coordinator` owns the global model of a run: it supplies the initial arrays (fresh, or the
last checkpoint when the output folder already holds a run with the same config), evaluates the
global model on the held-out set, and after every round writes the checkpoint, one line of
``metrics.jsonl`` and the curve plot. At the end it saves the final model with ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from hlip_fed.config import Config, config_hash
from hlip_fed.data.dataset import SiteDataset, collate_studies
from hlip_fed.errors import HlipError
from hlip_fed.federation.checkpoint import Checkpoint, load_latest, save_checkpoint
from hlip_fed.federation.params import federated_keys, get_arrays, set_arrays, start_from
from hlip_fed.federation.privacy import LEDGER_KEY as PRIVACY_LEDGER
from hlip_fed.federation.round_record import RoundRecord
from hlip_fed.federation.run import read_labels, read_prompts
from hlip_fed.model import create_model, create_tokenizer
from hlip_fed.model.text_cache import TextFeatureCache
from hlip_fed.outputs.model_card import provenance_from_run, write_model_card
from hlip_fed.outputs.report import tensorboard_round
from hlip_fed.training.evaluate import evaluate

log = logging.getLogger("hlip_fed.federation")


def resume_hash(cfg: Config) -> str:
    """Digest of what defines the training: it must match to resume. Operational settings (how
    many rounds in all, timeouts, waiting, screening bounds, which exchange carries the sites'
    evaluation, threads, workers, cache folder and memory) may change between a run and its resumption."""
    fed = dataclasses.replace(
        cfg.federation, rounds=0, round_timeout_s=0.0, node_wait_s=1.0, quorum=1, max_update_ratio=0.0,
        evaluate_with_train=True,
    )
    train = dataclasses.replace(cfg.train, threads=0, device="cpu", text_cache=False)
    data = dataclasses.replace(cfg.data, num_workers=0, cache_dir=None, memory_cache_mb=0)
    return config_hash(dataclasses.replace(cfg, federation=fed, train=train, data=data))


class Coordinator:
    def __init__(self, cfg: Config, run_dir: Path, data_root: str | Path | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.data_root = Path(data_root) if data_root else None
        self.model = create_model(cfg.model, seed=cfg.train.seed)
        self.tokenizer = create_tokenizer(cfg.model)
        self.keys = federated_keys(self.model, cfg.federation.groups, cfg.federation.site_local)
        if cfg.federation.init:
            start_from(self.model, cfg.federation.init, self.keys)
        self.expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items() if k in self.keys}
        self.prompts = read_prompts(self.data_root)
        self.resumed = load_latest(self.ckpt_dir)
        if self.resumed is not None:
            theirs = self.resumed.state.get("config_hash")
            if theirs != resume_hash(cfg):
                raise HlipError(
                    f"{self.run_dir}: holds a run with another configuration (hash {theirs}); "
                    "use a new run-dir or the same config to resume"
                )
            log.info("resuming %s after round %d", self.run_dir, self.resumed.round)
        self._heldout = None
        # The held-out reports and the prompts are the same texts every round (kept in memory).
        self.text_cache = TextFeatureCache.for_training(self.model, self.tokenizer,
                                                        dataclasses.replace(cfg.train, precision="fp32"))

    @property
    def offset(self) -> int:
        """Rounds already completed in this output folder."""
        return self.resumed.round if self.resumed else 0

    def initial_arrays(self) -> dict[str, torch.Tensor]:
        if self.resumed:
            return {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in self.resumed.arrays.items()}
        return get_arrays(self.model, self.keys)

    def strategy_state(self) -> dict[str, np.ndarray]:
        return dict(self.resumed.strategy_state) if self.resumed else {}

    @property
    def known_nodes(self) -> list[int]:
        """The nodes that trained in the last completed round, so that a stalled resume can name
        the sites it misses."""
        return [int(n) for n in (self.resumed.state.get("train_sites", {}) if self.resumed else {})]

    @property
    def privacy_ledger(self) -> dict | None:
        """Central DP's accounting so far (None before the first round)."""
        return self.resumed.state.get(PRIVACY_LEDGER) if self.resumed else None

    @property
    def examples_per_round(self) -> int:
        """What an honest site trains on in a round: local steps x accumulation x batch."""
        train = self.cfg.train
        return self.cfg.federation.local_steps * train.grad_accum * train.batch_size

    def evaluate_global(self, arrays: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of the global model on the consortium's held-out set (empty without one)."""
        heldout = self.data_root / "heldout" if self.data_root else None
        if heldout is None or not heldout.is_dir():
            return {}
        if self._heldout is None:
            dataset = SiteDataset(heldout, self.cfg.data, self.cfg.model.vision.img_size, split=None)
            self._heldout = (
                DataLoader(dataset, batch_size=self.cfg.train.batch_size, collate_fn=collate_studies),
                read_labels(self.data_root / "truth" / "heldout.jsonl"),
            )
        loader, labels = self._heldout
        set_arrays(self.model, arrays)
        return evaluate(self.model, self.tokenizer, loader, labels, self.prompts, device=self.cfg.train.device,
                        text_cache=self.text_cache)

    def end_round(
        self, server_round: int, arrays: dict[str, torch.Tensor], record: RoundRecord,
        strategy_state: dict[str, np.ndarray]
    ) -> None:
        """Checkpoint and log a completed round."""
        record = dataclasses.replace(record, round=server_round)
        line = record.to_json()
        state = {"config_hash": resume_hash(self.cfg), "time": time.time(),
                 **{k: v for k, v in line.items() if k != "round"}}
        save_checkpoint(
            self.ckpt_dir,
            Checkpoint(server_round, {k: v.numpy() for k, v in arrays.items()}, strategy_state, state),
        )
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
        tensorboard_round(self.run_dir, line)

    def finish(self, arrays: dict[str, torch.Tensor]) -> Path:
        """Save the final global model with its model card (provenance, intended use, licences)."""
        set_arrays(self.model, arrays)
        path = self.model.save_pretrained(self.run_dir / "model")
        write_model_card(path, provenance_from_run(self.run_dir, self.cfg, self.data_root))
        return path
