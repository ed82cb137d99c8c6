"""Memory: the copies compaction makes hold what changes, not whole models.

The baked copy holds ``orig * mask`` once (no ``weight_orig``, mask or hook tensor); a rebuilt candidate shares
every parameter it does not change with the model it is rebuilt from, and the layers the compensation writes
get copies of their own first, so the baked model (and the user's) are never written."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.engine.masks import baked, clone_module, has_pruning_state, wide_clone
from compactor.engine.rebuild import apply_plans
from compactor.layers.conv import ConvShrinker


class Net(nn.Module):
    """conv → BN → ReLU → conv → flatten → linear, and a tied pair (weight shared by two layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1, bias=False)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.head(y.flatten(1))


def _masked() -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.bias.uniform_(0.5, 1)  # dead filters leave a constant after BN: folded into conv2's bias
    mask = torch.ones(8, 3, 3, 3)
    mask[[1, 4, 6]] = 0
    prune.custom_from_mask(model.conv1, "weight", mask)
    prune.l1_unstructured(model.head, "weight", amount=0.3)
    return model, torch.randn(2, 3, 4, 4)


def _storages(m: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()] if t.numel()}


def test_the_baked_copy_holds_each_pruned_tensor_once_and_leaves_the_model_alone() -> None:
    model, x = _masked()
    orig = model.conv1.weight_orig.detach().clone()
    expected = model(x)
    copy = baked(model)
    assert not has_pruning_state(copy) and has_pruning_state(model)
    assert sorted(n for n, _ in copy.named_parameters()) == sorted(n for n, _ in Net().named_parameters())
    assert sorted(n for n, _ in copy.named_buffers()) == sorted(n for n, _ in Net().named_buffers())
    assert "weight" not in copy.conv1.__dict__ and not copy.conv1._forward_pre_hooks
    assert torch.equal(copy.conv1.weight, orig * model.conv1.weight_mask)
    assert int((copy.conv1.weight == 0).all(dim=(1, 2, 3)).sum()) == 3
    assert not _storages(copy) & _storages(model)  # a copy: nothing shared with the user's model
    torch.testing.assert_close(copy(x), expected, rtol=0, atol=0)
    assert torch.equal(model.conv1.weight_orig, orig) and hasattr(model.conv1, "weight_mask")


def test_a_shared_parameter_clone_copies_buffers_only() -> None:
    model, _ = _masked()
    plain = baked(model)
    twin = clone_module(plain, share_parameters=True).train()
    assert all(a is b for a, b in zip(twin.parameters(), plain.parameters()))
    assert twin.bn1.running_mean is not plain.bn1.running_mean
    wide = wide_clone(plain)
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    assert all(torch.equal(a.double(), b) for a, b in zip(plain.parameters(), wide.parameters()))
    assert plain.conv1.weight.dtype == torch.float32


def test_a_rebuild_shares_what_it_does_not_change_and_never_writes_the_model() -> None:
    model, x = _masked()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = compactor.compact(model, x)
    assert small.conv1.out_channels == 5 and small.conv2.in_channels == 5
    fates = report.to_dict()["channels"]["fates"]
    assert (fates["removed"], fates["folded"]) == (2, 1)  # ReLU zeroes two constants; one folds into conv2
    assert small.conv2.bias is not None and model.conv2.bias is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not _storages(small) & _storages(model)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_rebuild_shares_untouched_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    from compactor.engine.graph import build_groups
    from compactor.engine.plan import Planner, consumer_layers, observe_inputs
    from compactor.inputs import ExampleInputs

    model, x = _masked()
    plain = baked(model).eval()
    runs = [ExampleInputs.of(x), ExampleInputs.of(torch.randn(2, 3, 4, 4))]
    groups = build_groups(plain, runs[0])
    stats = observe_inputs(plain, runs, consumer_layers(groups, plain))
    plans = Planner(plain, groups, stats, runs).plans()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    small = apply_plans(plain, [p for p in plans if p.removed])
    assert small.head.weight is plain.head.weight  # untouched: the same tensor, not a copy
    assert small.conv2.bias is not None and plain.conv2.bias is None  # the fold wrote into conv2's copy
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    # a shrinker that writes more than it declares is caught before anything is returned
    monkeypatch.setattr(ConvShrinker, "fold_writes", ())
    monkeypatch.setattr(ConvShrinker, "fold_constant", _writes_weight)
    with pytest.raises(AssertionError, match="wrote into a parameter of the model it copies"):
        apply_plans(plain, [p for p in plans if p.removed])


def _writes_weight(self: object, m: nn.Conv2d, idx: torch.Tensor, k: torch.Tensor) -> None:
    with torch.no_grad():
        m.weight.mul_(1.0)
