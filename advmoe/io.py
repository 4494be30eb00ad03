"""Atomic writes: a crash never leaves a half-written file or directory behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike, may_replace: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; when the block succeeds, it becomes `path`.

    An existing `path` is replaced only if `may_replace(path)` says so (e.g. it is an older
    version of the same kind of artefact); otherwise FileExistsError, and nothing is touched.
    If the block raises, the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and may_replace(path)):
        raise FileExistsError(f"{path} exists and is not something this would replace; choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            # Directories cannot be renamed over each other: move the old one aside first,
            # so `path` is always either the complete old or the complete new version.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
