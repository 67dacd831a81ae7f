"""The operator's record of which site owns which enrolled key, for enrolment and revocation.

Flower identifies SuperNodes by a numeric node ID and stores the key, but its listing does not
show the site name, and ``flwr supernode unregister`` takes only the node ID. Revoking "hospital-b"
during an incident must not depend on someone remembering a 19-digit number, so every enrolment
is recorded here (name, node ID, key fingerprint, time) in ``sites.json`` next to the SuperLink
state, written atomically, and revocations stay in the record as history.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from hlip_fed.atomic import write_json_atomic
from hlip_fed.deploy.flwr_cli import FlwrCli
from hlip_fed.errors import HlipError
from hlip_fed.security.site_keys import check_site_name, fingerprint, load_site_public_key

REGISTRY = "sites.json"


@dataclass
class SiteRecord:
    name: str
    node_id: int
    fingerprint: str
    enrolled_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Enrolment:
    """Enrol and revoke site keys on the SuperLink, keeping ``sites.json`` in step."""

    state_dir: Path
    flwr: FlwrCli

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / REGISTRY

    def records(self) -> list[SiteRecord]:
        if not self.path.exists():
            return []
        try:
            return [SiteRecord(**r) for r in json.loads(self.path.read_text())["sites"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise HlipError(f"{self.path} is damaged ({exc}); restore it from backup") from exc

    def _save(self, records: list[SiteRecord]) -> None:
        write_json_atomic(self.path, {"sites": [asdict(r) for r in records]})

    def active(self, name: str) -> SiteRecord | None:
        return next((r for r in self.records() if r.name == name and r.active), None)

    def enroll(self, name: str, public_key: Path) -> SiteRecord:
        """Register ``public_key`` for site ``name``; one active key per site, one site per key."""
        check_site_name(name)
        fp = fingerprint(load_site_public_key(public_key))
        records = self.records()
        for r in records:
            if r.active and r.name == name:
                raise HlipError(f"site {name} is already enrolled (node {r.node_id}, "
                                f"{r.fingerprint}); revoke it first to replace its key")
            if r.active and r.fingerprint == fp:
                raise HlipError(f"this key is already enrolled for site {r.name}")
        record = SiteRecord(name, self.flwr.register_node(public_key, name=name), fp, _now())
        self._save([*records, record])
        return record

    def revoke(self, name: str) -> SiteRecord:
        """Unregister the site's node: its key no longer authenticates."""
        records = self.records()
        record = next((r for r in records if r.name == name and r.active), None)
        if record is None:
            raise HlipError(f"site {name} has no active enrolment in {self.path}")
        self.flwr.unregister_node(record.node_id)
        record.revoked_at = _now()
        self._save(records)
        return record
