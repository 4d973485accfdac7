"""Every knob of ``make demo`` in one place: the tiny model, the data, each training run, evaluation, checks.

Profiles: ``full`` (what ``make demo`` runs on CPU, from the base ``make base`` released), ``gpu`` (what it runs
where CUDA is present: a larger model, bf16, more steps, its own base) and ``ci`` (the same pipeline at a budget
of minutes, training its own base, what the tests run). Each stage hashes only the part of the
recipe it reads (``playground.miniature.stages``), so a changed setting redoes that stage and everything
downstream of it, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from llava_twist.tiny import TinyLlavaSpec
from playground.miniature.vision_pretrain import VisionPretrainSpec


@dataclass(frozen=True)
class SceneSpec:
    """One ``scout_data synth`` run (see ``python -m scout_data synth --help``)."""

    num: int
    kinds: str
    image_size: int
    min_objects: int
    max_objects: int
    test_fraction: float
    refexp_types: str = "attribute:1,relation:1,superlative:1"
    qa_types: str = "colour:1,shape:1,count:1,exists:1,relation:1,caption:1"
    shapes: str = ""  # empty: scout_data's default world
    colours: str = ""
    sizes: str = ""
    clutter: str = ""
    grid: int = 0  # > 0: objects in the cells of a grid x grid layout
    chain_style: str = "full"
    seed_offset: int = 0

    def synth_args(self, seed: int) -> list[str]:
        """The ``scout_data synth`` flags of this run (``--out`` excluded)."""
        test = self.test_fraction
        return [
            "--num", str(self.num),
            "--image-size", str(self.image_size),
            "--kinds", self.kinds,
            "--refexp-types", self.refexp_types,
            "--qa-types", self.qa_types,
            "--min-objects", str(self.min_objects),
            "--max-objects", str(self.max_objects),
            "--splits", f"train:{1 - test:g},test:{test:g}",
            "--seed", str(seed + self.seed_offset),
            *(arg for flag in ("shapes", "colours", "sizes", "clutter") if getattr(self, flag)
              for arg in (f"--{flag}", getattr(self, flag))),
            *(["--grid", str(self.grid)] if self.grid else []),
            "--chain-style", self.chain_style,
        ]


@dataclass(frozen=True)
class TrainSpec:
    """One training run. ``batch`` is the global batch (TWIST splits it over its processes)."""

    steps: int
    batch: int
    lr: float
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    mm_projector_lr: float | None = None  # LLaVA's ``--mm_projector_lr``; None: the projector trains at ``lr``


@dataclass(frozen=True)
class Warmup:
    """One of the base's first lessons: a short LLaVA training on easy records (one object, one kind of prompt)
    before the full mix, so that the tiny language model learns to read the projector's tokens (and to write a
    box) before it settles on the mix's language prior. Stage and folders: ``warmup-<name>``."""

    name: str
    data: SceneSpec
    train: TrainSpec

    @property
    def stage(self) -> str:
        return f"warmup-{self.name}"


TRAINING_SETS = ("mixed", "rec")  # the grounding records and replay; the one-shot (REC) records and replay


@dataclass(frozen=True)
class TwistVariant:
    """A TWIST run: stage ``twist-<name>``, trained with the common TWIST flags plus ``flags`` on the training
    set ``data`` (``mixed``: SCOUT chains, one-shot referring expressions and find-all, plus understanding replay;
    ``rec``: the one-shot records alone, plus the same replay)."""

    name: str
    flags: tuple[str, ...]
    data: str = "mixed"
    # True: as many steps as give it the one-shot samples the default run sees (its data has a larger one-shot
    # share), so that what the chains add to the one-shot skill is measured at equal one-shot practice
    match_one_shot: bool = False

    @property
    def stage(self) -> str:
        return f"twist-{self.name}"


@dataclass(frozen=True)
class HeldOut:
    """Fresh scenes, each set with its own seed, never trained on: ``dev`` chooses each model's prompt, ``test``
    reports every headline figure, ``understanding`` measures what the models kept."""

    dev: SceneSpec
    test: SceneSpec
    understanding: SceneSpec

    def sets(self) -> dict[str, SceneSpec]:
        return {"dev": self.dev, "test": self.test, "understanding": self.understanding}


@dataclass(frozen=True)
class EvalSpec:
    limit: int  # held-out chains whose teacher-forced loss is measured (``answer_loss``)
    max_new_tokens: int
    batch_size: int = 8
    grid_scenes: int = 4
    grid_cell_px: int = 192


@dataclass(frozen=True)
class Checks:
    """What the demo must show (issue 7), checked against the measured numbers in the report."""

    identical_rate: float = 1.0
    router_accuracy: float = 0.99
    gain_over_base: float = 0.20  # Acc@0.5 points over the base, test split, each model's prompt chosen on dev
    max_p_value: float = 0.01  # exact McNemar of that gain; its 95% interval must also lie above 0
    ratio_to_full_ft: float = 1.0
    # step-by-step answers beat the same model's one-shot answers (paired, exact McNemar p < max_p_value) overall and
    # within each of these expression types, where a step (the anchor, the candidates) should help
    steps_pay_types: tuple[str, ...] = ("relation", "superlative")


@dataclass(frozen=True)
class Recipe:
    profile: str
    seed: int
    model: TinyLlavaSpec
    vision: VisionPretrainSpec | None  # dense pretraining of the tiny tower on the base data's world; None: random
    base_data: SceneSpec
    grounding_data: SceneSpec
    heldout: HeldOut
    replay_ratio: float  # understanding replay records per grounding record in the mixed training data
    warmups: tuple[Warmup, ...]  # lessons in order from the tiny model before ``base``; none: ``base`` starts from it
    base: TrainSpec
    full_ft: TrainSpec
    lora: TrainSpec
    run_lora: bool  # the LoRA row (``make demo DEMO_ARGS=--lora`` where the profile leaves it out)
    twist: TrainSpec
    twist_variants: tuple[TwistVariant, ...]
    twist_flags: tuple[str, ...]
    twist_nproc: int
    lora_r: int
    lora_alpha: int
    lora_mm_projector_lr: float
    eval: EvalSpec
    checks: Checks = field(default_factory=Checks)
    model_max_length: int = 1024
    threads: int = 0  # OpenMP threads per process, 0: the machine's cores over the processes of a stage
    base_eval_limit: int = 200  # held-out questions per benchmark in the base's card (``make base``)
    shipped_base: str | None = None  # a released base (repo-relative folder, made by `make base`); None: train it
    # Where the trainings and the evaluation run: "cpu" (fp32; TWIST through scripts/finetune_twist_cpu.sh, gloo)
    # or "cuda" (bf16; TWIST through scripts/finetune_twist.sh, LLaVA-1.5's launcher settings).
    device: str = "cpu"
    train_seed: int = 0  # the grounding runs' seed (data order, LoRA's adapters); the base and data keep ``seed``
    run_full_ft: bool = True  # False (``--twist-only``): TWIST beside the base alone, e.g. a second training seed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def base_recipe(self) -> dict[str, Any]:
        """What the base's weights are made from (``make base``): model, tower, world, lessons and training."""
        return {"seed": self.seed, "model_max_length": self.model_max_length, "model": asdict(self.model),
                "vision": asdict(self.vision) if self.vision else None, "base_data": asdict(self.base_data),
                "warmups": [asdict(w) for w in self.warmups], "base": asdict(self.base)}

    def base_hash(self) -> str:
        """The hash a released base's card must carry for this recipe to use it."""
        return config_hash(self.base_recipe())

    def where(self) -> dict[str, Any]:
        """Where a run runs, part of its stamp; CPU runs keep the stamps they had before the gpu profile existed."""
        return {} if self.device == "cpu" else {"device": self.device}


def config_hash(obj: Any) -> str:
    """A stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


TWIST_VARIANTS = (
    TwistVariant("layer", ("--twist_expert", "layer", "--twist_layers", "every_other")),
    TwistVariant("mlp", ("--twist_expert", "mlp", "--twist_layers", "every_other")),
    TwistVariant("layer-all", ("--twist_expert", "layer", "--twist_layers", "all", "--twist_mix", "fixed",
                               "--twist_mix_init", "0", "--twist_head", "True")),
)
# The default architecture on the one-shot records alone: what SCOUT's chains add on top of them.
TWIST_VARIANTS += (replace(TWIST_VARIANTS[-1], name="rec", data="rec", match_one_shot=True),)
VARIANTS = {v.name: v for v in TWIST_VARIANTS}  # ``make demo DEMO_ARGS="--variant mlp"`` adds one to a run
TWIST_FLAGS = ("--twist_router_lr", "5e-2", "--twist_router_balance", "True")
SHIPPED_BASE = "playground/models/tiny-llava-v1.5"

# The miniature's world: 4 shapes, 5 colours, 2 sizes, each object centred in a cell of a 4 x 4 grid of a 64 px
# image, so that one 16 px patch (one image token) holds one object and a box coordinate takes a few values.
WORLD = {"shapes": "circle,square,triangle,cross", "colours": "red,green,blue,yellow,black", "sizes": "medium,large",
         "clutter": "none", "grid": 4}
ONE_OBJECT = {"image_size": 64, "min_objects": 1, "max_objects": 1, "test_fraction": 0, **WORLD}

# One-object colour and shape questions, the projector at 5x the rate, long enough for the loss's late fall
# (docs/demo-notes.md, "Why the recipe is what it is").
LOOK_LESSON = Warmup("look", SceneSpec(num=3000, kinds="qa:1", qa_types="colour:1,shape:1", seed_offset=2,
                                       **ONE_OBJECT), TrainSpec(steps=1500, batch=32, lr=2e-3, mm_projector_lr=1e-2))
BOX_LESSON = Warmup("boxes", SceneSpec(num=3000, kinds="region:1", refexp_types="attribute:1", seed_offset=3,
                                       **ONE_OBJECT), TrainSpec(steps=400, batch=32, lr=2e-3))


BASE_QA_TYPES = "colour:1,shape:1,count:1,exists:1,relation:1,caption:0.5"
# The grounding runs' records, as the paper's grounding expert learns RefCOCO and SCOUT: one-shot referring
# expressions in LLaVA-1.5's REC form (``region``), SCOUT's terse step-by-step chains (``refexp``) and find-all
# chains, of all three expression types; relations are weighted up as a relation fails to fit more scenes.
# The chains are SCOUT's ``decide`` grammar: the candidates in the expression's words, a relation's reference
# object, then the pick with its box, which the answer copies (docs/demo-notes.md, "Steps that pay").
EXPRESSION_TYPES = "attribute:1,relation:4,superlative:1"
GROUNDING_WORLD = SceneSpec(num=10000, kinds="region:0.65,refexp:0.3,find_all:0.05", image_size=64, min_objects=2,
                            max_objects=4, test_fraction=0, refexp_types=EXPRESSION_TYPES, seed_offset=1,
                            chain_style="decide", **WORLD)
# Held-out referring expressions (a quarter or more of each type: 28% attribute, 35% relation, 37% superlative).
HELDOUT_REFEXP = replace(GROUNDING_WORLD, num=0, kinds="refexp:1", test_fraction=1)


def full_recipe() -> Recipe:
    """``make demo``: TWIST, full fine-tuning and LoRA taught SCOUT's terse chains from the released base.

    The base (``make base``, released in ``playground/models/tiny-llava-v1.5`` with its card) is this recipe's
    base part: the tiny tower pretrained on the world (LLaVA never trains its CLIP, and a random one leaves the
    base blind), a lesson on one-object colour and shape questions and one on one-object boxes (the tiny language model
    learns to read the projector's tokens and to write a box before the mix's language prior settles), then
    LLaVA's trainer on LLaVA-1.5's kind of mix: understanding questions and 40% one-shot box prompts. One token
    per box coordinate (``coordinate_tokens``) and a vocabulary in which every word of the world is one token
    keep records short. ``docs/demo-notes.md`` has what was measured on the way."""
    return Recipe(
        profile="full",
        seed=0,
        # 32 attention heads (of width 4), as Llama-2-7B has 32, so that a question can bind an attribute to the
        # object it names (scripts/probe_binding.py). A per-patch tower: one CLIP layer, read before it (LLaVA's
        # select layer -2), so that no image token carries another object (docs/demo-notes.md, "Why the recipe
        # is what it is").
        model=TinyLlavaSpec(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=32,
                            vocab_size=1536, vision_hidden_size=64, vision_layers=1, vision_heads=2, image_size=64,
                            patch_size=16, coordinate_tokens=True),
        vision=VisionPretrainSpec(scenes=6000, steps=1500, batch=64, lr=3e-3),
        base_data=SceneSpec(num=40000, kinds="qa:0.6,region:0.4", image_size=64, min_objects=1, max_objects=4,
                            test_fraction=0.01, refexp_types="attribute:1",
                            qa_types=BASE_QA_TYPES, **WORLD),
        grounding_data=GROUNDING_WORLD,
        heldout=HeldOut(dev=replace(HELDOUT_REFEXP, num=400, seed_offset=12),
                        test=replace(HELDOUT_REFEXP, num=1200, seed_offset=11),
                        understanding=SceneSpec(num=600, kinds="qa:1", image_size=64, min_objects=1, max_objects=4,
                                                test_fraction=1, qa_types=BASE_QA_TYPES, seed_offset=13, **WORLD)),
        replay_ratio=0.25,
        warmups=(LOOK_LESSON, BOX_LESSON),
        base=TrainSpec(steps=6000, batch=32, lr=1e-3),
        full_ft=TrainSpec(steps=1000, batch=32, lr=1e-3),
        lora=TrainSpec(steps=1000, batch=32, lr=2e-3),
        run_lora=False,  # the claim needs the base, TWIST and full FT; LoRA's 20 minutes are opt-in here
        twist=TrainSpec(steps=1000, batch=32, lr=2e-3),
        # Twins of every layer, on the expert alone (a fixed mix of 0: the grounding route never reads the
        # frozen expert, so each expert trains on its own samples only), and of the output layer, whose frozen
        # rows would cap the chains' words (docs/demo-notes.md, "Why the recipe is what it is").
        twist_variants=(VARIANTS["layer-all"],),
        twist_flags=TWIST_FLAGS,
        twist_nproc=2,
        lora_r=16,
        lora_alpha=32,
        lora_mm_projector_lr=1e-4,
        # Every held-out question is answered; the chain loss is measured on the first 160 test chains.
        eval=EvalSpec(limit=160, max_new_tokens=128, batch_size=16),
        shipped_base=SHIPPED_BASE,
    )


def ci_recipe() -> Recipe:
    """The same pipeline in minutes (tests): a hidden-32 model and 4-20 steps per run, with the vision tower's
    dense pretraining and both warm-up lessons switched on so that their paths run in CI. TWIST gets 20 steps, enough
    for its router to separate the tasks (docs/demo-notes.md, "Why the recipe is what it is")."""
    return Recipe(
        profile="ci",
        seed=0,
        model=TinyLlavaSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=640, vision_hidden_size=32, vision_layers=2, vision_heads=2, image_size=32,
                            patch_size=8, coordinate_tokens=True),
        vision=VisionPretrainSpec(scenes=64, steps=8, batch=16, eval_scenes=16),
        base_data=SceneSpec(num=200, kinds="qa:0.8,region:0.2", image_size=32, min_objects=2, max_objects=4,
                            test_fraction=0.1, refexp_types="attribute:1", grid=4),
        grounding_data=(ci_world := SceneSpec(num=100, kinds="region:0.5,refexp:0.4,find_all:0.1", image_size=32,
                                              min_objects=2, max_objects=4, test_fraction=0,
                                              refexp_types=EXPRESSION_TYPES, seed_offset=1, chain_style="terse",
                                              grid=4)),
        heldout=HeldOut(dev=replace(ci_world, num=8, kinds="refexp:1", test_fraction=1, seed_offset=12),
                        test=replace(ci_world, num=16, kinds="refexp:1", test_fraction=1, seed_offset=11),
                        understanding=SceneSpec(num=12, kinds="qa:1", image_size=32, min_objects=2, max_objects=4,
                                                test_fraction=1, seed_offset=13, grid=4)),
        replay_ratio=0.25,
        warmups=(
            Warmup("look", SceneSpec(num=40, kinds="qa:1", image_size=32, min_objects=1, max_objects=1,
                                     test_fraction=0, qa_types="colour:1,shape:1", seed_offset=2, grid=4),
                   TrainSpec(steps=4, batch=8, lr=2e-3, mm_projector_lr=1e-2)),
            Warmup("boxes", SceneSpec(num=40, kinds="region:1", image_size=32, min_objects=1, max_objects=1,
                                      test_fraction=0, refexp_types="attribute:1", seed_offset=3, grid=4),
                   TrainSpec(steps=4, batch=8, lr=2e-3)),
        ),
        base=TrainSpec(steps=20, batch=8, lr=2e-3),
        full_ft=TrainSpec(steps=10, batch=4, lr=1e-3),
        lora=TrainSpec(steps=10, batch=4, lr=1e-3),
        run_lora=True,
        twist=TrainSpec(steps=20, batch=4, lr=1e-3, warmup_ratio=0.0, scheduler="constant"),
        twist_variants=(VARIANTS["layer-all"], VARIANTS["rec"]),
        twist_flags=("--twist_router_lr", "1e-1"),
        twist_nproc=2,
        lora_r=4,
        lora_alpha=8,
        lora_mm_projector_lr=1e-4,
        eval=EvalSpec(limit=10, max_new_tokens=48, grid_scenes=3, grid_cell_px=128),
        model_max_length=512,
        threads=1,
        base_eval_limit=10,
    )


def gpu_recipe() -> Recipe:
    """``make demo`` where CUDA is present: the full recipe's world, data and checks on a language model twice as
    wide and deep (hidden 256, 8 layers, 32 heads of width 8), in bf16, with more steps for every run. The
    released base is the CPU recipe's, so this profile trains its own (tower, lessons, base) first. The steps are
    sized for about 10 minutes on one H100 (not yet measured: no GPU was lent while it was written)."""
    full = full_recipe()
    return replace(
        full,
        profile="gpu",
        device="cuda",
        model=replace(full.model, hidden_size=256, intermediate_size=768, num_hidden_layers=8),
        grounding_data=replace(full.grounding_data, num=16000),
        base=TrainSpec(steps=8000, batch=32, lr=1e-3),
        full_ft=TrainSpec(steps=1500, batch=32, lr=1e-3),
        lora=TrainSpec(steps=1500, batch=32, lr=2e-3),
        run_lora=True,
        twist=TrainSpec(steps=1500, batch=32, lr=2e-3),
        twist_nproc=1,
        shipped_base=None,
    )


PROFILES = {"full": full_recipe, "gpu": gpu_recipe, "ci": ci_recipe}


def get_recipe(profile: str) -> Recipe:
    """The recipe of a profile (``full``, ``gpu`` or ``ci``)."""
    if profile not in PROFILES:
        raise KeyError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    return PROFILES[profile]()


def default_profile() -> str:
    """What ``make demo`` runs: ``gpu`` where torch sees a CUDA device, else ``full``."""
    return "gpu" if torch.cuda.is_available() else "full"
