"""The image reader's old home: :mod:`scout_data.images` owns it (``validate`` and ``preview`` read images too)."""

from scout_data.images import (  # noqa: F401 - re-exported
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    ImageError,
    image_size_problem,
    read_image,
    to_rgb,
)
