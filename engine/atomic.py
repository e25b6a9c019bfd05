"""Writing outputs whole or not at all: into a fresh name beside the target, then renamed.

A failure (bad input found late, an exception, Ctrl-C) never leaves a half-written file or
folder. Temporary names are created with the user's umask (``mkstemp`` and ``mkdtemp`` would
make them 0600 / 0700, and the rename would keep that).
"""
import errno
import os
import secrets
import shutil

from .errors import SdrtError


def sibling_name(path, suffix=".part"):
    """A fresh name beside ``path``."""
    return f"{os.path.abspath(path)}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def write_file(path, write, overwrite=False):
    """Run ``write(fh)`` on a fresh sibling file opened for binary writing, then give it the
    name ``path``.

    Without ``overwrite`` an existing ``path`` is never replaced: the finished file is
    hard-linked to ``path``, which fails with ``FileExistsError`` when the name is taken, even
    by a file that appeared while ``write`` ran.
    """
    tmp = sibling_name(path)
    try:
        with open(tmp, "xb") as fh:
            write(fh)
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # failed, or hard-linked to ``path``
            os.unlink(tmp)


def _rename_no_replace(src, dst):
    """Give the file ``src`` the name ``dst`` too, unless ``dst`` exists; the caller removes
    ``src`` if it is still there."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        # A file system without hard links (FAT, some network mounts): check, then rename.
        # Not atomic against another writer, which is the best such a file system allows.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "file exists", dst) from None
        os.replace(src, dst)


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
