"""compactor.measure and compactor.onnx: MACs on hand-computed cases, interleaved latency, ONNX round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.errors import CompactorError, ExportError
from compactor.measure.timing import Timing, count_macs, latency, paired_gap

# --- MACs: one tiny module per case, the expected count worked out by hand ----------------------------


def test_macs_grouped_conv() -> None:
    # 16 filters, each reading 8/4 = 2 input channels through a 3x3 kernel, at 10x10 output positions
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=4)
    assert count_macs(conv, torch.randn(1, 8, 10, 10)) == 16 * 10 * 10 * (2 * 3 * 3)


def test_macs_depthwise_conv() -> None:
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    assert count_macs(conv, torch.randn(2, 32, 7, 7)) == 2 * 32 * 7 * 7 * 9


def test_macs_transposed_conv_with_groups() -> None:
    # every input element is scattered through (4/2 output channels) x 3x3 kernel taps
    deconv = nn.ConvTranspose2d(8, 4, 3, stride=2, groups=2)
    assert count_macs(deconv, torch.randn(1, 8, 5, 5)) == 8 * 5 * 5 * (4 // 2) * 9


def test_macs_linear_on_3d_input() -> None:
    assert count_macs(nn.Linear(8, 4), torch.randn(2, 3, 8)) == 2 * 3 * 8 * 4


class TinyAttention(nn.Module):
    """Self-attention with 2 heads of 8 on 10 tokens: q, k, v, out projections and the two attention matmuls."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.q, self.k, self.v, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, 2, 8).transpose(1, 2) for m in (self.q, self.k, self.v))
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 8**0.5, -1), v)
        return self.out(y.transpose(1, 2).reshape(b, t, 16))


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul"])
def test_macs_attention(fused: bool) -> None:
    projections = 4 * 10 * 16 * 16
    scores = 2 * 10 * 10 * 8  # heads x queries x keys x head dim
    weighted = 2 * 10 * 10 * 8
    assert count_macs(TinyAttention(fused), torch.randn(1, 10, 16)) == projections + scores + weighted


def test_macs_keyword_inputs() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, *, features: torch.Tensor) -> torch.Tensor:
            return self.fc(features)

    assert count_macs(Keyword(), {"features": torch.randn(5, 4)}) == 5 * 4 * 3


# --- latency ---------------------------------------------------------------------------------------------


def test_latency_two_models_interleaved() -> None:
    wide, narrow = nn.Linear(64, 256), nn.Linear(64, 8)
    timings = latency({"wide": wide, "narrow": narrow}, torch.randn(4, 64), threads=1, warmup=1, repeats=7)
    assert set(timings) == {"wide", "narrow"}
    for t in timings.values():
        assert isinstance(t, Timing)
        assert t.n == 7
        assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms


def test_latency_restores_thread_count_and_train_mode() -> None:
    before = torch.get_num_threads()
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout()).train()
    latency({"m": model}, torch.randn(1, 4), threads=1, warmup=0, repeats=1)
    assert torch.get_num_threads() == before
    assert model.training and model[1].training


def test_latency_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        latency({"m": nn.Linear(4, 4)}, torch.randn(1, 4), backend="tpu", repeats=1)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_latency_cuda_refused_without_gpu() -> None:
    with pytest.raises(CompactorError, match="needs a GPU"):
        latency({"m": nn.Linear(4, 4)}, torch.randn(1, 4), backend="cuda", repeats=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_latency_cuda() -> None:
    timings = latency({"m": nn.Linear(64, 64)}, torch.randn(8, 64), backend="cuda", warmup=2, repeats=5)
    assert timings["m"].median_ms > 0


def test_latency_keeps_every_round_in_order() -> None:
    class Sleepy(nn.Module):
        """Sleeps 1 ms more each call: its rounds, in order, rise."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import time

            self.calls += 1
            time.sleep(self.calls / 1000)
            return x

    t = latency({"m": Sleepy()}, torch.randn(1), threads=1, warmup=0, repeats=4)["m"]
    assert t.n == len(t.rounds_ms) == 4
    assert list(t.rounds_ms) == sorted(t.rounds_ms) and t.rounds_ms[-1] - t.rounds_ms[0] >= 2.5


def test_paired_gap() -> None:
    # the same ratio in every round, whatever the rounds' drift: exactly that gap, no noise
    a, b = [1.1, 2.2, 3.3, 1.1], [1.0, 2.0, 3.0, 1.0]
    gap = paired_gap(a, b)
    assert gap.slower == pytest.approx(0.1) and gap.se == pytest.approx(0.0, abs=1e-12) and gap.n == 4
    assert paired_gap(b, a).slower == pytest.approx(1 / 1.1 - 1)
    # rounds alternately 2% either side of b: a median gap of about zero, with a noise of two standard errors
    swing = [x * (1.02 if i % 2 else 0.98) for i, x in enumerate(b * 5)]
    gap = paired_gap(swing, b * 5)
    iqr = (gap.se / 1.2533 * 20**0.5) * 1.349
    assert gap.slower == pytest.approx((1.02 * 0.98) ** 0.5 - 1)
    assert iqr == pytest.approx(
        math.log(1.02 / 0.98)
    )  # the log-ratios' interquartile range: the swing put in
    assert gap.noise == pytest.approx(2 * gap.se) and str(gap).startswith("-0.0% (noise ±")
    with pytest.raises(ValueError, match="equally long"):
        paired_gap([1.0], [1.0, 2.0])


# --- ONNX ------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def compacted_cnn() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
    with torch.no_grad():
        model.bn1.bias.normal_()
    x = torch.randn(1, 3, 16, 16)
    small, _ = compactor.compact(model, x)
    return model, small, x


@pytest.fixture(scope="module")
def exported(
    compacted_cnn: tuple[nn.Module, nn.Module, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    pytest.importorskip("onnxruntime")
    from compactor.io.onnx import export_onnx

    _, small, x = compacted_cnn
    result = export_onnx(small, x, tmp_path_factory.mktemp("onnx") / "small.onnx")
    assert result.exporter in ("dynamo", "torchscript")
    assert result.path.exists()
    return result.path


def test_onnx_export_matches_onnxruntime(
    compacted_cnn: tuple[nn.Module, nn.Module, torch.Tensor], exported: Path
) -> None:
    from compactor.io.onnx import check_onnx

    _, small, x = compacted_cnn
    assert small.conv1.out_channels < 16  # it really is the compacted model that was exported
    assert check_onnx(exported, small, x) < 1e-4


def test_onnx_check_names_the_differing_output(
    compacted_cnn: tuple[nn.Module, nn.Module, torch.Tensor], exported: Path
) -> None:
    from compactor.io.onnx import check_onnx

    _, small, x = compacted_cnn
    other = _perturbed(small)
    with pytest.raises(ExportError, match=r"ONNX Runtime differs from torch .*output: max abs error"):
        check_onnx(exported, other, x)


def test_onnx_latency_from_exported_files(
    exported: Path, compacted_cnn: tuple[nn.Module, nn.Module, torch.Tensor]
) -> None:
    _, _, x = compacted_cnn
    timings = latency(
        {"a": exported, "b": exported}, x, backend="onnxruntime-cpu", threads=1, warmup=1, repeats=3
    )
    assert all(t.median_ms > 0 and t.n == 3 for t in timings.values())


def test_torchscript_exporter_forced(
    compacted_cnn: tuple[nn.Module, nn.Module, torch.Tensor], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from compactor.io.onnx import check_onnx, export_onnx

    _, small, x = compacted_cnn
    result = export_onnx(small, x, tmp_path / "ts.onnx", dynamo=False)
    assert result.exporter == "torchscript"
    assert check_onnx(result.path, small, x) < 1e-4


def _perturbed(model: nn.Module) -> nn.Module:
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    return other


def test_bench_feeds_the_report(compacted_cnn: tuple[nn.Module, nn.Module, torch.Tensor]) -> None:
    from compactor.measure.timing import bench

    masked, small, x = compacted_cnn
    _, report = compactor.compact(masked, x)
    extra = bench(masked, small, x, backends=("torch-cpu", "cuda"), warmup=1, repeats=3)
    assert extra["macs"]["after"] < extra["macs"]["before"] == count_macs(SmallCNN(), x)
    assert extra["latency_ms"]["torch-cpu"]["after"] > 0
    if not torch.cuda.is_available():
        assert "cuda" in extra["not_measured"]
    table = report.with_extra(**extra).table()
    assert "MACs" in table and "latency torch-cpu (ms)" in table
