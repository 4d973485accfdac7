"""Router kinds have one owner (llava_twist.model.routers): a new kind is one class, and the model, twin layers,
config and trainer take it without a change; the released kinds keep their parameter names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from llava_twist.model import TwistConfig
from llava_twist.model.builder import convert_llava_to_twist
from llava_twist.model.routers import ROUTER_KINDS, RouterKind, register_router, router_for
from llava_twist.model.routes import Route
from llava_twist.train.train_twist import setup_gradient_checkpointing

QUERIES = ["What color is the circle?", "Where is the red square left of the star? Answer step by step."]


class ToyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(1))


class ToyRouter(RouterKind):
    """One learned logit for every prompt; refuses the learned mix."""

    name = "toy"

    def validate(self) -> None:
        if self.config.twist_mix == "learned":
            raise ValueError("twist_router='toy' needs twist_mix='fixed'")

    def build_head(self) -> nn.Module:
        return ToyHead()

    def reset_head(self, head: nn.Module) -> None:
        with torch.no_grad():
            head.logit.fill_(-3.0)

    def logits(self, head: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return head.logit.expand(hidden_states.shape[0]).float()

    def loss(self, outputs, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs.router_logits, target.to(outputs.router_logits.device))


@pytest.fixture()
def toy_kind() -> Iterator[type[RouterKind]]:
    register_router(ToyRouter)
    yield ToyRouter
    ROUTER_KINDS.pop(ToyRouter.name)


def test_a_new_router_kind_is_one_class(tiny_llava: Path, toy_kind: type[RouterKind], tmp_path: Path) -> None:
    from test_twist_model import load_base, make_batch, perturb_experts

    with pytest.raises(ValueError, match="twist_mix='fixed'"):
        convert_llava_to_twist(tiny_llava, twist_router="toy")
    model = convert_llava_to_twist(tiny_llava, twist_router="toy", twist_mix="fixed", twist_mix_init=0.0).eval()
    model.get_vision_tower().load_model()
    perturb_experts(model, 0.2)
    assert isinstance(model.get_model().router_kind, ToyRouter)
    assert "model.twist_router.logit" in model.state_dict()
    batch = make_batch(tiny_llava, QUERIES)
    with torch.no_grad():
        auto = model(**batch)  # the untrained toy router keeps every prompt on the original computation
        assert torch.equal(auto.logits, load_base(tiny_llava)(**batch).logits)
        assert auto.twist_decision.routes() == [Route.FROZEN] * 2
        model.get_model().twist_router.logit.fill_(3.0)
        auto = model(**batch)
        assert torch.equal(auto.logits, model(**batch, twist_route="grounding").logits)
        assert auto.twist_decision.routes() == [Route.GROUNDING] * 2
    model.train()
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["input_ids"] < 0, -100),
                twist_router_labels=torch.tensor([0.0, 1.0]), twist_route=torch.tensor([False, True]))
    assert out.router_loss is not None and torch.isfinite(out.router_loss)
    out.router_loss.backward()
    assert model.get_model().twist_router.logit.grad is not None
    model.config.save_pretrained(tmp_path)
    assert TwistConfig.from_pretrained(tmp_path).twist_router == "toy"


def test_unknown_kind_is_named(tiny_llava: Path) -> None:
    with pytest.raises(ValueError, match="twist_router='sideways': expected one of"):
        convert_llava_to_twist(tiny_llava, twist_router="sideways")


@pytest.mark.parametrize(("kind", "names"), [
    ("prompt", {"model.twist_router.net.0.weight", "model.twist_router.net.0.bias"}),
    ("token", {"model.layers.0.mlp.twist_mix.gate.weight", "model.layers.0.mlp.twist_mix.gate.bias"}),
    ("none", set()),
])  # fmt: skip
def test_released_kinds_keep_their_parameter_names(tiny_llava: Path, kind: str, names: set[str]) -> None:
    """Checkpoints trained before router kinds had an owner load: the router's weights keep their names."""
    extra = {"twist_route": "frozen"} if kind == "none" else {}
    keys = convert_llava_to_twist(tiny_llava, twist_router=kind, **extra).state_dict()
    routing = {k for k in keys if "twist_router" in k or ".gate." in k}
    assert names <= routing and all(k.startswith("model.twist_router.net.") or ".twist_mix.gate." in k
                                    for k in routing)
    assert bool(routing) == bool(names)


def test_gradient_checkpointing_asks_the_kind(tiny_llava: Path) -> None:
    class Args:
        gradient_checkpointing = True
        gradient_checkpointing_kwargs = {"use_reentrant": True}

    with pytest.raises(ValueError, match="router without gradient"):
        setup_gradient_checkpointing(Args(), router_for(TwistConfig(twist_router="token")).learns)
    setup_gradient_checkpointing(Args(), router_for(TwistConfig(twist_router="none", twist_route="frozen")).learns)
