"""Deliberately wrong replies from a SuperNode, for testing the server's defences only.

The deployment tests need one real SuperNode that misbehaves so that update screening is shown on
the wire, not only on hand-made messages. A SuperNode asks for it with ``--node-config``
``misbehave=MODE`` (``nan``: a NaN in the first array; ``scale``: the update multiplied by 1000;
``missing``: the last array left out; ``cycle``: nan, scale, missing in rounds 1, 2, 3, ...).

This must never be switched on by a stray setting in production, so the node config alone is not
enough: the SuperNode's environment must also hold ``HLIP_FED_TEST_FAULTS=1``. A node config that
asks for misbehaviour without it makes every reply fail with an error naming both settings, so the
mistake is seen at once instead of silently ignored.
"""

from __future__ import annotations

import os

import torch

from hlip_fed.errors import HlipError

ENV_SWITCH = "HLIP_FED_TEST_FAULTS"
NODE_KEY = "misbehave"
MODES = ("nan", "scale", "missing")
SCALE = 1000.0


def requested_fault(node_config: dict, server_round: int) -> str | None:
    """The fault this node must inject in ``server_round``, or None for an honest reply."""
    mode = str(node_config.get(NODE_KEY) or "")
    if not mode:
        return None
    if os.environ.get(ENV_SWITCH) != "1":
        raise HlipError(f"node config sets {NODE_KEY}={mode!r}, a test-only fault, but {ENV_SWITCH}=1 "
                        "is not set; remove it from --node-config")
    if mode == "cycle":
        return MODES[(server_round - 1) % len(MODES)]
    if mode not in MODES:
        raise HlipError(f"node config {NODE_KEY}={mode!r} is not one of cycle, {', '.join(MODES)}")
    return mode


def inject(fault: str, sent: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Spoil a site's trained ``sent`` arrays given the global ``received`` ones."""
    out = dict(sent)
    first, last = next(iter(out)), next(reversed(out))
    if fault == "nan":
        bad = out[first].clone()
        bad.view(-1)[0] = float("nan")
        out[first] = bad
    elif fault == "scale":
        out = {k: received[k].to(v.dtype) + SCALE * (v - received[k].to(v.dtype)) for k, v in out.items()}
    elif fault == "missing":
        del out[last]
    return out
