"""Atomic output files: write a temporary file in the target's folder, flush it to disk, then move
it into place, so a crash never leaves a half-written file; an existing file is never replaced
unless the caller says so. Used by the model file, image and PNG writers."""

import contextlib
import os
import secrets


def exists_error(path, what="it"):
    return FileExistsError(f"{path} already exists; {what} is replaced only with overwrite=True (--overwrite)")


def temporary_path(path, suffix=""):
    """A new hidden file name beside ``path`` (``suffix`` keeps a format-giving extension)."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp{suffix}")


def publish(temporary, path, overwrite=False, what="it"):
    """Move the finished ``temporary`` to ``path``. Without ``overwrite`` a hard link publishes it,
    which is atomic and fails rather than replace a file that appeared meanwhile; on file systems
    without hard links: check, then rename (a narrow race remains)."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise exists_error(path, what) from None
    except OSError:
        if os.path.lexists(path):
            raise exists_error(path, what) from None
        os.replace(temporary, path)


def write_bytes(path, data, overwrite=False, what="it"):
    """Write ``data`` to ``path`` atomically; returns the number of bytes written."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise exists_error(path, what)
    temporary = temporary_path(path)
    try:
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(temporary, path, overwrite, what)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return len(data)
