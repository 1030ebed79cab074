"""Files dapt writes atomically get the permissions the user's umask asks for (tempfile makes them
0600/0700), so a group can read results and models when the umask allows it."""

from __future__ import annotations

import os
import stat

import pytest
import torch


@pytest.fixture()
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    from dapt.io import atomic_save_dir, atomic_write_json
    from dapt.modeling.callbacks import AtomicCheckpointIO

    umask(mask)
    result = atomic_write_json(tmp_path / "results.json", {"a": 1})
    model = atomic_save_dir(tmp_path / "model", lambda tmp: (tmp / "weights.bin").write_bytes(b"x"))
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1)}, tmp_path / "ckpt" / "last.ckpt")
    assert stat.S_IMODE(result.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "ckpt" / "last.ckpt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(model.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((model / "weights.bin").stat().st_mode) == 0o666 & ~mask


def test_read_json_object_treats_a_missing_or_half_written_file_as_empty_and_names_a_foreign_one(tmp_path):
    """One reader for dapt's own JSON records (results, arm.json, per-document losses): a run that is
    still writing is not an error, a file that holds something other than an object is, by name."""
    from dapt.errors import DaptError
    from dapt.io import atomic_write_json, read_json_object

    assert read_json_object(tmp_path / "absent.json") == {}
    (tmp_path / "half.json").write_text('{"a": ')
    assert read_json_object(tmp_path / "half.json") == {}
    atomic_write_json(tmp_path / "ok.json", {"a": [1, 2]})
    assert read_json_object(tmp_path / "ok.json") == {"a": [1, 2]}
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DaptError, match=r"list\.json: expected a JSON object, found list"):
        read_json_object(tmp_path / "list.json")
