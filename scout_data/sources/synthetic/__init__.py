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
CLI's entry points) and ``vocabulary`` (the tokenizer corpus). Everything public is re-exported here.
"""

from __future__ import annotations

from scout_data.sources.synthetic.config import (
    CHAIN_STYLES,
    KINDS,
    QA_TYPES,
    REFEXP_TYPES,
    SynthConfig,
    add_arguments,
    config_from_args,
    parse_image_size,
    parse_weights,
    split_counts,
)
from scout_data.sources.synthetic.queries import (
    CAPTION_ANSWERS,
    CAPTION_QA_ANSWERS,
    CAPTION_QUERIES,
    COUNT_QUERIES,
    FIND_ALL_QUERIES,
    QA_QUERIES,
    REFEXP_BUILDERS,
    REFEXP_QUERIES,
    SHORT_ANSWER,
    Built,
    build_query,
    check_built,
)
from scout_data.sources.synthetic.records import (
    check_args,
    estimate_total,
    generate,
    image_folder,
    iter_samples,
    make_record,
    record_id,
    save_image,
)
from scout_data.sources.synthetic.referring import (
    Desc,
    Query,
    ref_text,
    resolve,
    unique_desc,
)
from scout_data.sources.synthetic.scenes import (
    Obj,
    Scene,
    make_scene,
    render_scene,
    shape_mask,
)
from scout_data.sources.synthetic.vocabulary import (
    vocabulary_text,
)
from scout_data.sources.synthetic.world import (
    BACKGROUNDS,
    CLUTTER,
    COLOURS,
    GRID_FILL,
    NAME,
    PLURALS,
    REL_WORDS,
    SHAPES,
    SIZES,
    SUPERLATIVES,
    plural,
)

__all__ = [
    "BACKGROUNDS",
    "Built",
    "CAPTION_ANSWERS",
    "CAPTION_QA_ANSWERS",
    "CAPTION_QUERIES",
    "CHAIN_STYLES",
    "CLUTTER",
    "COLOURS",
    "COUNT_QUERIES",
    "Desc",
    "FIND_ALL_QUERIES",
    "GRID_FILL",
    "KINDS",
    "NAME",
    "Obj",
    "PLURALS",
    "QA_QUERIES",
    "QA_TYPES",
    "Query",
    "REFEXP_BUILDERS",
    "REFEXP_QUERIES",
    "REFEXP_TYPES",
    "REL_WORDS",
    "SHAPES",
    "SHORT_ANSWER",
    "SIZES",
    "SUPERLATIVES",
    "Scene",
    "SynthConfig",
    "add_arguments",
    "build_query",
    "check_args",
    "check_built",
    "config_from_args",
    "estimate_total",
    "generate",
    "image_folder",
    "iter_samples",
    "make_record",
    "make_scene",
    "parse_image_size",
    "parse_weights",
    "plural",
    "record_id",
    "ref_text",
    "render_scene",
    "resolve",
    "save_image",
    "shape_mask",
    "split_counts",
    "unique_desc",
    "vocabulary_text",
]
