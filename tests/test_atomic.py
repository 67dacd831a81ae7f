"""Atomic writes: the target is the old file or the whole new one, never a part."""

import json
import os

import pytest

from hlip_fed.atomic import write_atomic, write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"round": 1})

    def broken(tmp):
        with open(tmp, "w") as fh:
            fh.write('{"round": ')  # half written, then the writer fails
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, broken)
    assert json.loads(target.read_text()) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_mode_is_set_before_the_file_appears(tmp_path):
    target = write_json_atomic(tmp_path / "sub" / "approved.json", {"a": 1}, mode=0o600, sort_keys=True)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert os.stat(target).st_mode & 0o777 == 0o600
