"""Tests import the in-process Grid from here; it lives in :mod:`simulations.inprocess`."""

from simulations.inprocess import InProcessGrid, ServerCrash, run_federation  # noqa: F401
