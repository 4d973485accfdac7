"""LLaVA's lazy dataset and collator, plus per-sample task labels (router, route) and per-token step spans."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from llava.train.train import DataCollatorForSupervisedDataset, LazySupervisedDataset
from torch.utils.data import Dataset

from llava_twist.model.routes import GROUNDING, TASK_ROUTE
from llava_twist.train.steps import SPAN_OTHER, step_span_ids
from scout_data.schema import TASKS, record_task


class TwistSupervisedDataset(LazySupervisedDataset):
    """`LazySupervisedDataset` over already validated records (see `records.validated_records`), each item
    with ``twist_route`` (True for ``task == "grounding"``) and ``twist_step_ids`` (span id per token)."""

    def __init__(self, records: list[dict[str, Any]], tokenizer: Any, data_args: Any) -> None:
        # LazySupervisedDataset.__init__ only reads the JSON file and keeps these three attributes;
        # the records were read and checked already, so they are not loaded a second time.
        Dataset.__init__(self)
        self.tokenizer = tokenizer
        self.list_data_dict = records
        self.data_args = data_args

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        item["twist_route"] = TASK_ROUTE[record_task(self.list_data_dict[i])] == GROUNDING
        item["twist_step_ids"] = step_span_ids(item["labels"], self.tokenizer)
        return item

    @property
    def task_counts(self) -> dict[str, int]:
        counts = Counter(record_task(r) for r in self.list_data_dict)
        return {task: counts[task] for task in TASKS}


@dataclass
class TwistDataCollator(DataCollatorForSupervisedDataset):
    """LLaVA's collator, plus ``twist_route`` (B,) bool, ``twist_router_labels`` (B,) float and
    ``twist_step_ids`` (B, T) aligned with ``labels``."""

    def __call__(self, instances: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(instances)
        step_ids = torch.nn.utils.rnn.pad_sequence(
            [inst["twist_step_ids"] for inst in instances], batch_first=True, padding_value=SPAN_OTHER
        )
        batch["twist_step_ids"] = step_ids[:, : batch["labels"].shape[1]]
        route = torch.tensor([bool(inst["twist_route"]) for inst in instances], dtype=torch.bool)
        batch["twist_route"] = route
        batch["twist_router_labels"] = route.float()
        return batch
