"""Where a model's loss sits: teacher-forced loss on the answers of a LLaVA conversation file, per token, split into
box-coordinate tokens (the numbers inside ``[x1, y1, x2, y2]``, also by place in the box) and every other token.

A model can write a grounding chain's words and format perfectly and still know nothing of where things are; the
overall loss hides which. Where a vocabulary has one token per coordinate (the tiny models' ``coordinate_tokens``),
``coordinate_mass`` also says where each coordinate's probability goes: to the target value, to its neighbours
within :data:`NEAR_HUNDREDTHS` (all a coordinate-aware, soft-target loss would reward), to values farther away,
or to tokens that are not coordinates. Records are read with LLaVA's own dataset and collator (``--version v1``), as in
training; TWIST models take ``--route`` (``auto``: the router decides, as in evaluation).

    python -m llava_twist.eval.answer_loss --model-path ./checkpoints/llava-v1.5-7b-twist \\
        --data scout_test.json --image-folder ./playground/data/scout/images --out answer_loss.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from llava.constants import IGNORE_INDEX
from tqdm import tqdm

from llava_twist.eval.common import EvalError, write_result
from llava_twist.model.loss import StepWeights, stepwise_lm_loss
from llava_twist.model.routes import ROUTE_METAVAR, Route, route_flag
from llava_twist.serve.loading import MODEL_CLASSES, load_model
from llava_twist.serve.result import InferenceError
from llava_twist.tiny import COORDINATES

CORNERS = ("x1", "y1", "x2", "y2")
KINDS = ("coordinate", "text", *CORNERS)
NEAR_HUNDREDTHS = 2
MASS_KINDS = ("target", "near", "far", "not_coordinate")


def coordinate_positions(pieces: Sequence[str]) -> list[int | None]:
    """For the pieces of an answer, in order: the index of the box number (0-3: x1, y1, x2, y2) whose digits a
    piece carries, or None for a piece with no digit inside a ``[...]`` box."""
    positions: list[int | None] = []
    in_box, index = False, 0
    for piece in pieces:
        found = None
        for ch in piece:
            if ch == "[":
                in_box, index = True, 0
            elif ch == "]":
                in_box = False
            elif in_box and ch == ",":
                index += 1
            elif in_box and ch.isdigit() and found is None:
                found = index
        positions.append(found)
    return positions


def box_places(labels: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """For each next-token target of a batch (``labels[:, 1:]``), on the CPU: the place in its box (0-3: x1 ... y2)
    of a supervised piece carrying a coordinate's digits, else -1."""
    targets = labels[:, 1:].cpu()
    places = torch.full(targets.shape, -1, dtype=torch.long)
    for b, row in enumerate(targets):
        keep = (row != IGNORE_INDEX).nonzero().squeeze(1)
        found = coordinate_positions(tokenizer.convert_ids_to_tokens(row[keep].tolist()))
        places[b, keep] = torch.tensor([-1 if f is None else f for f in found], dtype=torch.long)
    return places


def split_losses(logits: torch.Tensor, labels: torch.Tensor, places: torch.Tensor) -> dict[str, list[float]]:
    """Per-token cross-entropy of every answer token of a batch (the training loss's, unweighted), by kind: text,
    coordinate, and each coordinate again under its place in the box (``places``, from :func:`box_places`)."""
    _, losses, _ = stepwise_lm_loss(logits, labels, None, StepWeights())
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    supervised = (labels[:, 1:] != IGNORE_INDEX).cpu()
    for place, loss in zip(places[supervised].tolist(), losses.cpu()[supervised].tolist(), strict=True):
        out["text" if place < 0 else "coordinate"].append(loss)
        if 0 <= place < len(CORNERS):
            out[CORNERS[place]].append(loss)
    return out


def coordinate_values(tokenizer: Any) -> dict[int, int]:
    """Token id -> value in hundredths, for a vocabulary with one token per coordinate (``0.00`` ... ``1.00``);
    empty where coordinates are spelt in digits."""
    ids = tokenizer.convert_tokens_to_ids(COORDINATES)
    table = {i: v for v, i in enumerate(ids) if i is not None and i != tokenizer.unk_token_id}
    return table if len(table) == len(COORDINATES) else {}


def coordinate_mass(logits: torch.Tensor, labels: torch.Tensor, values: dict[int, int], places: torch.Tensor,
                    near: int = NEAR_HUNDREDTHS) -> list[tuple[int, float, float, float, float]]:
    """For each supervised coordinate token of a batch, in order: its place in the box (``places``, from
    :func:`box_places`) and the predicted probability (next-token, as the loss) on its target value, on other
    values at most ``near`` hundredths away, on values farther away, and on tokens that are not coordinates."""
    if not values:
        return []
    ids = torch.tensor(list(values), device=logits.device)
    table = torch.tensor(list(values.values()), device=logits.device)
    targets, places = labels[:, 1:].to(logits.device), places.to(logits.device)
    hit = torch.isin(targets, ids) & (places >= 0)  # inside a box, as split_losses counts them
    probs = logits[:, :-1][hit].float().softmax(-1)[:, ids]
    wanted = table[(targets[hit].unsqueeze(1) == ids).int().argmax(1)]
    distance = (table.unsqueeze(0) - wanted.unsqueeze(1)).abs()
    parts = [(probs * m).sum(1).tolist() for m in (distance == 0, (distance > 0) & (distance <= near), distance > near)]
    return [(place, *row, 1.0 - sum(row))
            for place, *row in zip(places[hit].tolist(), *parts, strict=True)]


def summarise(losses: dict[str, list[float]], records: int,
              masses: list[tuple[int, float, float, float, float]] | None = None) -> dict[str, Any]:
    everything = losses["coordinate"] + losses["text"]
    mean = {k: (sum(v) / len(v) if v else None) for k, v in {**losses, "all": everything}.items()}
    out = {"records": records, "tokens": {k: len(v) for k, v in losses.items()}, "loss_per_token": mean}
    if masses:
        groups = {"all": masses, "first_corner": [m for m in masses if m[0] in (0, 1)]}
        out["coordinate_mass"] = {
            "near_hundredths": NEAR_HUNDREDTHS,
            **{name: {"tokens": len(rows), **{k: sum(r[i + 1] for r in rows) / len(rows)
                                              for i, k in enumerate(MASS_KINDS)}}
               for name, rows in groups.items() if rows},
        }
    return out


def llava_records(data: str, image_folder: str, tokenizer: Any, image_processor: Any,
                  num: int) -> tuple[Any, list[int]]:
    """LLaVA's own ``LazySupervisedDataset`` over ``data`` (``--version v1``, padded images, as in training) and the
    indices of its first ``num`` records with an image."""
    from llava import conversation as conversation_lib
    from llava.train.train import DataArguments, LazySupervisedDataset

    conversation_lib.default_conversation = conversation_lib.conv_templates["v1"]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    args = DataArguments(data_path=data, lazy_preprocess=True, is_multimodal=True, image_folder=image_folder,
                         image_aspect_ratio="pad")
    args.image_processor, args.mm_use_im_start_end = image_processor, False
    try:
        dataset = LazySupervisedDataset(data, tokenizer, args)
    except (OSError, ValueError) as exc:
        raise EvalError(f"{data}: cannot read it as LLaVA conversation JSON: {exc}") from exc
    picked = [i for i in range(len(dataset)) if "image" in dataset.list_data_dict[i]][:num]
    if not picked:
        raise EvalError(f"{data}: no record with an image")
    return dataset, picked


def spliced(model: Any, batch: dict[str, Any], is_twist: bool) -> tuple[dict[str, Any], torch.Tensor]:
    """A collated batch with its images spliced in, once, as the model's inputs, and the labels aligned with them:
    TWIST's ``twist_inputs`` (which also marks the router's positions), or LLaVA's own splice for plain LLaVA."""
    args = (batch["input_ids"], None, batch["attention_mask"], None, batch["labels"])
    if is_twist:
        t = model.twist_inputs(*args, None, batch["images"])
        inputs = {"input_ids": t.input_ids, "position_ids": t.position_ids, "attention_mask": t.attention_mask,
                  "inputs_embeds": t.inputs_embeds, "twist_router_mask": t.router_mask}
        return inputs, t.labels
    input_ids, position_ids, attention_mask, _, inputs_embeds, labels = model.prepare_inputs_labels_for_multimodal(
        *args, batch["images"])
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
              "inputs_embeds": inputs_embeds}
    return inputs, labels


def answer_loss(model_path: str, data: str, image_folder: str, model_base: str | None = None,
                model_class: str = "twist", route: Route | str = Route.AUTO, num: int = 64, batch_size: int = 16,
                device: str = "cpu") -> dict[str, Any]:
    """Mean loss per answer token of the first ``num`` records of ``data`` with an image, by token kind."""
    from llava.train.train import DataCollatorForSupervisedDataset

    try:
        route = Route.parse(route, "--route")
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    loaded = load_model(model_path, model_base, device=device, model_class=model_class)
    tokenizer, model = loaded.tokenizer, loaded.model
    dataset, picked = llava_records(data, image_folder, tokenizer, loaded.image_processor, num)
    collate = DataCollatorForSupervisedDataset(tokenizer)
    extra = {"twist_route": route} if loaded.is_twist else {}
    losses: dict[str, list[float]] = {k: [] for k in KINDS}
    coordinates, masses = coordinate_values(tokenizer), []
    for start in tqdm(range(0, len(picked), batch_size), desc="answer loss", unit="batch", file=sys.stderr):
        rows = []
        for i in picked[start:start + batch_size]:
            try:
                rows.append(dataset[i])
            except (OSError, ValueError) as exc:
                raise EvalError(f"{data}: record {i} ({dataset.list_data_dict[i].get('id')}): {exc}") from exc
        batch = {k: v.to(loaded.device) if torch.is_tensor(v) else v for k, v in collate(rows).items()}
        batch["images"] = batch["images"].to(loaded.dtype)
        with torch.no_grad():
            inputs, labels = spliced(model, batch, loaded.is_twist)
            logits = model(**inputs, **extra).logits
        places = box_places(labels, tokenizer)
        for kind, values in split_losses(logits, labels, places).items():
            losses[kind].extend(values)
        masses.extend(coordinate_mass(logits, labels, coordinates, places))
    return summarise(losses, len(picked), masses)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_twist.eval.answer_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None, help="the base of a TWIST delta checkpoint")
    p.add_argument("--model-class", choices=MODEL_CLASSES, default="twist")
    p.add_argument("--route", type=route_flag, default=Route.AUTO, metavar=ROUTE_METAVAR,
                   help="TWIST's route (plain LLaVA: ignored)")
    p.add_argument("--data", required=True, help="LLaVA conversation JSON")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--num", type=int, default=64, help="records read (the first ones with an image)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="result JSON (written atomically)")
    args = p.parse_args(argv)
    try:
        result = answer_loss(args.model_path, args.data, args.image_folder, args.model_base, args.model_class,
                             args.route, args.num, args.batch_size, args.device)
    except (EvalError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_result(args.out, result)
    mean = result["loss_per_token"]
    print(f"{result['records']} records: loss per coordinate token {_fmt(mean['coordinate'])} "
          f"({result['tokens']['coordinate']} tokens), per text token {_fmt(mean['text'])} "
          f"({result['tokens']['text']}) -> {args.out}")
    if "coordinate_mass" in result:
        mass = result["coordinate_mass"]
        for group in ("all", "first_corner"):
            if group in mass:
                print(f"coordinate probability ({group.replace('_', ' ')}): "
                      + ", ".join(f"{k} {mass[group][k]:.3f}" for k in MASS_KINDS)
                      + f" (near: within {mass['near_hundredths']} hundredths)")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
