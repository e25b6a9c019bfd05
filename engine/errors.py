"""The one exception type sdrt raises for bad input: the CLI prints its message on one line."""


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
