"""What a pipeline call returns: the images themselves, which are also diffusers' output
object (``out.images``, ``out.nsfw_content_detected``), so that code written for diffusers'
``pipe(...).images[0]`` runs unchanged."""
import numpy as np


class ImageList(list):
    """``output_type="pil"``: a list of PIL images."""

    nsfw_content_detected = None  # (sdrt runs no safety checker)

    @property
    def images(self):
        return self


class ImageArray(np.ndarray):
    """``output_type="np"``: float32 (B, H, W, 3) in [0, 1]. What is computed from it
    (``a - b``, ``a.max()``) is a plain array or number again."""

    nsfw_content_detected = None

    @property
    def images(self):
        return self

    def __array_wrap__(self, array, context=None, return_scalar=False):
        array = array.view(np.ndarray)
        return array[()] if return_scalar else array
