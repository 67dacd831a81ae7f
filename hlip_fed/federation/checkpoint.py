"""Per-round checkpoints of a federated run, and resume.

After every completed round the server writes the global federated arrays (safetensors) and a JSON
state: the round number, the round's metrics, the config hash and the strategy's own state (e.g.
FedAdam's moments, stored as extra tensors). ``latest`` points at the newest complete round and is
replaced atomically, so a server killed mid-write resumes from the previous round, never from a
half-written file. A new run with the same output folder and config continues after that round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from hlip_fed.atomic import write_atomic, write_bytes_atomic
from hlip_fed.errors import HlipError

LATEST = "latest.json"
STRATEGY_PREFIX = "strategy/"


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict = field(default_factory=dict)


def save_checkpoint(folder: str | Path, ckpt: Checkpoint) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"round-{ckpt.round:04d}"
    # np.array(order="C"), not ascontiguousarray: the latter turns 0-d scalars into 1-d arrays.
    tensors = {k: np.array(v, dtype=np.float32, order="C") for k, v in ckpt.arrays.items()}
    tensors.update({STRATEGY_PREFIX + k: np.array(v, order="C") for k, v in ckpt.strategy_state.items()})
    write_atomic(folder / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
    state = dict(ckpt.state, round=ckpt.round, weights=f"{name}.safetensors")
    write_bytes_atomic(folder / f"{name}.json", json.dumps(state, indent=2, sort_keys=True).encode())
    write_bytes_atomic(folder / LATEST, json.dumps({"round": ckpt.round, "state": f"{name}.json"}).encode())
    return folder / f"{name}.safetensors"


def load_latest(folder: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``folder``, or None when the run has not started."""
    folder = Path(folder)
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    try:
        latest = json.loads(pointer.read_text())
        state = json.loads((folder / latest["state"]).read_text())
        tensors = load_file(str(folder / state["weights"]))
    except (OSError, ValueError, KeyError) as exc:
        raise HlipError(f"{folder}: checkpoint is unreadable ({exc}); move it away to start afresh") from None
    arrays = {k: v for k, v in tensors.items() if not k.startswith(STRATEGY_PREFIX)}
    strategy = {k[len(STRATEGY_PREFIX):]: v for k, v in tensors.items() if k.startswith(STRATEGY_PREFIX)}
    return Checkpoint(round=int(state["round"]), arrays=arrays, strategy_state=strategy, state=state)
