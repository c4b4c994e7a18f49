"""Atomic writes and safe run names."""

from __future__ import annotations

import os

import pytest

from decal._io import safe_name, write_json_atomic, write_text_atomic
from decal.cli import main


def test_atomic_write_replaces_whole_file_with_plain_mode(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert path.read_text() == '{\n  "x": 2\n}\n'
    umask = os.umask(0o022)
    try:
        write_text_atomic(path, "y")
    finally:
        os.umask(umask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary left behind


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_text_atomic(path, "old")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize(
    "name, expected",
    [("Qwen/Qwen3-1.7B", "Qwen--Qwen3-1.7B"), ("../../etc/passwd", "etc--passwd"), ("..", "unnamed"), ("a b:c", "a_b_c")],
)
def test_safe_name_stays_in_its_folder(name, expected):
    assert safe_name(name) == expected
    assert "/" not in safe_name(name) and safe_name(name) not in ("", ".", "..")


def test_cli_without_arguments_prints_help_only(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "Usage" in captured.out and "error" not in captured.err


def test_top_level_exports_resolve():
    import decal

    for name in decal.__all__:
        assert getattr(decal, name) is not None, name
