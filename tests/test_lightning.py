"""The Lightning callbacks, on a 1-epoch CPU fit of a tiny pruned CNN (skipped without ``lightning``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

L = pytest.importorskip("lightning.pytorch")

from compactor.engine.plan import Fate  # noqa: E402
from compactor.errors import OutputPathError  # noqa: E402
from compactor.report.report import CompactionReport  # noqa: E402
from compactor.training.lightning import CompactOnFitEnd, KeepPrunedCallback  # noqa: E402

pytestmark = [  # Lightning's advice (num_workers, log_every_n_steps) and its own deprecated pytree calls
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]


def _net() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    with torch.no_grad():  # as after training: BatchNorm shifts are not zero
        for bn in (net[1], net[4]):
            bn.bias.uniform_(-1, 1)
    return net


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)


def _fit(module: L.LightningModule, callbacks: list[L.Callback]) -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 3, 12, 12, generator=g), torch.randint(0, 3, (32,), generator=g)
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))


def _prune(net: nn.Sequential, remove: bool) -> None:
    for conv in (net[0], net[3]):  # 4 of 8 filters each
        prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
        if remove:
            prune.remove(conv, "weight")


def _expected_out_channels(report: CompactionReport, prefix: str) -> tuple[int, int]:
    """8 minus the channels the report says are gone (a carrier channel stays, see docs/EXACTNESS.md)."""
    gone = [z.layer for z in report.zeroed if Fate(z.fate).removed]
    return (8 - gone.count(f"{prefix}0"), 8 - gone.count(f"{prefix}3"))


def test_keep_pruned_then_compact_on_fit_end_replaces_and_saves_the_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _net()
    _prune(net, remove=True)
    zeros = [(conv.weight == 0).clone() for conv in (net[0], net[3])]
    module = Classifier(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    example = torch.randn(2, 3, 12, 12)
    compact_cb = CompactOnFitEnd(example, output=tmp_path / "small.pt")
    keep_cb = KeepPrunedCallback(attr="model")
    _fit(module, [keep_cb, compact_cb])

    assert any(not torch.equal(p, before[n]) for n, p in net.named_parameters())  # it trained
    for conv, z in zip((net[0], net[3]), zeros):
        assert torch.all(conv.weight[z] == 0)  # and the pruned filters stayed exactly zero
    assert keep_cb.handle is not None and not keep_cb.handle.active

    small = module.model
    assert small is compact_cb.model and small is not net
    report = compact_cb.report
    assert report is not None and len(report.zeroed) == 8
    assert report.removed_fraction >= 0.75
    assert (small[0].out_channels, small[3].out_channels) == _expected_out_channels(report, "")
    assert report.params["after"] == sum(p.numel() for p in small.parameters()) < report.params["before"]
    net.eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(example), net(example), rtol=1e-4, atol=1e-5)
        # pickled in train mode, as fit left it
        loaded = torch.load(tmp_path / "small.pt", weights_only=False).eval()
        torch.testing.assert_close(loaded(example), net(example), rtol=1e-4, atol=1e-5)


def test_compact_on_fit_end_with_masks_attached_and_attr_none_compacts_the_module_itself() -> None:
    torch.manual_seed(1)
    net = _net()
    _prune(net, remove=False)  # the prune hooks keep the effective weights zero during training
    module = Classifier(net)
    example = torch.randn(2, 3, 12, 12)
    callback = CompactOnFitEnd(example, attr=None)
    _fit(module, [callback])

    assert module.model is not net
    assert callback.report is not None and len(callback.report.zeroed) == 8
    expected = _expected_out_channels(callback.report, "model.")
    assert (module.model[0].out_channels, module.model[3].out_channels) == expected < (8, 8)
    assert not hasattr(module.model[0], "weight_mask")
    net.eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(example), net(example), rtol=1e-4, atol=1e-5)


def test_compact_on_fit_end_names_a_missing_attribute_before_training() -> None:
    module = Classifier(_net())
    with pytest.raises(
        AttributeError, match=r"has no submodule 'network' \(its children: model\); pass attr="
    ):
        _fit(module, [CompactOnFitEnd(torch.randn(1, 3, 12, 12), attr="network")])


def test_compact_on_fit_end_refuses_an_unwritable_output_before_training(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match="does not exist; create it first"):
        _fit(
            Classifier(_net()),
            [CompactOnFitEnd(torch.randn(1, 3, 12, 12), output=tmp_path / "no" / "small.pt")],
        )


def test_importing_compactor_does_not_import_lightning() -> None:
    code = "import sys, compactor, compactor.training.finetune; assert 'lightning' not in sys.modules, 'lightning imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_keep_pruned_callback_makes_coupled_masks_and_compaction_removes_every_one() -> None:
    """``KeepPrunedCallback(amount=...)``: ``prune_channels`` when fitting starts (after the optimizers are
    made: they keep the ``weight_orig`` parameters), the masks held through the epoch, every masked row gone
    at the end."""
    torch.manual_seed(0)
    net = _net()
    module = Classifier(net)
    example = torch.randn(2, 3, 12, 12)
    keep_cb = KeepPrunedCallback(attr="model", amount=0.5, example_inputs=example)
    compact_cb = CompactOnFitEnd(example)
    _fit(module, [keep_cb, compact_cb])
    plan = keep_cb.plan
    assert plan is not None and plan.channels == 8  # half of each conv's 8 channels
    assert (
        isinstance(net[0].weight_orig, nn.Parameter)
        and int((net[0].weight_mask.flatten(1) == 0).all(1).sum()) == 4
    )
    report = compact_cb.report
    assert report is not None and report.params["before"] - report.params["after"] == plan.params
    assert (module.model[0].out_channels, module.model[3].out_channels) == (4, 4)
    net.eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(example), net(example), rtol=1e-4, atol=1e-5)
