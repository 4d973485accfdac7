"""The smallest honest end-to-end run: build a tiny LLaVA-1.5, convert it to TWIST, ask a grounding
question about a SCOUT scene and print the route, the router's probability and the output.

    python -m llava_twist.smoke [--out playground/data/smoke]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from PIL import Image

from llava_twist.model.builder import load_pretrained_model
from llava_twist.tiny import build_tiny_llava
from scout_data.parse import parse_chain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="playground/data/smoke")
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(0)

    print("[1/4] a tiny LLaVA-1.5 checkpoint (tiny CLIP, tiny Llama, SentencePiece tokenizer), built locally")
    model_dir = out / "llava-v1.5-tiny"
    if not (model_dir / "config.json").exists():
        build_tiny_llava(model_dir)
    print("[2/4] a SCOUT synthetic scene")
    scenes = out / "scenes"
    if not (scenes / "test.json").exists():
        subprocess.run([sys.executable, "-m", "scout_data", "synth", "--out", str(scenes), "--num", "20",
                        "--seed", "0", "--kinds", "refexp:1.0"], check=True)
    record = json.loads((scenes / "test.json").read_text())[0]
    query = record["conversations"][0]["value"]
    print("[3/4] LLaVA checkpoint -> TWIST (grounding experts copied from the frozen ones)")
    tokenizer, model, processor, _ = load_pretrained_model(str(model_dir), None, "llava-v1.5-tiny", device="cpu")
    image = Image.open(scenes / "images" / record["image"]).convert("RGB")
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    pixels = process_images([image], processor, model.config)
    print("[4/4] generate on each route")
    for route in ("auto", "frozen", "grounding"):
        ids = model.generate(input_ids, images=pixels, image_sizes=[image.size], twist_route=route,
                             max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        text = tokenizer.decode(ids[0], skip_special_tokens=True).strip()
        decision = model.twist_last_route
        chain = parse_chain(text)
        print(f"  route={route:<9} took={decision.routes()[0]:<9} router_p={float(decision.prob[0]):.3f} "
              f"boxes={len(chain.all_boxes_xyxy_norm())} output={text[:80]!r}")
    print(f"query: {query!r}; expected answer: {record['conversations'][1]['value'].splitlines()[-1]}")
    print("(an untrained tiny model answers noise; `make demo` will train it once the training stages land)")


if __name__ == "__main__":
    main()
