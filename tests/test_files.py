"""write_atomically: the old file or the new one, never a mix, and no temporary file left behind."""

from __future__ import annotations

import pytest

from medvl_engine.files import write_atomically


class Boom(Exception):
    pass


def test_text_and_bytes_replace_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "out.json"
    assert write_atomically(path, "é\n") == path and path.read_bytes() == "é\n".encode()
    write_atomically(path, b"\x00\x01", fsync=True)
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path, monkeypatch):
    import os

    path = tmp_path / "out.txt"
    path.write_text("old\n")

    def replace_fails(src, dst):
        raise Boom

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(Boom):
        write_atomically(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
