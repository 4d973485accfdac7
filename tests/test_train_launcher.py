"""The real DeepSpeed launcher (2 CPU processes, gloo, ZeRO-3, scripts/zero3.json) on a tiny LLaVA-1.5."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from PIL import Image
from safetensors.torch import load_file

from llava_twist.model import is_twist_param
from llava_twist.model.builder import DELTA_WEIGHTS, load_pretrained_model
from llava_twist.train.trainer import FULL_CHECKPOINT_DIR

sys.path.insert(0, str(Path(__file__).parent))
from deepspeed_shm import free_port, shm_buffers  # noqa: E402
from twist_train_data import write_dataset  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_STEPS = 8, 4
EXTRA = ["--twist_save_full", "True", "--twist_router_lr", "1.0", "--twist_step_weights", "answer:2"]


LAUNCHER = ["bash", str(REPO / "scripts" / "finetune_twist_cpu.sh"), *EXTRA]


def launcher_env(model: Path, data: Path, images: Path, out: Path, port: int) -> dict[str, str]:
    return dict(os.environ, MODEL=str(model), DATA=str(data), IMAGES=str(images), OUT=str(out), STEPS=str(STEPS),
                SAVE_STEPS=str(SAVE_STEPS), LR="1e-2", BATCH="2", PYTHONFAULTHANDLER="1", MASTER_PORT=str(port),
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def launch(model: Path, data: Path, images: Path, out: Path) -> list[Path]:
    """Run the launcher; return the DeepSpeed shared-memory buffers it left behind."""
    port = free_port()
    proc = subprocess.run(LAUNCHER, cwd=REPO, env=launcher_env(model, data, images, out, port), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return shm_buffers(port)


@pytest.fixture(scope="module")
def run(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("launcher")
    data, images = write_dataset(root / "data", n_grounding=4, n_understanding=4)
    out = root / "run"
    extensions_before = built_extensions()
    shm_left = launch(tiny_llava, data, images, out)
    return {"base": tiny_llava, "data": data, "images": images, "out": out, "root": root, "shm_left": shm_left,
            "extensions": (extensions_before, built_extensions())}


def built_extensions() -> dict[str, int]:
    """Files of torch's JIT extension folder (where DeepSpeed compiles its CPU ops), with their mtimes; not the
    ``lock`` file, which every load takes (torch's advisory ``filelock``; filelock 3.x, which lmms-eval needs, leaves
    the file behind, touched at each load)."""
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.name != "lock"}


def test_launcher_removes_deepspeeds_shared_memory_buffers(run: dict) -> None:
    assert run["shm_left"] == []


def test_launcher_compiles_nothing(run: dict) -> None:
    """`make install` builds DeepSpeed's CPU communication op; a training run only loads it."""
    before, after = run["extensions"]
    assert any(name.endswith(".so") for name in before), f"no op built at install time in {sorted(before)}"
    assert after == before


def log_history(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def prompt_batch(tokenizer, processor, config, record: dict, images: Path) -> dict:
    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], record["conversations"][0]["value"])
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    image = Image.open(images / record["image"]).convert("RGB")
    return {"input_ids": ids, "images": process_images([image], processor, config)}


def router_probs(model_dir: Path, base: Path | None, data: Path, images: Path) -> tuple[list[float], list[float]]:
    tokenizer, model, processor, _ = load_pretrained_model(str(model_dir), None if base is None else str(base),
                                                           device="cpu")
    grounding, understanding = [], []
    for record in json.loads(data.read_text()):
        with torch.no_grad():
            out = model(**prompt_batch(tokenizer, processor, model.config, record, images), twist_route="auto")
        prob = out.twist_decision.prob.item()
        (grounding if record.get("task") == "grounding" else understanding).append(prob)
    return grounding, understanding


def test_grounding_loss_goes_down_and_each_step_is_logged(run: dict) -> None:
    history = log_history(run["out"])
    assert [e["step"] for e in history] == list(range(1, STEPS + 1))
    for entry in history:
        for key in ("lm_loss", "router_loss", "router_acc", "loss_step_1", "loss_step_2", "loss_step_3",
                    "loss_answer", "loss_other"):
            assert key in entry and entry[key] == entry[key], (key, entry)
    first, last = history[0], history[-1]
    for key in ("loss_step_2", "loss_step_3", "loss_answer"):
        assert last[key] < first[key] - 0.3, (key, first[key], last[key])
    # understanding samples take the frozen route: nothing trainable touches their loss
    others = [e["loss_other"] for e in history]
    assert max(others) - min(others) < 0.05


def test_every_non_twist_weight_is_bitwise_unchanged(run: dict) -> None:
    full = load_file(str(run["out"] / FULL_CHECKPOINT_DIR / "model.safetensors"))
    base = load_file(str(run["base"] / "model.safetensors"))
    clip = load_file(str(run["base"] / "clip-vision-tower" / "model.safetensors"))
    prefix = "model.vision_tower.vision_tower."
    non_twist = [k for k in full if not is_twist_param(k)]
    assert set(base) <= set(non_twist)
    for name in non_twist:
        reference = clip[name[len(prefix):]] if name.startswith(prefix) else base[name]
        assert torch.equal(full[name], reference), name
    assert sum(name.startswith(prefix) for name in non_twist) == len(clip)
    delta = load_file(str(run["out"] / DELTA_WEIGHTS))
    assert set(delta) == {k for k in full if is_twist_param(k)}
    assert any(not torch.equal(delta[k], full[k.replace(".twist_expert", "")]) for k in delta if ".twist_expert." in k)


def test_plain_llavas_loader_reads_the_full_checkpoint_as_the_original_model(run: dict) -> None:
    from llava.mm_utils import get_model_name_from_path
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.builder import load_pretrained_model as llava_load

    full = str(run["out"] / FULL_CHECKPOINT_DIR)
    tokenizer, model, processor, _ = llava_load(full, None, get_model_name_from_path(full), device="cpu")
    _, original, _, _ = llava_load(str(run["base"]), None, "llava-v1.5-tiny", device="cpu")
    assert type(model) is LlavaLlamaForCausalLM and not any(is_twist_param(n) for n, _ in model.named_parameters())
    record = json.loads(run["data"].read_text())[0]
    batch = prompt_batch(tokenizer, processor, model.config, record, run["images"])
    batch["images"] = batch["images"].half()  # LLaVA's builder loads in float16
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, original(**batch).logits)


def test_delta_on_base_reproduces_the_trained_model(run: dict) -> None:
    tokenizer, from_delta, processor, _ = load_pretrained_model(str(run["out"]), str(run["base"]), device="cpu")
    _, from_full, _, _ = load_pretrained_model(str(run["out"] / FULL_CHECKPOINT_DIR), None, device="cpu")
    _, untrained, _, _ = load_pretrained_model(str(run["base"]), None, device="cpu")
    record = json.loads(run["data"].read_text())[0]
    batch = prompt_batch(tokenizer, processor, from_delta.config, record, run["images"])
    with torch.no_grad():
        for route in ("grounding", "auto", "frozen"):
            a = from_delta(**batch, twist_route=route).logits
            b = from_full(**batch, twist_route=route).logits
            assert torch.equal(a, b), route
        trained = from_delta(**batch, twist_route="grounding").logits
        assert not torch.allclose(trained, untrained(**batch, twist_route="grounding").logits, atol=1e-3)
        assert torch.equal(from_delta(**batch, twist_route="frozen").logits,
                           untrained(**batch, twist_route="frozen").logits)


def test_router_learned_to_separate_the_tasks(run: dict) -> None:
    before_g, before_u = router_probs(run["base"], None, run["data"], run["images"])
    assert len(set(before_g + before_u)) == 1  # untrained: zero weights, the same probability for all
    grounding, understanding = router_probs(run["out"], run["base"], run["data"], run["images"])
    assert min(grounding) > max(understanding), (grounding, understanding)
    assert min(grounding) - max(understanding) > 0.05


def test_checkpoints_hold_delta_and_deepspeed_state(run: dict) -> None:
    for step in (SAVE_STEPS, STEPS):
        ckpt = run["out"] / f"checkpoint-{step}"
        assert (ckpt / DELTA_WEIGHTS).is_file() and (ckpt / "config.json").is_file()
        assert (ckpt / f"global_step{step}").is_dir()
        assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
        assert (ckpt / FULL_CHECKPOINT_DIR / "model.safetensors").is_file()
    assert not (run["out"] / "checkpoint-4" / "model.safetensors").exists()  # full weights only under full/


def optimizer_states(ckpt: Path) -> dict[str, torch.Tensor]:
    """Each rank's Adam moments and step counts. Its ``fp32_flat_groups`` are left out: ZeRO-3 pads a rank's
    partition of a group smaller than the world with uninitialised memory, which differs from run to run (the
    master weights themselves are compared through :func:`master_weights`)."""
    tensors = {}
    for file in sorted(ckpt.glob("global_step*/*optim_states.pt")):
        zero_state = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for group, moments in zero_state["optimizer_state_dict"]["state"].items():
            for key, value in moments.items():
                tensors[f"{file.name}/{group}/{key}"] = value
    return tensors


def master_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The trainable parameters' fp32 master copies, gathered from the ranks' partitions without their padding."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), exclude_frozen_parameters=True)


def assert_all_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_resume_continues_at_the_right_step_with_the_same_optimizer_state(run: dict) -> None:
    resumed = run["root"] / "resumed"
    resumed.mkdir()
    shutil.copytree(run["out"] / f"checkpoint-{SAVE_STEPS}", resumed / f"checkpoint-{SAVE_STEPS}")
    copied = {p: p.stat().st_mtime_ns for p in (resumed / f"checkpoint-{SAVE_STEPS}").rglob("*") if p.is_file()}
    launch(run["base"], run["data"], run["images"], resumed)

    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == STEPS
    # steps 1..SAVE_STEPS were not redone: the copied checkpoint was never rewritten
    assert {p: p.stat().st_mtime_ns for p in copied} == copied
    original, again = log_history(run["out"]), log_history(resumed)
    assert [e["step"] for e in again] == list(range(1, STEPS + 1))
    for a, b in zip(original[SAVE_STEPS:], again[SAVE_STEPS:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["loss_answer"] == pytest.approx(b["loss_answer"],
                                                                                                      abs=1e-4)
    reference, resumed_states = optimizer_states(run["out"] / f"checkpoint-{STEPS}"), optimizer_states(
        resumed / f"checkpoint-{STEPS}")
    assert reference and set(reference) == set(resumed_states)
    assert_all_close(resumed_states, reference)
    weights, resumed_weights = master_weights(run["out"] / f"checkpoint-{STEPS}"), master_weights(
        resumed / f"checkpoint-{STEPS}")
    assert weights and set(weights) == set(resumed_weights) and all(is_twist_param(name) for name in weights)
    assert_all_close(resumed_weights, weights)
    delta_a, delta_b = load_file(str(run["out"] / DELTA_WEIGHTS)), load_file(str(resumed / DELTA_WEIGHTS))
    for name in delta_a:
        torch.testing.assert_close(delta_b[name], delta_a[name], atol=1e-6, rtol=1e-5)


def test_sigterm_to_the_launcher_ends_its_workers(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = dict(os.environ, MODEL=str(run["base"]), DATA=str(run["data"]), IMAGES=str(run["images"]), OUT=str(out),
               STEPS="100000", SAVE_STEPS="100000", MASTER_PORT=str(free_port()),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    log = tmp_path / "log.txt"
    with log.open("w") as sink:
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "finetune_twist_cpu.sh")], cwd=REPO, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while "'loss'" not in log.read_text():  # training has started
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            assert workers_of(out), "no training worker found"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    deadline = time.monotonic() + 30
    while workers_of(out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert workers_of(out) == [], log.read_text()[-2000:]
    assert proc.returncode != 0


def workers_of(out: Path) -> list[int]:
    """Processes whose command line names ``out`` (the run's DeepSpeed runner, launcher and ranks)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in args and any(b"train_twist" in a or b"deepspeed" in a for a in args):
            found.append(int(cmdline.parent.name))
    return found


# ---------------------------------------------------------------- SIGKILL, then resume


def kill_when(run: dict, out: Path, ready: Callable[[], bool], log: Path) -> None:
    """Start the same run as the ``run`` fixture into ``out`` and SIGKILL it all (the launcher's process group and
    the session DeepSpeed's runner and both ranks run in) as soon as ``ready()``, as a machine that goes away would."""
    port = free_port()
    with log.open("w") as sink:
        env = launcher_env(run["base"], run["data"], run["images"], out, port)
        proc = subprocess.Popen(LAUNCHER, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not ready():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.002)
        finally:
            # scripts/_launcher.sh starts DeepSpeed in a session of its own: kill that group and the launcher's at once
            groups = {proc.pid}
            for pid in workers_of(out):
                with contextlib.suppress(ProcessLookupError):
                    groups.add(os.getpgid(pid))
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            proc.wait(timeout=60)
    for pid in workers_of(out):  # anything that left both groups
        os.kill(pid, signal.SIGKILL)
    for buffer in shm_buffers(port):  # the launcher's clean-up trap never ran
        buffer.unlink()


def steps_logged(log: Path) -> int:
    """Training steps a launch has logged so far (rank 0 prints one ``{'loss': ...}`` dict a step)."""
    return log.read_text(errors="replace").count("{'loss'")


def assert_resumed_bit_identical(run: dict, out: Path) -> None:
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == STEPS
    for name in (DELTA_WEIGHTS, f"checkpoint-{STEPS}/{DELTA_WEIGHTS}"):
        reference, resumed = load_file(str(run["out"] / name)), load_file(str(out / name))
        assert set(reference) == set(resumed) and all(is_twist_param(k) for k in reference)
        different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
        assert different == [], f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    history, reference = log_history(out), log_history(run["out"])
    assert [e["loss"] for e in history] == [e["loss"] for e in reference]


def test_sigkill_between_checkpoints_then_resume_gives_the_uninterrupted_weights(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    first = tmp_path / "first.log"
    ckpt = out / f"checkpoint-{SAVE_STEPS}"
    kill_when(run, out, lambda: (ckpt / "trainer_state.json").is_file() and steps_logged(first) > SAVE_STEPS, first)
    assert ckpt.is_dir() and not (out / f"checkpoint-{STEPS}").exists() and not (out / DELTA_WEIGHTS).exists()
    kept = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file()}
    launch(run["base"], run["data"], run["images"], out)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # resumed from it, never rewritten
    assert_resumed_bit_identical(run, out)


def test_sigkill_during_a_checkpoint_write_then_resume_gives_the_uninterrupted_weights(run: dict,
                                                                                      tmp_path: Path) -> None:
    """Killed while a checkpoint is written (HF's staging folder ``tmp-checkpoint-N`` present): the half-written
    checkpoint is never resumed from, and the resumed run ends where an uninterrupted one does."""
    out = tmp_path / "killed"
    kill_when(run, out, lambda: any(out.glob("tmp-checkpoint-*")), tmp_path / "first.log")
    (staging,) = out.glob("tmp-checkpoint-*")
    step = int(staging.name.rsplit("-", 1)[1])
    assert not (out / f"checkpoint-{step}").exists()
    launch(run["base"], run["data"], run["images"], out)
    assert not list(out.glob("tmp-checkpoint-*"))
    assert_resumed_bit_identical(run, out)
