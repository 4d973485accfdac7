"""Can a tiny Llama bind attributes to objects? A symbolic probe of the base's hardest understanding skill.

"What colour is the square?" over a scene of 2-4 objects needs two hops at the answer position: gather the noun
from the question, then attend to the image token that holds that shape and read its colour. This probe gives
the language model ideal image tokens (each of 16 patches is a frozen random embedding of its object's shape
plus colour plus position, through a trainable ``mlp2x_gelu``-shaped projector, as LLaVA's tokens come from a
frozen tower) and trains only the answer, so what it measures is the language model's own ability to learn the
two hops: held-out accuracy every 100 steps (a model that picks one of the scene's colours gets about half).

    python scripts/probe_binding.py --heads 4           # the first base's shape: 0.58 after 1500 steps
    python scripts/probe_binding.py --heads 32          # Llama-2-7B's head count: 0.95 after 1500 steps
    python scripts/probe_binding.py --answer echo       # the answer restates the noun first: one hop

``--tower DIR`` swaps the ideal tokens for a frozen CLIP tower's patch features (the layer LLaVA reads) of rendered
scenes of the demo's world, so that a tower's effect on binding is measured apart from the language model's;
``--world`` asks about the same scenes with ideal tokens (the ceiling a tower could give):

    python scripts/probe_binding.py --heads 32 --tower playground/models/tiny-llava-v1.5/clip-vision-tower
    python scripts/probe_binding.py --heads 32 --world
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

    from scout_data.sources.synthetic.config import SynthConfig

SHAPES, COLOURS, PATCHES, GRID = 4, 5, 16, 4
WORDS = ("<s>", "USER:", "ASSISTANT:", "What", "colour", "is", "the", "of", "?", "Answer", "using", "a", "single",
         "word", "</s>", *(f"shape{i}" for i in range(SHAPES)), *(f"colour{i}" for i in range(COLOURS)))
TOKEN = {w: i for i, w in enumerate(WORDS)}
QUESTIONS = (("What", "colour", "is", "the", "{shape}", "?"),
             ("What", "is", "the", "colour", "of", "the", "{shape}", "?"))
SUFFIX = ("Answer", "using", "a", "single", "word", "ASSISTANT:")


@dataclass
class Batch:
    shapes: torch.Tensor  # (B, PATCHES), 0 = background
    colours: torch.Tensor
    text: torch.Tensor  # (B, T) question, suffix and answer
    mask: torch.Tensor  # (B, 2 + PATCHES + T)
    labels: torch.Tensor  # (B, 2 + PATCHES + T), answer tokens only
    answer_at: torch.Tensor  # (B,) index into labels of the colour token
    scene: torch.Tensor  # (B,) index of the rendered scene (``WorldScenes``); -1 for ideal tokens


Scene = tuple[list[tuple[int, int]], list[int], int]  # (shape, colour) per object, its patch, row of the features
Draw = Callable[[random.Random], Scene]


def world_config() -> SynthConfig:
    """The demo's world (``playground.miniature.recipe.WORLD``) with 2-4 objects a scene."""
    from playground.miniature.recipe import WORLD, SceneSpec
    from scout_data.sources.synthetic.config import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--seed")  # scout_data's CLI reads it; the probe seeds each scene itself
    spec = SceneSpec(num=1, kinds="qa:1", image_size=64, min_objects=2, max_objects=4, test_fraction=0, **WORLD)
    return config_from_args(parser.parse_args(spec.synth_args(seed=0)))


def render(cfg: SynthConfig, seed: str, i: int, row: int) -> tuple[Scene, Image.Image]:
    """Scene ``i`` of ``seed`` as the probe reads it (its features at ``row`` of the bank), and its image."""
    from scout_data.sources.synthetic.scenes import make_scene, render_scene

    rng = random.Random(f"probe-binding:{seed}:{i}")
    scene = make_scene(rng, cfg)
    image = render_scene(scene, rng, cfg)
    cell = cfg.width // GRID
    objs = [(cfg.shapes.index(o.shape), cfg.colours.index(o.colour)) for o in scene.objects]
    cells = [int(o.cy // cell) * GRID + int(o.cx // cell) for o in scene.objects]
    return (objs, cells, row), image


def unique_shaped(objs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The objects no other object of the scene shares a shape with (those a question can name by shape)."""
    return [o for o in objs if sum(s == o[0] for s, _ in objs) == 1]


class WorldScenes:
    """Scenes of the demo's world (2-4 objects in a 4 x 4 grid of 64 px), rendered once, and a frozen tower's patch
    features of each at ``select_layer`` (LLaVA's ``mm_vision_select_layer``; no ``tower``: none, the probe's ideal
    tokens of the same scenes): ``train`` scenes, then held-out scenes until ``held_out`` of them have an object
    whose shape is unique (one question each)."""

    def __init__(self, tower: str | Path | None, train: int, held_out: int, seed: int, select_layer: int = -2) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        from playground.miniature.vision_pretrain import patch_features, preprocess

        cfg = world_config()
        if (cfg.grid, len(cfg.shapes), len(cfg.colours)) != (GRID, SHAPES, COLOURS):
            raise ValueError(f"the probe's vocabulary is a {GRID}x{GRID} grid of {SHAPES} shapes and {COLOURS} "
                             f"colours; the world has {cfg.grid}, {len(cfg.shapes)} and {len(cfg.colours)}")
        rendered = [render(cfg, f"train:{seed}", i, i) for i in range(train)]
        self.train: list[Scene] = [scene for scene, _ in rendered]
        self.held_out: list[Scene] = []
        i = 0
        while len(self.held_out) < held_out:
            scene, image = render(cfg, f"held-out:{seed}", i, len(rendered))
            i += 1
            if unique_shaped(scene[0]):
                rendered.append((scene, image))
                self.held_out.append(scene)
        self.features: torch.Tensor | None = None
        if tower is None:
            return
        model = CLIPVisionModel.from_pretrained(str(tower)).eval()
        processor = CLIPImageProcessor.from_pretrained(str(tower))
        images = [image for _, image in rendered]
        with torch.no_grad():
            self.features = torch.cat([patch_features(model, preprocess(processor, images[i:i + 256]), select_layer)
                                       for i in range(0, len(images), 256)])
        if self.features.shape[1] != PATCHES:
            raise ValueError(f"{tower}: {self.features.shape[1]} patches an image, the probe's grid has {PATCHES}")

    def draw(self, rng: random.Random) -> Scene:
        return self.train[rng.randrange(len(self.train))]

    def held_out_in_order(self) -> Draw:
        scenes = iter(self.held_out)
        return lambda rng: next(scenes)


def sample_batch(rng: random.Random, size: int, answer: str, draw: Draw | None = None) -> Batch:
    """``size`` scenes of 2-4 objects in distinct patches, each asking the colour of an object whose shape is unique.
    Without ``draw``, ideal scenes: each object's shape and colour drawn independently."""
    rows = []
    while len(rows) < size:
        if draw is None:
            n, row = rng.randint(2, 4), -1
            objs, cells = [(rng.randrange(SHAPES), rng.randrange(COLOURS)) for _ in range(n)], None
        else:
            objs, cells, row = draw(rng)
        unique = unique_shaped(objs)
        if not unique:
            continue
        shape, colour = rng.choice(unique)
        if cells is None:
            cells = rng.sample(range(PATCHES), len(objs))
        question = [w.format(shape=f"shape{shape}") for w in rng.choice(QUESTIONS)]
        reply = ([f"shape{shape}"] if answer == "echo" else []) + [f"colour{colour}"]
        rows.append((objs, cells, [TOKEN[w] for w in (*question, *SUFFIX, *reply)], len(reply), row))
    width = max(len(r[2]) for r in rows)
    prefix = 2 + PATCHES
    b = Batch(torch.zeros(size, PATCHES, dtype=torch.long), torch.zeros(size, PATCHES, dtype=torch.long),
              torch.full((size, width), TOKEN["</s>"]), torch.zeros(size, prefix + width, dtype=torch.long),
              torch.full((size, prefix + width), -100), torch.zeros(size, dtype=torch.long),
              torch.tensor([r[4] for r in rows]))
    for i, (objs, cells, text, n_reply, _) in enumerate(rows):
        for (shape, colour), cell in zip(objs, cells, strict=True):
            b.shapes[i, cell], b.colours[i, cell] = shape + 1, colour + 1
        end = prefix + len(text)
        b.text[i, :len(text)] = torch.tensor(text)
        b.mask[i, :end] = 1
        b.labels[i, end - n_reply:end] = b.text[i, len(text) - n_reply:len(text)]
        b.answer_at[i] = end - 1
    return b


class Probe(nn.Module):
    """A ``LlamaForCausalLM`` reading ``<s> USER:``, 16 projected patch tokens, then the text."""

    def __init__(self, hidden: int, layers: int, heads: int, seed: int, features: torch.Tensor | None = None) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__()
        torch.manual_seed(seed)
        self.lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=3 * hidden,
                                               num_hidden_layers=layers, num_attention_heads=heads,
                                               max_position_embeddings=128))
        tower = 64 if features is None else features.shape[-1]
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("shape_emb", torch.randn(SHAPES + 1, tower))
        self.register_buffer("colour_emb", torch.randn(COLOURS + 1, tower))
        self.register_buffer("pos_emb", torch.randn(PATCHES, tower) * 0.5)
        self.projector = nn.Sequential(nn.Linear(tower, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, b: Batch) -> torch.Tensor:
        embed = self.lm.get_input_embeddings()
        if self.features is None:
            image = self.projector(self.shape_emb[b.shapes] + self.colour_emb[b.colours] + self.pos_emb)
        else:
            if int(b.scene.min()) < 0:
                raise ValueError("a batch of ideal scenes given to a probe that reads a tower's features")
            image = self.projector(self.features[b.scene])
        start = embed(torch.tensor([TOKEN["<s>"], TOKEN["USER:"]])).expand(len(b.text), -1, -1)
        return self.lm(inputs_embeds=torch.cat([start, image, embed(b.text)], 1), attention_mask=b.mask,
                       labels=b.labels)


@torch.no_grad()
def accuracy(model: Probe, b: Batch) -> float:
    """Share of held-out questions whose colour token is the model's argmax (earlier answer tokens teacher-forced)."""
    logits = model(b).logits
    rows = torch.arange(len(b.text))
    predicted = logits[rows, b.answer_at - 1].argmax(-1)
    return float((predicted == b.labels[rows, b.answer_at]).float().mean())


def run(heads: int, layers: int = 4, hidden: int = 128, steps: int = 1500, batch: int = 32, lr: float = 2e-3,
        answer: str = "word", seed: int = 0, eval_every: int = 100, held_out: int = 256,
        log: bool = True, tower: str | Path | None = None, world: bool = False,
        scenes: int = 8000) -> list[tuple[int, float, float]]:
    """Train the probe; return ``(step, training loss, held-out accuracy)`` every ``eval_every`` steps.
    With ``world`` or a ``tower``, the questions are about ``scenes`` rendered training scenes of the demo's world
    (the ``held_out`` questions about as many others, one each), and with a ``tower`` the image tokens are its
    features of them."""
    train_draw, held_draw, features = None, None, None
    if world or tower is not None:
        rendered = WorldScenes(tower, scenes, held_out, seed)
        train_draw, held_draw, features = rendered.draw, rendered.held_out_in_order(), rendered.features
    model = Probe(hidden, layers, heads, seed, features)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, held = random.Random(seed), sample_batch(random.Random(f"held-out:{seed}"), held_out, answer, held_draw)
    history, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(sample_batch(rng, batch, answer, train_draw)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % eval_every == 0 or step == steps:
            history.append((step, loss.item(), accuracy(model, held)))
            if log:
                print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {history[-1][2]:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return history


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--answer", choices=("word", "echo"), default="word",
                   help="word: the colour alone (LLaVA's short answer); echo: the noun, then the colour")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tower", help="a saved CLIPVisionModel folder whose features replace the ideal tokens")
    p.add_argument("--world", action="store_true",
                   help="ideal tokens of the rendered world's scenes: the --tower task without a tower")
    p.add_argument("--scenes", type=int, default=8000, help="rendered training scenes (with --tower or --world)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    history = run(args.heads, args.layers, args.hidden, args.steps, args.batch, args.lr, args.answer, args.seed,
                  tower=args.tower, world=args.world, scenes=args.scenes)
    first = next((step for step, _, acc in history if acc >= 0.9), None)
    tokens = f"tower {args.tower}" if args.tower else "ideal tokens" + (" of the world's scenes" if args.world else "")
    print(f"heads {args.heads}, layers {args.layers}, hidden {args.hidden}, answer {args.answer}, seed {args.seed}, "
          f"{tokens}: held-out accuracy {history[-1][2]:.3f} after {args.steps} steps; "
          + (f"first >= 0.9 at step {first}" if first else "never >= 0.9"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
