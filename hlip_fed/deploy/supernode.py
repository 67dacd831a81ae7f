"""Launching a hospital's ``flower-supernode``: TLS, its authentication key, its data, no telemetry.

A site runs exactly one SuperNode. It dials out to the consortium's fleet gateway (no inbound
port), verifies it against the consortium ``ca.crt``, signs every call with the site's enrolled
key, and tells the ClientApp where the site's data and state are through ``--node-config``
(``data-path``, ``state-path``, ``site-name``, optionally ``truth-path``; see
:mod:`hlip_fed.federation.run`). Runtime installation stays off (Flower's default for SuperNodes)
and :func:`~hlip_fed.deploy.flower_env.flower_env` turns off telemetry and update checks.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from hlip_fed.config import site_memory_limit, site_precision
from hlip_fed.deploy.superlink import flower_executable
from hlip_fed.errors import HlipError
from hlip_fed.security.files import check_private_mode, write_secret
from hlip_fed.security.pki import days_left, load_certificate
from hlip_fed.security.site_keys import check_site_name

RUNTIME_PORT = 9094


def default_state_dir(name: str) -> Path:
    """Per-site state outside the data folder: ``$XDG_STATE_HOME/hlip-fed/NAME``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hlip-fed" / name


def toml_string(value: str) -> str:
    """A value as Flower's ``--node-config`` parser reads it (one TOML string, no escapes)."""
    if "\n" in value:
        raise HlipError(f"node config value {value!r} holds a line break")
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise HlipError(f"node config value {value!r} holds both quote characters")


@dataclass
class SuperNodeConfig:
    superlink: str
    ca_cert: Path
    key: Path
    data: Path
    state: Path | None = None
    name: str | None = None
    truth: Path | None = None
    runtime_port: int = RUNTIME_PORT
    extra: dict[str, str] = field(default_factory=dict)  # further node-config entries

    @property
    def site_name(self) -> str:
        return self.name or Path(self.key).stem

    @property
    def state_dir(self) -> Path:
        return Path(self.state) if self.state else default_state_dir(self.site_name)

    def validate(self) -> None:
        check_site_name(self.site_name)
        host, sep, port = self.superlink.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise HlipError(f"--superlink {self.superlink!r} is not HOST:PORT")
        for path, what in ((self.ca_cert, "CA certificate"), (self.key, "site key")):
            if not Path(path).is_file():
                raise HlipError(f"{path}: {what} not found")
        check_private_mode(self.key)
        if not Path(self.key).read_text(errors="replace").startswith("-----BEGIN OPENSSH PRIVATE KEY-----"):
            raise HlipError(f"{self.key} is not an OpenSSH private key; create it with `hlip-fed certs site`")
        ca = load_certificate(self.ca_cert)
        if days_left(ca) < 0:
            raise HlipError(f"{self.ca_cert} expired on {ca.not_valid_after_utc:%Y-%m-%d}")
        if not Path(self.data).is_dir():
            raise HlipError(f"{self.data}: site folder not found")
        data, state = Path(self.data).resolve(), self.state_dir.resolve()
        if state == data or data in state.parents:
            raise HlipError(f"state folder {state} is inside the data folder; give --state elsewhere")
        if self.truth is not None and not Path(self.truth).is_file():
            raise HlipError(f"{self.truth}: truth file not found")
        site_memory_limit(self.extra, self.site_name)  # a bad value stops the start, not the first round
        site_precision(self.extra, self.site_name)

    def node_config(self) -> str:
        entries = {"data-path": str(Path(self.data).resolve()), "state-path": str(self.state_dir.resolve()),
                   "site-name": self.site_name}
        if self.truth is not None:
            entries["truth-path"] = str(Path(self.truth).resolve())
        for key in self.extra:
            if key in entries:
                raise HlipError(f"--node-config {key} is set by hlip-fed itself")
        entries.update(self.extra)
        return " ".join(f"{k}={toml_string(str(v))}" for k, v in entries.items())


def supernode_command(cfg: SuperNodeConfig, secret_file: Path) -> list[str]:
    """``flower-supernode`` with TLS (never ``--insecure``), the site key and the site's data; it
    starts no ClientApp itself (``--isolation process``): the site's launcher
    (:mod:`client.site_exec`) takes its tasks, authenticated with ``secret_file``."""
    return [
        flower_executable("flower-supernode"),
        "--superlink", cfg.superlink,
        "--root-certificates", str(Path(cfg.ca_cert).resolve()),
        "--auth-supernode-private-key", str(Path(cfg.key).resolve()),
        "--node-config", cfg.node_config(),
        "--isolation", "process",
        "--superexec-auth-secret-file", str(Path(secret_file).resolve()),
        "--host", "127.0.0.1",
        "--port", str(cfg.runtime_port),
    ]


def site_command(cfg: SuperNodeConfig, python: str) -> list[str]:
    """The site's launcher (``python -m client.site_exec serve``) with its SuperNode: a fresh
    shared secret in the state folder for each start, readable by the site's account only."""
    secret_file = cfg.state_dir / "superexec.secret"
    write_secret(secret_file, secrets.token_bytes(32), force=True)
    return [python, "-m", "client.site_exec", "serve", "--state", str(cfg.state_dir.resolve()),
            "--runtime-api", f"127.0.0.1:{cfg.runtime_port}", "--secret-file", str(secret_file.resolve()),
            "--", *supernode_command(cfg, secret_file)]
