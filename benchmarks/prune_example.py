"""The README's prune → fine-tune → compact example, measured: ``python -m benchmarks.prune_example``.

torchvision's ResNet-50 (random weights; needs torchvision), 30% of every group of coupled channels masked by
:func:`compactor.prune_channels`, one epoch of fine-tuning on random data with the masks held
(:func:`compactor.keep_pruned`), then :func:`compactor.compact`; parameters, MACs and CPU latency (PyTorch
eager, 2 threads, dense and compacted timed interleaved in one loop) side by side. Prints a Markdown table.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import compactor
from compactor.measure.timing import bench


def main() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    plan = compactor.prune_channels(model.eval(), x, amount=0.3)
    masking = time.perf_counter() - start
    print(plan.summary())
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 224, 224), torch.randint(0, 10, (64,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    with compactor.keep_pruned(model, optimizer):
        for images, labels in torch.utils.data.DataLoader(data, batch_size=16):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.eval()
    small, report = compactor.compact(model, x)
    measured = bench(model, small, x, threads=2, repeats=20)
    params, macs = report.params, measured["macs"]
    ms = measured["latency_ms"]["torch-cpu"]
    print(f"\nprune_channels: {masking:.1f} s; max abs error after compaction {report.max_abs_error:.2g}\n")
    print("| ResNet-50, 30% masked | dense | compacted | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| parameters | {params['before']:,} | {params['after']:,} | {params['after'] / params['before']:.2f} |"
    )
    print(
        f"| MACs (1x3x224x224) | {macs['before']:,} | {macs['after']:,} | {macs['after'] / macs['before']:.2f} |"
    )
    print(
        f"| latency, torch CPU, 2 threads (ms) | {ms['before']:.1f} | {ms['after']:.1f} | {ms['after'] / ms['before']:.2f} |"
    )


if __name__ == "__main__":
    main()
