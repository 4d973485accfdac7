"""The prompt the eval tools, the CLI and the playground build is the one LLaVA-1.5 trains on (``--version v1``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from llava.constants import IGNORE_INDEX

from llava_twist.eval.answer_loss import llava_records
from llava_twist.serve.inference import DEFAULT_CONV_MODE, load_image, load_model, prepare_inputs

sys.path.insert(0, str(Path(__file__).parent))
from twist_train_data import write_dataset  # noqa: E402


@pytest.mark.parametrize("model_class", ["llava", "twist"])
def test_inference_prompt_is_the_training_prompt_up_to_the_answer(tiny_llava: Path, tmp_path: Path,
                                                                   model_class: str) -> None:
    data, images = write_dataset(tmp_path, n_grounding=2, n_understanding=2)
    loaded = load_model(str(tiny_llava), None, device="cpu", model_class=model_class)
    dataset, picked = llava_records(str(data), str(images), loaded.tokenizer, loaded.image_processor, num=4)
    records = json.loads(data.read_text())
    assert len(picked) == 4
    for i in picked:
        item = dataset[i]
        first_answer = int((item["labels"] != IGNORE_INDEX).nonzero()[0])
        question = records[i]["conversations"][0]["value"]
        built = prepare_inputs(loaded, [question], [load_image(str(images / records[i]["image"]))])
        assert built["input_ids"][0].tolist() == item["input_ids"][:first_answer].tolist(), (DEFAULT_CONV_MODE, i)
        assert torch.equal(built["images"][0], item["image"].to(built["images"].dtype))
