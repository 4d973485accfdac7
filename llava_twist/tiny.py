"""Write a tiny LLaVA-1.5 checkpoint folder, in the on-disk layout of ``liuhaotian/llava-v1.5-7b``.

Everything is built locally (no hub): a tiny CLIP vision tower and its image processor saved in a
sub-folder whose absolute path goes into ``mm_vision_tower``, a tiny Llama with an ``mlp2x_gelu``
projector and the v1.5 config fields, and a SentencePiece Llama tokenizer trained on the fly on text
that covers our prompts (digits split, byte fallback, as Llama's; optionally one token per box coordinate).

    python -m llava_twist.tiny --out checkpoints/tiny-llava
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llava_twist.spec_cli import add_spec_arguments, spec_from_args
from scout_data.limits import Bounded, OneLineParser
from scout_data.output import OutputError, check_output, output_lock, replace_folder

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_BASE_CORPUS = [
    LLAVA_SYSTEM,
    "USER: <image>\nWhat is in the image? ASSISTANT: A red circle and a blue square.</s>",
    "USER: Where is the red circle left of the blue square? Answer step by step. ASSISTANT:",
    "Step 1: The question asks for the red circle left of the blue square.",
    "Step 2: I see these candidates: red circle [0.10, 0.15, 0.30, 0.35], red circle [0.55, 0.20, 0.80, 0.45].",
    "Step 3: The blue square is at [0.40, 0.40, 0.60, 0.60]; the one left of it is [0.10, 0.15, 0.30, 0.35].",
    "Answer: [0.10, 0.15, 0.30, 0.35]",
    "Please provide the bounding box coordinate of the region this sentence describes: the largest star.",
    "How many triangles are there? There are 3 triangles. Is there a green diamond? Yes. No.",
    "What color is the small square? It is yellow. What shape is the purple object? It is a circle.",
    "red green blue yellow orange purple white black gray pink brown cyan",
    "circle square triangle star diamond hexagon cross heart ring rectangle ellipse pentagon",
    "left right above below top bottom leftmost rightmost topmost bottommost largest smallest nearest",
    "small medium large big tiny object objects shape shapes scene image picture photo",
    "0 1 2 3 4 5 6 7 8 9 10 0.00 0.25 0.50 0.75 1.00 [ ] , . : ? !",
    "Find all the circles. Count the squares and give their boxes. Describe the image with boxes.",
    "a man a woman a dog a cat a person people car tree building street table chair grass sky water",
]


def default_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: LLaVA's template and every SCOUT phrasing."""
    lines = list(_BASE_CORPUS)
    try:
        from scout_data.sources.synthetic.vocabulary import vocabulary_text
    except ImportError:  # pragma: no cover - scout_data ships with this package
        return lines
    return lines + list(vocabulary_text(seed=0, n=2000))


@dataclass
class TinyLlavaSpec:
    """Sizes of the tiny model (the defaults run in well under a second per forward on CPU)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    vocab_size: int = 640
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 56
    patch_size: int = 14
    max_position_embeddings: int = 1024
    seed: int = 0
    coordinate_tokens: bool = False  # one token per two-decimal coordinate 0.00-1.00 (see ``train_tokenizer``)


# Every size a tiny model may take (``--help`` states them); :meth:`TinyLlavaSpec.problem` checks how they combine.
# A "tiny" model stays small: the biggest one these allow is about 1 GB of float32 weights.
LIMITS = {
    "hidden_size": Bounded(int, 8, 1024),
    "intermediate_size": Bounded(int, 8, 4096),
    "num_hidden_layers": Bounded(int, 1, 16),
    "num_attention_heads": Bounded(int, 1, 64),
    "vocab_size": Bounded(int, 512, 32000),  # the tokenizer's corpus needs about 330 pieces, 430 with coordinates
    "vision_hidden_size": Bounded(int, 8, 1024),
    "vision_layers": Bounded(int, 1, 24),
    "vision_heads": Bounded(int, 1, 64),
    "image_size": Bounded(int, 8, 448),
    "patch_size": Bounded(int, 1, 448),
    "max_position_embeddings": Bounded(int, 128, 8192),
    "seed": Bounded(int, 0, 2**32 - 1),
}
PROMPT_ROOM = 64  # positions a question and LLaVA's template take besides the image's tokens


def spec_problem(spec: TinyLlavaSpec) -> str | None:
    """What cannot be built (or loaded) in a spec, naming the flags; None when it can."""
    for name, limit in LIMITS.items():
        value = getattr(spec, name)
        if not (isinstance(value, int) and limit.lo <= value <= limit.hi):
            return f"--{name.replace('_', '-')} {value}: must be an {limit}"
    if spec.hidden_size % spec.num_attention_heads:
        return (f"--hidden-size {spec.hidden_size} must be a multiple of --num-attention-heads "
                f"{spec.num_attention_heads}")
    if spec.vision_hidden_size % spec.vision_heads:
        return (f"--vision-hidden-size {spec.vision_hidden_size} must be a multiple of --vision-heads "
                f"{spec.vision_heads}")
    if spec.patch_size > spec.image_size:
        return f"--patch-size {spec.patch_size} must be at most --image-size {spec.image_size}"
    tokens = (spec.image_size // spec.patch_size) ** 2
    if tokens + PROMPT_ROOM > spec.max_position_embeddings:
        return (f"--max-position-embeddings {spec.max_position_embeddings}: the image alone takes {tokens} positions "
                f"(--image-size {spec.image_size} / --patch-size {spec.patch_size}, squared); at least "
                f"{tokens + PROMPT_ROOM} are needed")
    return None


COORDINATES = [f"{i / 100:.2f}" for i in range(101)]
# LLaVA's ``preprocess_v1`` masks a conversation round by round, tokenizing each round alone; for a non-legacy
# tokenizer it counts every round after the first one token shorter (its fix for Llama-2's tokenizers). This
# vocabulary holds ``USER`` with and without the word prefix, so a round costs the same alone and in place only
# under the legacy rule; non-legacy, LLaVA drops every multi-turn record ("tokenization mismatch ... (ignored)").
# Single-turn records tokenize the same either way.
LEGACY = True


def train_tokenizer(out_dir: Path, corpus: Iterable[str], vocab_size: int, coordinate_tokens: bool = False) -> None:
    """Train a SentencePiece BPE model like Llama's and save it as a slow ``LlamaTokenizer``.

    ``coordinate_tokens`` makes each box coordinate of LLaVA's text format (``0.00`` ... ``1.00``) one token, as
    location tokens do in Pix2Seq and Kosmos-2. The text and every parser stay LLaVA's; a box costs 12 tokens
    instead of 24, so a SCOUT chain is about a third shorter, and CPU training time follows the token count."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        user_defined_symbols=COORDINATES if coordinate_tokens else [],
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "tokenizer.model"
        vocab_file.write_bytes(model.getvalue())
        tokenizer = LlamaTokenizer(
            vocab_file=str(vocab_file), legacy=LEGACY, model_max_length=2048, padding_side="right"
        )
        tokenizer.save_pretrained(str(out_dir))


def build_vision_tower(out_dir: Path, spec: TinyLlavaSpec) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    vision_dir = out_dir / "clip-vision-tower"
    config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )
    torch.manual_seed(spec.seed)
    CLIPVisionModel(config).save_pretrained(str(vision_dir))
    CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        resample=3,
    ).save_pretrained(str(vision_dir))
    return vision_dir.resolve()


def build_tiny_llava(
    out_dir: str | Path, spec: TinyLlavaSpec | None = None, corpus: Iterable[str] | None = None
) -> Path:
    """Write a tiny, randomly initialised LLaVA-1.5 checkpoint folder to ``out_dir`` and return its path."""
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    spec = spec or TinyLlavaSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, corpus if corpus is not None else default_corpus(), spec.vocab_size, spec.coordinate_tokens)
    tokenizer = AutoTokenizer.from_pretrained(str(out), use_fast=False)
    vision_dir = build_vision_tower(out, spec)
    config = LlavaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        pretraining_tp=1,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
        # the LLaVA-1.5 fields, as in liuhaotian/llava-v1.5-7b/config.json
        mm_vision_tower=str(vision_dir),
        mm_hidden_size=spec.vision_hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_projector_lr=None,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        freeze_mm_mlp_adapter=False,
        tune_mm_mlp_adapter=False,
        use_mm_proj=True,
        tokenizer_model_max_length=2048,
        tokenizer_padding_side="right",
    )
    config.architectures = ["LlavaLlamaForCausalLM"]
    torch.manual_seed(spec.seed)
    model = LlavaLlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "tiny_llava_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m llava_twist.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_spec_arguments(parser, TinyLlavaSpec(), LIMITS)
    args = parser.parse_args(argv)
    if problem := spec_problem(spec_from_args(TinyLlavaSpec, args)):
        parser.error(problem)
    try:
        check_output(args.out, overwrite=args.overwrite)
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    spec = spec_from_args(TinyLlavaSpec, args)
    out = Path(args.out)

    def write(tmp: str) -> None:
        build_tiny_llava(tmp, spec)
        config = Path(tmp) / "config.json"  # the tower's absolute path, where the folder ends up
        values = json.loads(config.read_text())
        values["mm_vision_tower"] = str((out / "clip-vision-tower").resolve())
        config.write_text(json.dumps(values, indent=2) + "\n")

    try:
        with output_lock(out):
            replace_folder(out, write)  # --overwrite replaces, never merges
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote a tiny LLaVA-1.5 checkpoint to {out} (vision tower: {out / 'clip-vision-tower'})")


if __name__ == "__main__":
    main()
