"""The one exception type sdrt raises for bad input: the CLI prints its message on one line."""

import os


class SdrtError(ValueError):
    """Bad input a user can fix: a missing file, a shape that does not fit, an unknown name.

    A ``ValueError``, so code that guards a call with ``except ValueError`` catches it too.
    """


# Files whose loading runs code (Python pickles): refused wherever a model file is read.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def refuse_pickle(path):
    if path.endswith(PICKLE_SUFFIXES):
        raise SdrtError(f"{path}: pickle checkpoints are not loaded (they can run code); "
                        "convert it to .safetensors first")


def check_file(path, what):
    """``path`` is an existing file; else SdrtError naming it as ``what`` (a field or an
    option) and saying whether it is a folder or missing."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        why = ("is a folder" if isinstance(path, (str, os.PathLike)) and os.path.isdir(path)
               else "does not exist")
        raise SdrtError(f"{what} {path} {why}")
