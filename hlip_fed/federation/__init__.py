"""Federation helpers: which arrays travel, how replies are screened, checkpoints and resume.

This package may import Flower's record types (``flwr.app``) but never its runtime; the ClientApp
and ServerApp in ``client/`` and ``server/`` compose these helpers.
"""
