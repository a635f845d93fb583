"""Writing report files (exports, the Prometheus textfile) so no reader sees half a file.

The text goes to a temporary file beside the target, which is renamed over it when
complete: a scraper or a person opening the file sees the old one or the new one. The
temporary name is unique, so two exports to one file do not write into each other.

What the operator named is respected: a symlink keeps being a symlink (its target is
replaced), and a FIFO, a terminal or a device such as /dev/stdout is written to directly,
since renaming over it would replace it with a regular file.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


@contextmanager
def atomic_text(path: str, encoding: str = "utf-8") -> Iterator[TextIO]:
    """A text file to write `path` with; raises OSError as open() would."""
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(target, "w", newline="", encoding=encoding) as fh:
            yield fh
        return
    folder = os.path.dirname(target) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding=encoding) as fh:
            yield fh
        # mkstemp makes it 0600; keep the mode of the file it replaces, else the usual one
        os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
