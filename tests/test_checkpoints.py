"""The checkpoint file: a content checksum that refuses flipped bytes, and file modes."""

import os
import stat

import pytest
import torch

from minidpo.atomic import atomic_write_text
from minidpo.checkpoints import (
    CHECKSUM,
    content_sha256,
    load_checkpoint,
    save_checkpoint,
)
from minidpo.errors import MinidpoError


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"kind": "policy", "model": {"w": torch.randn(64, 64, generator=g)}, "step": 3}


def test_round_trip_keeps_the_content_and_stamps_a_checksum(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", _state())
    ckpt = load_checkpoint(path, kind="policy")
    assert torch.equal(ckpt["model"]["w"], _state()["model"]["w"]) and ckpt["step"] == 3
    assert isinstance(ckpt[CHECKSUM], str) and len(ckpt[CHECKSUM]) == 64


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_a_flipped_byte_inside_a_tensor_is_refused_by_name(tmp_path, where) -> None:
    """torch.load reads such a file without complaint; the checksum does not."""
    path = save_checkpoint(tmp_path / "c.pt", _state())
    raw = bytearray(path.read_bytes())
    start = bytes(raw).find(_state()["model"]["w"].numpy().tobytes())
    assert start > 0  # the tensor's bytes sit in the file as they are
    raw[start + int(where * 64 * 64 * 4)] ^= 0x10
    path.write_bytes(bytes(raw))
    torch.load(path, weights_only=True)  # still a readable file
    with pytest.raises(MinidpoError, match=r"c\.pt: content does not match its checksum"):
        load_checkpoint(path)


def test_a_changed_entry_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", _state())
    ckpt = torch.load(path, weights_only=True)
    ckpt["step"] = 4
    torch.save(ckpt, path)
    with pytest.raises(MinidpoError, match="checksum"):
        load_checkpoint(path)


def test_a_version_1_checkpoint_without_checksum_still_loads(tmp_path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"format": "minidpo-checkpoint", "version": 1, **_state()}, path)
    assert load_checkpoint(path)["step"] == 3


def test_the_identity_hash_ignores_the_checksum_and_wall_clock(tmp_path) -> None:
    a = save_checkpoint(tmp_path / "a" / "c.pt", {**_state(), "elapsed_s": 1.0})
    b = save_checkpoint(tmp_path / "b" / "c.pt", {**_state(), "elapsed_s": 2.0})
    assert load_checkpoint(a)[CHECKSUM] != load_checkpoint(b)[CHECKSUM]  # elapsed_s differs
    assert content_sha256([a]) == content_sha256([b])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_mode_the_umask_allows(tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        text = atomic_write_text(tmp_path / "t.txt", "x")
        ckpt = save_checkpoint(tmp_path / "c.pt", _state())
    finally:
        os.umask(old)
    for p in (text, ckpt):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
