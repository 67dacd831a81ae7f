"""hlip-fed ServerApp: federated averaging of HLIP's hierarchical encoder across hospitals.

Reads the run config, resumes from the run folder's last checkpoint if there is one, runs the
configured strategy for the remaining rounds, and after every round evaluates the global model on
the held-out set and checkpoints it (see :mod:`hlip_fed.federation.coordinator`).
"""

import dataclasses
import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from hlip_fed.federation.checkpoint import load_latest
from hlip_fed.federation.coordinator import Coordinator
from hlip_fed.federation.params import text_tower_hash
from hlip_fed.federation.run import config_from_run, prompts_to_config, run_dir
from hlip_fed.outputs.report import CurvePlotter
from server.grid import PromptGrid
from server.strategy import build_strategy

app = ServerApp()
log = logging.getLogger("hlip_fed.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    cfg = config_from_run(run_config)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = run_dir(run_config)
    out.mkdir(parents=True, exist_ok=True)
    coord = Coordinator(cfg, out, run_config.get("data-root"))
    remaining = cfg.federation.rounds - coord.offset
    if remaining <= 0:
        log.warning("%s already holds %d completed rounds; nothing to do", out, coord.offset)
        return
    strategy = build_strategy(cfg.federation, coord.expected, coord.offset, coord.strategy_state(), coord.known_nodes,
                              coord.privacy_ledger, max_examples=coord.examples_per_round)

    grid = PromptGrid(grid, cfg.federation.poll_interval_s)
    curves = CurvePlotter(out)  # drawn while the next round runs

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and coord.offset:
            return None  # the resumed model was evaluated when its round ended
        tensors = arrays.to_torch_state_dict()
        started = time.time()
        metrics = coord.evaluate_global(tensors)
        if server_round > 0:
            # Where the round's time went: the exchanges with the sites, then the held-out evaluation.
            timing = {"exchanges": grid.take_exchanges(), "heldout_started": started, "heldout_s": time.time() - started}
            record = dataclasses.replace(strategy.round_record, heldout=metrics, timing=timing)
            coord.end_round(server_round + coord.offset, tensors, record, strategy.state_arrays())
            curves.request()
        return MetricRecord(metrics) if metrics else None

    text_tower = text_tower_hash(coord.model)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(coord.initial_arrays()),
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout_s,
            # The locked text tower never travels: every site checks that it builds the server's.
            train_config=ConfigRecord({"text-tower": text_tower}),
            evaluate_config=ConfigRecord({**prompts_to_config(coord.prompts), "text-tower": text_tower}),
            evaluate_fn=after_round,
        )
        final = result.arrays if result.arrays is not None and len(result.arrays) else ArrayRecord(coord.initial_arrays())
    except PrivacyBudgetExhausted:
        last = load_latest(coord.ckpt_dir)  # the last released model, checkpointed when its round ended
        log.warning("stopping after round %d: the next round would spend more than federation.dp_max_epsilon=%g",
                    last.round if last else 0, cfg.federation.dp_max_epsilon)
        final = ArrayRecord(coord.initial_arrays() if last is None else
                            {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in last.arrays.items()})
    finally:
        curves.close()
    path = coord.finish(final.to_torch_state_dict())
    log.info("final global model saved to %s", path)
