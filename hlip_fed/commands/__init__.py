"""Top-level ``hlip-fed`` commands, one module each (see :mod:`hlip_fed.cli`)."""
