"""hlip-fed ServerApp with secure aggregation (Flower's SecAgg+), a separate server mode.

Select it as the run's server component together with ``client.secagg:app`` (see
docs/deployment.md, "Secure aggregation"). The server learns only the *sum* of the sites'
updates: SecAgg+ has every site mask its quantized update with pairwise masks that cancel in the
sum, and secret-shares its mask seeds so that the sum can still be unmasked when some sites drop
out after the masking (as long as ``RECONSTRUCTION_THRESHOLD`` of them are left).

The price is everything that needs one site's update: there is no reply screening (a NaN or a
1000x update enters the sum unseen), no update-norm check, no robust aggregation (median,
trimmed mean), no per-site metrics. Training is the same :class:`~hlip_fed.federation.local.LocalSite`
code; checkpoints, resume, held-out evaluation and the final model are the same
:class:`~hlip_fed.federation.coordinator.Coordinator`'s. Per-site evaluation is not run in this
mode (it would send each site's metrics in the clear through the legacy evaluate path).

Flower 1.42 offers SecAgg+ only in its legacy workflow API, so this module drives a legacy
``FedAvg`` through ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``. Sites send updates,
not weights (see :mod:`client.secagg`), and :class:`UpdateFedAvg` adds the unmasked average
update to the global model.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from hlip_fed.errors import HlipError
from hlip_fed.federation.coordinator import Coordinator
from hlip_fed.federation.round_record import RoundRecord
from hlip_fed.federation.run import config_from_run, run_dir
from hlip_fed.outputs.report import CurvePlotter

log = logging.getLogger("hlip_fed.server")

app = ServerApp()

# Every sampled site shares its mask seeds with all others (1.0 = all), and the sum can be
# unmasked while two thirds of them are still there: a site that drops out after masking costs
# nothing, while fewer than two thirds of colluding parties cannot unmask one site's update.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3
# SecAgg+ quantizes values in [-CLIPPING_RANGE, CLIPPING_RANGE]: far above any local update of
# the federated weights (they are updates, not weights; see client/secagg.py).
CLIPPING_RANGE = 8.0


class UpdateFedAvg(LegacyFedAvg):
    """Legacy FedAvg over sites' *updates*: the unmasked average is added to the global model."""

    def __init__(self, global_arrays: list[np.ndarray], **kwargs):
        # At least 1-d, as the sites' updates (SecAgg+ mishandles 0-d arrays); reshaped on the way out.
        super().__init__(initial_parameters=ndarrays_to_parameters([np.atleast_1d(a) for a in global_arrays]), **kwargs)
        self.global_arrays = [np.atleast_1d(np.asarray(a, dtype=np.float32)) for a in global_arrays]
        self.sites = 0

    def aggregate_fit(self, server_round, results, failures):
        self.sites = len(results)
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None:
            return None, metrics
        update = parameters_to_ndarrays(params)
        self.global_arrays = [(g + d).astype(np.float32) for g, d in zip(self.global_arrays, update, strict=True)]
        return ndarrays_to_parameters(self.global_arrays), metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    cfg = config_from_run(run_config)
    fed = cfg.federation
    if fed.dp != "off":
        raise HlipError("the secure-aggregation server does not add DP noise: set federation.dp=off or use server.app")
    if fed.strategy.lower() != "fedavg":
        raise HlipError(f"the secure-aggregation server can only average (fedavg), not {fed.strategy!r}: "
                        "it never sees one site's update")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = run_dir(run_config)
    out.mkdir(parents=True, exist_ok=True)
    coord = Coordinator(cfg, out, run_config.get("data-root"))
    offset, keys = coord.offset, list(coord.expected)
    remaining = fed.rounds - offset
    if remaining <= 0:
        log.warning("%s already holds %d completed rounds; nothing to do", out, offset)
        return

    def tensors_of(ndarrays) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(coord.expected[k]))
                for k, v in zip(keys, ndarrays, strict=True)}

    def after_round(server_round: int, ndarrays, _config):
        if server_round == 0 and offset:
            return None  # the resumed model was evaluated when its round ended
        tensors = tensors_of(ndarrays)
        metrics = coord.evaluate_global(tensors)
        if server_round > 0:
            record = RoundRecord(aggregation="secagg+", sites_in_sum=strategy.sites, heldout=metrics)
            coord.end_round(server_round + offset, tensors, record, {})
            curves.request()
        return 0.0, metrics

    initial = [v.numpy() for v in coord.initial_arrays().values()]
    strategy = UpdateFedAvg(
        initial, fraction_fit=fed.fraction_train, fraction_evaluate=0.0, min_fit_clients=fed.min_nodes,
        min_available_clients=fed.min_nodes, evaluate_fn=after_round,
        on_fit_config_fn=lambda r: {"server-round": r + offset},
    )
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=NUM_SHARES, reconstruction_threshold=RECONSTRUCTION_THRESHOLD, max_weight=float(coord.examples_per_round),
        clipping_range=CLIPPING_RANGE, timeout=fed.round_timeout_s,
    ))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining, round_timeout=fed.round_timeout_s),
                           strategy=strategy)
    curves = CurvePlotter(out)  # drawn while the next round runs
    try:
        workflow(grid, legacy)
    finally:
        curves.close()
    path = coord.finish(tensors_of(strategy.global_arrays))
    log.info("final global model saved to %s", path)
