"""Writing and reading the user's files with one-line errors that name the file.

Every output is written whole or not at all (a temporary file beside it, renamed over it), so a
failed run never leaves a truncated file nor destroys an earlier good one; an unwritable or
missing place is a ``HilcError`` naming the path, not an ``OSError`` traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hilc.errors import HilcError


def check_output_path(out: str | Path, kind: str = "file") -> Path:
    """``out`` must not be a directory: checked before the work whose result goes there."""
    out = Path(out)
    if out.is_dir():
        raise HilcError(f"{out}: is a directory, expected {kind} path")
    return out


def atomic_write(out: str | Path, write: Callable[[Path], None], kind: str = "file") -> Path:
    """``write(tmp)`` then rename ``tmp`` over ``out``; the parent folder is created if missing.
    ``kind`` names what was expected in the error for a directory in the way (e.g. "an .npy file")."""
    out = check_output_path(out, kind)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HilcError(f"{out.parent}: cannot create the output's folder ({e.strerror or e})") from None
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise HilcError(f"{out}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """A JSON file's content; a missing, unreadable or truncated file is one line naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HilcError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HilcError(f"{path}: unreadable {what} ({e})") from None
