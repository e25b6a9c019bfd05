"""Writing outputs whole or not at all: into a fresh name beside the target, then renamed.

A failure (bad input found late, an exception, Ctrl-C) never leaves a half-written file or
folder. Temporary names are created with the user's umask (``mkstemp`` and ``mkdtemp`` would
make them 0600 / 0700, and the rename would keep that).
"""
import os
import secrets
import shutil

from .errors import SdrtError


def sibling_name(path, suffix=".part"):
    """A fresh name beside ``path``."""
    return f"{os.path.abspath(path)}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def check_new_folder(path):
    """``path`` may become a new folder: it is absent or an empty folder, in a writable one."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise SdrtError(f"{path} exists and is not an empty folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SdrtError(f"cannot write to {parent}")


def write_folder(path, write):
    """Run ``write(tmp)`` on a fresh sibling folder, then rename it to ``path`` (which
    ``check_new_folder`` accepted). Returns what ``write`` returns."""
    tmp = sibling_name(path)
    try:
        os.mkdir(tmp)
    except OSError as e:
        raise SdrtError(f"cannot write to {os.path.dirname(tmp)}: {e.strerror}")
    try:
        result = write(tmp)
        if os.path.exists(path):
            os.rmdir(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
