"""Prefill and decode time of TWIST (frozen, auto, grounding routes) against plain LLaVA, same weights.

One run, variants interleaved round-robin (the machine is noisy), medians and ratios against LLaVA
measured in the same run. Default model: hidden 512, 8 layers, on CPU.

    python scripts/bench_twist_overhead.py [--hidden 512 --layers 8 --repeats 7 --new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

from llava_twist.model.builder import convert_llava_to_twist
from llava_twist.tiny import TinyLlavaSpec, build_tiny_llava


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        spec = TinyLlavaSpec(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                             num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                             max_position_embeddings=4096)
        path = build_tiny_llava(Path(tmp) / "llava-bench", spec)
        base = LlavaLlamaForCausalLM.from_pretrained(str(path), torch_dtype=dtype)
        base.get_vision_tower().load_model()
        models = {"llava": base}
        for name, kwargs in {
            "twist-mlp": {"twist_expert": "mlp", "twist_layers": "every_other"},
            "twist-layer": {"twist_expert": "layer", "twist_layers": "every_other"},
        }.items():
            model = convert_llava_to_twist(path, torch_dtype=dtype, **kwargs)
            model.get_vision_tower().load_model()
            models[name] = model
        for model in models.values():
            model.to(args.device).eval()
            model.get_vision_tower().to(args.device, dtype)

    text = torch.randint(3, base.config.vocab_size, (1, args.prompt_tokens))
    input_ids = torch.cat([text[:, :8], torch.tensor([[IMAGE_TOKEN_INDEX]]), text[:, 8:]], dim=1).to(args.device)
    images = torch.randn(1, 3, spec.image_size, spec.image_size, device=args.device, dtype=dtype)
    variants: dict[str, tuple[torch.nn.Module, dict]] = {"llava": (base, {})}
    for name in ("twist-mlp", "twist-layer"):
        for route in ("frozen", "auto", "grounding"):
            variants[f"{name}/{route}"] = (models[name], {"twist_route": route})

    def prefill(model: torch.nn.Module, extra: dict) -> Callable[[], object]:
        return lambda: model(input_ids=input_ids, images=images, use_cache=True, **extra)

    def decode(model: torch.nn.Module, extra: dict) -> Callable[[], object]:
        return lambda: model.generate(input_ids, images=images, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **extra)

    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for model, extra in variants.values():  # warm-up
            prefill(model, extra)()
            decode(model, extra)()
        for _ in range(args.repeats):
            for name, (model, extra) in variants.items():
                times.setdefault((name, "prefill"), []).append(timed(prefill(model, extra)))
                times.setdefault((name, "generate"), []).append(timed(decode(model, extra)))

    print(f"device={args.device} dtype={args.dtype} hidden={args.hidden} layers={args.layers} "
          f"prompt={input_ids.shape[1] - 1} text + {(spec.image_size // spec.patch_size) ** 2} image tokens "
          f"new_tokens={args.new_tokens} repeats={args.repeats} (twin layers: every other)")
    print(f"{'variant':<24}{'prefill ms':>12}{'x llava':>9}{'generate ms':>14}{'x llava':>9}")
    ref = {k: statistics.median(times[("llava", k)]) for k in ("prefill", "generate")}
    for name in variants:
        pre = statistics.median(times[(name, "prefill")])
        gen = statistics.median(times[(name, "generate")])
        print(f"{name:<24}{pre * 1e3:>12.1f}{pre / ref['prefill']:>9.3f}"
              f"{gen * 1e3:>14.1f}{gen / ref['generate']:>9.3f}")


if __name__ == "__main__":
    main()
