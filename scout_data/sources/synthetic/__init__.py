"""Synthetic scenes by controllable composition: exact boxes, any quantity, no download.

A scene is a canvas (optionally non-square, with background clutter) holding shapes and simple objects,
each with a colour and a size class. An object's box is the tight box of the pixels drawn for it
(``mask.getbbox()``), so it is exact by construction. Queries are built as specs (description,
relation/anchor, superlative) and resolved against the scene; a sample is kept only when the
resolution picks exactly the intended objects and every box is inside the image with area.

Determinism: every record draws from its own ``random.Random("scout-synth:{seed}:{split}:{index}:...")``
stream, so the same seed gives byte-identical JSON and images, resuming regenerates nothing that was
written, and splits never share a scene (the split name is part of every scene's seed).

Modules, in the order they build on each other: ``world`` (colours, sizes, shapes), ``config`` (settings and
flags), ``scenes`` (placement and rendering), ``referring`` (descriptions resolved against a scene), ``chains``
(the steps of a query), ``queries`` (every kind of query), ``records`` (seeded samples, images, workers, the
CLI's entry points) and ``vocabulary`` (the tokenizer corpus); import a name from its module. The package is
what ``scout-data synth`` loads as a source, so it names the source interface (:mod:`scout_data.sources`) and
nothing else.
"""

from __future__ import annotations

from scout_data.sources.synthetic.config import add_arguments
from scout_data.sources.synthetic.records import check_args, estimate_total, image_folder, iter_samples

__all__ = ["add_arguments", "check_args", "estimate_total", "image_folder", "iter_samples"]
