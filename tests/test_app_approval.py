"""App approval at a site: the FAB hash, the approvals file, and what the site's launcher runs."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from client.site_exec import Refusal, approved_clientapp, clientapp_ref
from hlip_fed.cli import main as cli
from hlip_fed.deploy.app_bundle import build_app
from hlip_fed.errors import HlipError
from hlip_fed.security.approvals import APPROVALS_FILE, approve, disapprove, is_approved, read_approvals

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_app(ROOT, tmp_path_factory.mktemp("fab"))


def test_the_bundle_holds_the_app_code_only_and_its_hash_is_stable(bundle, tmp_path):
    path, fab_hash = bundle
    with zipfile.ZipFile(path) as fab:
        tops = {name.split("/")[0] for name in fab.namelist()}
    assert tops == {".info", "pyproject.toml", "hlip_fed", "server", "client"}
    assert build_app(ROOT, tmp_path)[1] == fab_hash  # a second build of the same source
    assert clientapp_ref(path.read_bytes()) == "client.app:app"


def test_approve_list_disapprove(bundle, tmp_path, capsys):
    path, fab_hash = bundle
    state = tmp_path / "state"
    assert cli(["site", "approvals", "--state", str(state)]) == 0
    assert "runs nothing" in capsys.readouterr().out
    assert cli(["site", "approve", "--state", str(state), str(path)]) == 0  # by file: same hash
    assert is_approved(state, fab_hash)
    assert read_approvals(state)[fab_hash]["from"] == str(path.resolve())
    assert (state / APPROVALS_FILE).stat().st_mode & 0o777 == 0o600
    assert cli(["site", "disapprove", "--state", str(state), fab_hash.upper()]) == 0
    assert not is_approved(state, fab_hash)
    with pytest.raises(HlipError, match="not approved"):
        disapprove(state, fab_hash)
    with pytest.raises(HlipError, match="neither a SHA-256"):
        approve(state, "deadbeef")
    (state / APPROVALS_FILE).write_text(json.dumps({"not-a-hash": {}}))
    with pytest.raises(HlipError, match=APPROVALS_FILE):
        is_approved(state, fab_hash)


def test_the_launcher_runs_the_installed_clientapp_of_an_approved_bundle_only(bundle, tmp_path):
    path, fab_hash = bundle
    fab = path.read_bytes()
    with pytest.raises(Refusal, match="not in"):
        approved_clientapp(tmp_path, fab_hash, fab)
    approve(tmp_path, fab_hash)
    import client.app

    assert approved_clientapp(tmp_path, fab_hash, fab) is client.app.app  # the site's module, not the FAB's
    with pytest.raises(Refusal, match="does not have its hash"):
        approved_clientapp(tmp_path, fab_hash, fab + b"\0")

    # An approved bundle that names another ClientApp still runs nothing.
    other = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(other, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "pyproject.toml":
                data = data.replace(b'clientapp = "client.app:app"', b'clientapp = "evil:app"')
            dst.writestr(item, data)
    other_hash = hashlib.sha256(other.getvalue()).hexdigest()
    approve(tmp_path, other_hash)
    with pytest.raises(Refusal, match="names ClientApp 'evil:app'"):
        approved_clientapp(tmp_path, other_hash, other.getvalue())
