"""The tokenizer corpus: every phrase the generator can produce."""

from __future__ import annotations

from scout_data.chain import answer_line, step_line
from scout_data.schema import Sample
from scout_data.sources.synthetic import queries
from scout_data.sources.synthetic.config import QA_TYPES, SynthConfig
from scout_data.sources.synthetic.records import generate
from scout_data.sources.synthetic.world import COLOURS, REL_WORDS, SHAPES, SIZES, SUPERLATIVES, plural
from scout_data.writer import PHRASES, REGION_PROMPT, STEP_BY_STEP

# The kinds whose generated records the corpus holds. A kind added here changes every tokenizer `make base` builds
# (and so the released base's); ``region_caption`` is left out: its prompt's and answers' words are all here already.
CORPUS_KINDS = ("refexp", "find_all", "count", "grounded_caption", "region", "qa")


def vocabulary_text(seed: int = 0, n: int = 200) -> list[str]:
    """Strings covering every phrase the generator can produce: each template filled in, every word,
    and the prompts and answers of ``n`` generated records (kinds in turn), rendered as training text."""
    from scout_data.writer import render_record

    words = {
        "target": "the red circle",
        "targets": "red circles",
        "items": "red circle <box>",
        "box": "<box>",
        "boxes": "<box>, <box>",
        "anchor": "blue star",
        "attribute": "red",
        "relation": "left of",
        "superlative": "largest",
        "count": 3,
        "ref": "the red circle",
        "plural": "red circles",
        "one": "red circle",
        "rel": "left of",
        "ref2": "the blue star",
        "n": 3,
    }
    texts = [STEP_BY_STEP, queries.SHORT_ANSWER, REGION_PROMPT.format(query="the red circle")]
    templates = [t for group in PHRASES.values() for t in group]
    templates += [t for group in queries.TEMPLATES for t in group]
    templates += [t for g in queries.QA_QUERIES.values() for t in g]
    texts += [t.format(**words) for t in templates]
    texts += [
        " ".join(
            [
                *COLOURS,
                *SHAPES,
                *(plural(s) for s in SHAPES),
                *SIZES,
                *SUPERLATIVES,
                *REL_WORDS.values(),
                "object",
                "objects",
                "Yes",
                "No",
            ]
        )
    ]
    texts += [step_line(i, "") for i in range(1, 8)] + [
        answer_line(""),
        "[0.00, 0.25, 0.50, 1.00]",
        "0 1 2 3 4 5 6 7 8 9",
    ]
    # the worded grammar's records, as every tokenizer so far was built from (the released base's among them); their
    # words cover the other grammars' (the decide chains' words are the world's, the relations' and ":")
    cfg = SynthConfig(qa_types={t: 1.0 for t in QA_TYPES}, chain_style="full")
    for k, kind in enumerate(CORPUS_KINDS):
        cfg.kinds = {kind: 1.0}
        for i in range(n // len(CORPUS_KINDS) + (k < n % len(CORPUS_KINDS))):
            got, _ = generate(seed, f"vocab-{kind}", i, cfg)
            if isinstance(got, Sample):
                texts += [turn["value"] for turn in render_record(got)["conversations"]]
    return texts
