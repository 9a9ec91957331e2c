"""Images in and out: where images come from (`source`: a folder, tar shards, the files a user
names), one image file (`files`), tar shards (`shards`), evaluation batches (`batches`), training
crops (`augment`), and PNGs and pictures written (`output`).

Names load lazily: `import lqae.images` imports neither torch nor PIL.
"""

from __future__ import annotations

from lqae.lazy import lazy_exports

_LAZY = {  # submodule -> the public names it provides: the one list of this package's names
    "lqae.images.source": ("scan_images", "collect_images"),
    "lqae.images.files": ("ImageFolder", "load_image", "open_rgb", "IMAGE_EXTENSIONS"),
    "lqae.images.batches": ("image_batches",),
    "lqae.images.output": ("save_png", "comparison_grid"),
}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
