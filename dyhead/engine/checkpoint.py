"""Atomic file writes and training checkpoints.

Every output is written to a temporary name in the same directory and renamed into place, so a
killed job leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from dyhead.errors import DyheadError


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_json(path: Path, data) -> None:
    _atomic(path, lambda fh: fh.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode()))


def save_text(path: Path, text: str) -> None:
    _atomic(path, lambda fh: fh.write(text.encode()))


def save_torch(path: Path, obj) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))


def load_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DyheadError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DyheadError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise DyheadError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise DyheadError(f"{path}: cannot read checkpoint ({exc})") from None
