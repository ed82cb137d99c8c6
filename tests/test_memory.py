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
from compactor.engine.rebuild import apply_plans
from compactor.layers.conv import ConvShrinker
from compactor.modules import baked, clone_module, has_pruning_state, wide_clone


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
    from compactor.engine.coupling import build_groups
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


# --- what the copies must still get right (a stranger's review of the shared copies) ------------------------
class Rescaled(prune.BasePruningMethod):
    """A pruning method with an ``apply_mask`` of its own: the kept weights doubled."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone()
        mask[::2] = 0
        return mask

    def apply_mask(self, module: nn.Module) -> torch.Tensor:
        return super().apply_mask(module) * 2.0  # type: ignore[no-untyped-call]


def test_the_pruning_method_s_own_apply_mask_and_mask_dtype_are_what_is_baked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    Rescaled.apply(model[0], "weight")  # type: ignore[no-untyped-call]
    x = torch.randn(5, 8)
    small, _ = compactor.compact(model, x)
    assert small[0].out_features == 8  # the even rows are zero: they go, and the odd ones are doubled
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)
    assert torch.equal(small[0].weight, 2 * model[0].weight_orig[1::2])
    half = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16).eval()
    prune.custom_from_mask(half[0], "weight", torch.ones(16, 8).index_fill_(0, torch.tensor([3, 9]), 0))
    half[0].weight_mask = half[0].weight_mask.float()  # a float32 mask on bfloat16 weights
    assert baked(half)[0].weight.dtype == torch.bfloat16
    small, _ = compactor.compact(half, x.to(torch.bfloat16))
    assert small[0].weight.dtype == torch.bfloat16 and small[0].out_features == 14


class MaskReader(nn.Module):
    """Reads its pruned layer's mask through another attribute (a dict of masks)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        prune.custom_from_mask(self.fc, "weight", torch.ones(8, 8).index_fill_(0, torch.tensor([1, 5]), 0))
        self.masks = {"fc": self.fc.weight_mask}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)) * self.masks["fc"].sum(1))


class OrigAlias(nn.Module):
    """Reads its pruned layer's unmasked weight (``weight_orig``) through a plain attribute too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        self.alias = [self.fc.weight]
        prune.custom_from_mask(self.fc, "weight", torch.ones(8, 8).index_fill_(0, torch.tensor([1, 5]), 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)) + torch.nn.functional.linear(x, self.alias[0]))


def test_tensors_held_twice_are_copied_as_they_are() -> None:
    torch.manual_seed(0)
    model, x = MaskReader().eval(), torch.randn(4, 8)
    small, _ = compactor.compact(model, x)
    assert small.masks["fc"].shape == (8, 8)  # the alias a real mask, not an empty placeholder
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)
    # baking masks the unmasked alias too (prune.remove writes orig * mask into weight_orig): refused, not
    # shipped, because the references are the user's model's own outputs
    with pytest.raises(compactor.errors.VerificationError):
        compactor.compact(OrigAlias().eval(), x)


class ActNorm(nn.Module):
    """Glow's ActNorm: data-dependent initialisation of its parameters on the first training forward."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(n))
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.initialized:
            with torch.no_grad():
                self.loc.copy_(-x.mean(0))
                self.scale.copy_(1 / (x.std(0) + 1e-6))
                self.initialized.fill_(1)
        return (x + self.loc) * self.scale


def test_a_train_mode_forward_that_writes_parameters_touches_no_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), ActNorm(6), nn.Linear(6, 3)).eval()
    prune.custom_from_mask(model[0], "weight", torch.ones(16, 8).index_fill_(0, torch.tensor([2, 7]), 0))
    x = torch.randn(5, 8)
    small, _ = compactor.compact(model, x)
    assert small[0].out_features == 14
    assert torch.equal(small[3].loc, torch.zeros(6)) and torch.equal(model[3].loc, torch.zeros(6))
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


# --- how many copies compaction holds at its peak ----------------------------------------------------------
PEAK_SCRIPT = """
import json, sys
import torch
from torch import nn
from torch.nn.utils import prune
import compactor

def status(key):  # this process's own counters: ru_maxrss would carry the forking parent's peak over exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

warm = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()  # lazy imports and first-call caches
with torch.no_grad():
    warm[0].weight[0] = 0
compactor.compact(warm, torch.randn(2, 8))
torch.manual_seed(0)
width, masks = int(sys.argv[1]), sys.argv[2] == "masks"
model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(width, width), nn.ReLU())]).eval()
size = sum(p.numel() * p.element_size() for p in model.parameters())
for layer in model[::2]:
    rows = torch.ones_like(layer.weight)
    rows[::4] = 0
    if masks:
        prune.custom_from_mask(layer, "weight", rows)
    else:
        with torch.no_grad():
            layer.weight.mul_(rows)
x = torch.randn(2, width)
model(x)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from what is resident now
small, report = compactor.compact(model, x, time_limit=None)
peak = status("VmHWM")
small_bytes = sum(p.numel() * p.element_size() for p in small.parameters())
print(json.dumps({"size": size, "extra": peak - before, "small": small_bytes, "after": report.params["after"]}))
"""


@pytest.mark.parametrize("kind", ["zeros", "masks"])
def test_compaction_holds_one_copy_besides_the_user_s_model(kind: str) -> None:
    """Six 1536x1536 Linear layers (56.6 MB of float32), a quarter of every layer's rows pruned. Besides the
    user's model, compaction's peak holds one model's worth: the stages share the user's parameters (never
    writing them: a write is refused before it happens) and the rebuild the parameters it does not change;
    what is returned owns its tensors. Masked, the baked weights (``orig * mask``, what ``prune.remove``
    would leave) come on top of the rebuilt layers: still less than the ``weight_orig``, mask and computed
    weight the user's model holds itself. Peak RSS (the process's own VmHWM, reset before the call: the
    ``ru_maxrss`` of a process started from a big one keeps the parent's peak) in a fresh process; large allocations mapped one by one
    (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the count."""
    import json
    import os
    import subprocess
    import sys

    keep = ("PATH", "HOME", "VIRTUAL_ENV", "TMPDIR")  # nothing an earlier test or the caller set besides
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, "1536", kind], capture_output=True, text=True, env=env, check=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    size = found["size"]
    assert size == 6 * (1536 * 1536 + 1536) * 4
    # rows 0, 4, 8, ... of each layer go with the next layer's columns (the last keeps its outputs: the model's)
    first, middle, last = 1152 * 1536 + 1152, 4 * (1152 * 1152 + 1152), 1536 * 1152 + 1536
    assert found["after"] == first + middle + last
    copies = found["extra"] / size
    if kind == "zeros":
        assert copies < 1.2, f"{copies:.2f} copies of the model besides the user's"
    else:
        assert copies < 2.2, f"{copies:.2f} copies of the model besides the user's"


class Drifts(nn.Module):
    """A forward that writes its own parameter in place in eval mode (a running estimate kept in a Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale.mul_(1.01)
        return self.fc(x) * self.scale


def test_a_forward_that_writes_a_shared_parameter_is_stopped_before_it_writes() -> None:
    """The masked model's forwards run on a clone that shares the user's parameters: the write is refused
    before it happens (the user's model is exactly as it was), in one line that says what to change."""
    torch.manual_seed(0)
    model = Drifts().eval()
    prune.custom_from_mask(model.fc, "weight", torch.ones(8, 8).index_fill_(0, torch.tensor([3]), 0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(compactor.errors.SharedWriteError) as caught:
        compactor.compact(model, torch.randn(2, 8))
    assert str(caught.value) == (
        "the model's eval-mode forward writes in place into one of the model's parameters (mul_ on a "
        "(8,) tensor); nothing was written: make the forward leave its parameters alone (data-dependent "
        "initialisation done once, before pruning)"
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_returned_model_owns_its_tensors_and_the_stages_shared_the_user_s() -> None:
    """Nothing of what compaction returns aliases the user's model (training it leaves theirs alone), though
    the stages shared the user's parameters on the way: untouched layers come back as equal copies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight[[2, 5]] = 0
        model[0].bias[[2, 5]] = 0
    x = torch.randn(3, 8)
    small, _ = compactor.compact(model, x)
    assert small[0].out_features == 14 and small[2].in_features == 14
    assert torch.equal(small[4].weight, model[4].weight)  # untouched: equal, and a copy
    assert not _storages(small) & _storages(model)
    with torch.no_grad():
        small[4].weight.add_(1.0)
    assert not torch.equal(small[4].weight, model[4].weight)
