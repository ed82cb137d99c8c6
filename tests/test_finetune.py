"""Fine-tuning a pruned model: why pruned weights drift, how ``keep_pruned`` stops it, and the workflows.

The first tests document the mechanism with plain PyTorch (no compactor code), so that the claims in
docs/FINETUNING.md are checked facts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.training.finetune import KeepPruned, find_pruned, keep_pruned

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
    "adamw_amsgrad_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, foreach=True),
}


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _prune_removed(model: nn.Sequential) -> torch.Tensor:
    """Prune half of the first layer's weights and bake the mask; return where the zeros are."""
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.remove(model[0], "weight")
    return model[0].weight.detach() == 0


# --- why pruned weights drift (plain PyTorch) -----------------------------------------------------


def test_masks_attached_weight_decay_moves_hidden_weight_orig_but_not_the_effective_weight() -> None:
    model = _mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    pruned = model[0].weight_mask == 0
    hidden_before = model[0].weight_orig.detach()[pruned].clone()
    assert hidden_before.abs().min() > 0  # prune keeps the original values behind the mask
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    x, y = _regression_data()
    for _ in range(5):
        _step(model, optimizer, x, y)
        assert torch.all(model[0].weight_orig.grad[pruned] == 0)  # the mask zeroes the gradient ...

    hidden_after = model[0].weight_orig.detach()[pruned]
    assert not torch.equal(hidden_after, hidden_before)  # ... yet weight decay shrinks the hidden values
    assert torch.all(hidden_after.abs() < hidden_before.abs())
    assert torch.all(optimizer.state[model[0].weight_orig]["momentum_buffer"][pruned] != 0)
    assert torch.all(model[0].weight[pruned] == 0)  # the effective weight is recomputed: still zero


def test_after_prune_remove_zero_weights_get_nonzero_gradients() -> None:
    model = _mlp()
    zeros = _prune_removed(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # no momentum, no weight decay
    x, y = _regression_data()
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    assert torch.all(model[0].weight.grad[zeros] != 0)  # d loss / d w does not care that w == 0
    optimizer.step()
    assert torch.all(model[0].weight[zeros] != 0)  # one plain step revives every pruned weight


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_masked_gradients_keep_zeros_with_a_fresh_optimizer(name: str) -> None:
    """Zero gradient + fresh state: decay of 0 is 0, zero moments give a zero update. Zeros hold."""
    model = _mlp()
    zeros = _prune_removed(model)
    model[0].weight.register_hook(lambda g: g.masked_fill(zeros, 0))
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    x, y = _regression_data()
    for _ in range(20):
        _step(model, optimizer, x, y)
    assert torch.all(model[0].weight[zeros] == 0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_masked_gradients_do_not_stop_optimizer_state_from_moving_zeros(name: str) -> None:
    """Train dense, prune, fine-tune with the same optimizer: momentum / Adam moments remember old gradients."""
    model = _mlp()
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    x, y = _regression_data()
    for _ in range(5):
        _step(model, optimizer, x, y)
    zeros = _prune_removed(model)  # same Parameter object: the optimizer keeps its state for it
    model[0].weight.register_hook(lambda g: g.masked_fill(zeros, 0))
    _step(model, optimizer, x, y)
    assert model[0].weight.grad[zeros].abs().max() == 0  # the gradient is masked ...
    assert torch.all(model[0].weight[zeros] != 0)  # ... and every pruned weight moved anyway


# --- keep_pruned ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_keep_pruned_holds_zeros_exactly_then_remove_frees_them(name: str) -> None:
    model = _mlp()
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    x, y = _regression_data()
    for _ in range(5):  # dense training first: the optimizer state is non-zero everywhere
        _step(model, optimizer, x, y)
    zeros = _prune_removed(model)
    kept_before = model[0].weight.detach()[~zeros].clone()

    handle = keep_pruned(model, optimizer)
    assert handle.zeros == int(zeros.sum()) == 64
    assert [t.name for t in handle] == ["0.weight"]
    state = optimizer.state[model[0].weight]
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if key in state:
            assert torch.all(state[key][zeros] == 0)  # stale state zeroed at call time
    losses = [_step(model, optimizer, x, y) for _ in range(20)]
    assert torch.all(model[0].weight[zeros] == 0)
    assert handle.max_drift() == 0.0
    assert not torch.equal(model[0].weight.detach()[~zeros], kept_before)  # the rest trains
    assert losses[-1] < losses[0]

    handle.remove()
    assert not handle.active
    _step(model, optimizer, x, y)
    assert torch.all(model[0].weight[zeros] != 0)  # free again
    handle.remove()  # twice is fine


def test_keep_pruned_reads_attached_masks_and_survives_prune_remove_mid_training() -> None:
    model = _mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    pruned = model[0].weight_mask == 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    with keep_pruned(model, optimizer) as handle:
        assert [t.name for t in handle] == ["0.weight_orig"]
        assert torch.all(model[0].weight_orig[pruned] == 0)  # hidden values zeroed: remove cannot revive them
        x, y = _regression_data()
        for _ in range(5):
            _step(model, optimizer, x, y)
        assert torch.all(model[0].weight_orig[pruned] == 0)
        prune.remove(model[0], "weight")  # weight_orig becomes weight: the same Parameter, still held
        for _ in range(5):
            _step(model, optimizer, x, y)
        assert torch.all(model[0].weight[pruned] == 0)
    assert not handle.active


def test_keep_pruned_restores_zeros_after_optimizer_load_state_dict() -> None:
    """Resuming from a checkpoint brings back non-zero state; the step post-hook cleans it after the step."""
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _regression_data()
    _step(model, optimizer, x, y)
    dense_state = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the state tensors
    zeros = _prune_removed(model)
    handle = keep_pruned(model, optimizer)
    optimizer.load_state_dict(dense_state)
    assert torch.all(optimizer.state[model[0].weight]["momentum_buffer"][zeros] != 0)
    _step(model, optimizer, x, y)
    assert torch.all(model[0].weight[zeros] == 0)
    assert torch.all(optimizer.state[model[0].weight]["momentum_buffer"][zeros] == 0)
    handle.remove()


def test_keep_pruned_without_optimizer_masks_gradients_only() -> None:
    model = _mlp()
    zeros = _prune_removed(model)
    handle = keep_pruned(model)
    x, y = _regression_data()
    nn.functional.mse_loss(model(x), y).backward()
    assert torch.all(model[0].weight.grad[zeros] == 0)
    assert torch.all(model[0].weight.grad[~zeros] != 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    handle.add_optimizer(optimizer)
    for _ in range(5):
        _step(model, optimizer, x, y)
    assert handle.max_drift() == 0.0
    handle.remove()


def test_find_pruned_leaves_zero_initialised_biases_free() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # BatchNorm bias starts at exactly 0
    with torch.no_grad():
        model[0].weight[1] = 0
    assert [(t.name, t.zeros) for t in find_pruned(model)] == [("0.weight", 27)]
    assert {t.name for t in find_pruned(model, min_dim=1)} == {"0.weight", "1.bias"}


def test_keep_pruned_on_a_dense_model_warns() -> None:
    with pytest.warns(UserWarning, match="no pruned entries"):
        handle = keep_pruned(_mlp())
    assert isinstance(handle, KeepPruned) and handle.zeros == 0 and handle.active
    handle.remove()
    with pytest.raises(RuntimeError, match="handle was removed; call keep_pruned"):
        handle.add_optimizer(torch.optim.SGD(_mlp().parameters(), lr=0.1))


def test_keep_pruned_rejects_a_non_optimizer_with_a_hint() -> None:
    with pytest.raises(TypeError, match=r"expected a torch.optim.Optimizer, found dict; pass the optimizer"):
        keep_pruned(_mlp(), {"lr": 0.1})  # type: ignore[arg-type]


# --- the workflows, end to end on a small CNN -----------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(32, 4)
        g = torch.Generator().manual_seed(3)
        for bn in (self.features[1], self.features[4]):  # as after training: non-zero shifts and statistics
            bn.weight.data = torch.rand(bn.num_features, generator=g) + 0.5
            bn.bias.data = torch.randn(bn.num_features, generator=g)
            bn.running_mean = torch.randn(bn.num_features, generator=g) * 0.1
            bn.running_var = torch.rand(bn.num_features, generator=g) + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _pruned_cnn() -> tuple[SmallCNN, dict[str, set[int]]]:
    """SmallCNN with half the filters of both convs pruned (L2, structured); return the pruned filter indices."""
    torch.manual_seed(0)
    model = SmallCNN()
    pruned = {}
    for name in ("features.0", "features.3"):
        conv = model.get_submodule(name)
        prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
        pruned[name] = set(torch.nonzero(conv.weight_mask.flatten(1).sum(1) == 0).flatten().tolist())
    return model, pruned


def _classification_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 4, (32,), generator=g)


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    x, y = _classification_data()
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _channels(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


EXAMPLE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def compacted_before_tuning() -> tuple[nn.Module, compactor.CompactionReport]:
    return compactor.compact(_pruned_cnn()[0].eval(), EXAMPLE)


def test_recommended_workflow_prune_compact_then_fine_tune_the_small_model(
    compacted_before_tuning: tuple[nn.Module, compactor.CompactionReport],
) -> None:
    small, report = compacted_before_tuning
    small = copy.deepcopy(small)
    _, pruned = _pruned_cnn()
    assert report.params["after"] < 0.5 * report.params["before"]
    assert sum(p.numel() for p in small.parameters()) == report.params["after"]
    assert {(z.layer, z.channel) for z in report.zeroed} == {(n, c) for n, cs in pruned.items() for c in cs}
    shapes = _channels(small)

    optimizer = torch.optim.Adam(small.parameters(), lr=1e-2)
    losses = _fit(small, optimizer, steps=15)  # a plain model: no masks, no hooks, nothing to hold at zero
    assert losses[-1] < 0.9 * losses[0]
    assert _channels(small) == shapes


def test_alternative_workflow_fine_tune_masked_with_keep_pruned_then_compact(
    compacted_before_tuning: tuple[nn.Module, compactor.CompactionReport],
) -> None:
    model, pruned = _pruned_cnn()
    for name in pruned:
        prune.remove(model.get_submodule(name), "weight")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    with keep_pruned(model, optimizer):
        losses = _fit(model, optimizer, steps=15)
    assert losses[-1] < losses[0]

    small, report = compactor.compact(model.eval(), EXAMPLE)
    assert {(z.layer, z.channel) for z in report.zeroed} == {(n, c) for n, cs in pruned.items() for c in cs}
    # fine-tuning lost none of the compaction
    assert _channels(small) == _channels(compacted_before_tuning[0])
    assert report.removed_fraction > 0.9
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(EXAMPLE), model(EXAMPLE), rtol=1e-4, atol=1e-5)


def test_without_keep_pruned_fine_tuning_revives_pruned_channels(
    compacted_before_tuning: tuple[nn.Module, compactor.CompactionReport],
) -> None:
    """The control for the test above: the same fine-tuning without ``keep_pruned``.

    Not every pruned filter revives: behind BatchNorm (batch statistics) + ReLU, a zero filter's channel is
    the constant ``beta``; where ``beta < 0`` ReLU blocks its gradient and it stays dead. The others revive.
    """
    model, pruned = _pruned_cnn()
    for name in pruned:
        prune.remove(model.get_submodule(name), "weight")
    _fit(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), steps=3)
    _, report = compactor.compact(model.eval(), EXAMPLE)
    revived = {(n, c) for n, cs in pruned.items() for c in cs} - {(z.layer, z.channel) for z in report.zeroed}
    assert len(revived) >= 8
    assert report.params["after"] > compacted_before_tuning[1].params["after"]
