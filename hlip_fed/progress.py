"""Progress bars for the slow loops (synthesis, indexing, local training, evaluation, inference).

A bar is only drawn for a person watching: on a terminal, outside CI. Logs captured by a
scheduler, a Flower SuperNode or a CI runner would otherwise fill with carriage-return noise, so
the bar is off when stderr is not a TTY or the ``CI`` environment variable is set.
``HLIP_FED_PROGRESS=1`` forces bars on (e.g. under ``script`` or a terminal multiplexer that hides
the TTY), ``HLIP_FED_PROGRESS=0`` forces them off.

Usage::

    from hlip_fed.progress import progress
    for study in progress(studies, desc="embedding", unit="study"):
        ...
    with progress(total=steps, desc="local training", unit="step") as bar:
        ...; bar.update(1); bar.set_postfix(loss=f"{loss:.3f}")
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

ENV = "HLIP_FED_PROGRESS"


def enabled(stream=None) -> bool:
    """Whether a bar should be drawn on ``stream`` (default stderr) in this environment."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream is not a terminal
        return False


def progress(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
             unit: str = "it", leave: bool = False, **kwargs: Any):
    """A ``tqdm`` bar over ``iterable`` (or a manual one with ``total``), silent off a terminal.

    The disabled bar is still a real ``tqdm`` object, so callers use ``update``/``set_postfix``
    without checking; it just prints nothing. Bars go to stderr so that machine-readable output on
    stdout (``--json``) stays clean.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=not enabled(sys.stderr), dynamic_ncols=True, **kwargs)
