"""Viewing a tensor as rows × last dimension, for the row-wise kernels (layer_norm, geglu)."""


def as_rows(t, op, what):
    """``t`` as rows × last dim without copying; ValueError naming ``op`` if its strides
    don't allow it."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {what} needs a contiguous last dimension, "
                         f"got strides {t.stride()}")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(f"{op}: the leading dimensions of {what} (shape {tuple(t.shape)}, "
                         f"strides {t.stride()}) do not collapse into rows of one stride") from None
