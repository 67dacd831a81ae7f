"""Running Flower's own daemons for a hospital federation, wrapped (never replaced).

:mod:`~hlip_fed.deploy.processes` starts and stops child processes by PID,
:mod:`~hlip_fed.deploy.flower_env` fixes the environment every Flower process gets (no telemetry,
no update check, no runtime package installation), :mod:`~hlip_fed.deploy.fleet_gateway` is the
site-facing reverse proxy that forwards only the Fleet API, :mod:`~hlip_fed.deploy.superlink`
puts ``flower-superlink`` (on loopback) and the gateway together, and
:mod:`~hlip_fed.deploy.flwr_cli` drives the operator's ``flwr`` commands against the loopback
Control API.
"""
