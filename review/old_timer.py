"""A Timer written to the protocol before d47a6ba (models() -> seconds per model, one float each), passed as
compact(timer=...): the whole-model check and the final check both fail with a TypeError that the report
only lists under "not timed"; nothing says the Timer's protocol changed."""

import torch
from torch import nn

import compactor
from compactor.demo import demo_model


class OldTimer:
    target = "torch-cpu"

    def layers(self, probes):
        return [1e-3 for _ in probes]

    def models(self, models: dict[str, nn.Module], inputs) -> dict[str, float]:
        return {n: sum(p.numel() for p in m.parameters()) * 1e-9 for n, m in models.items()}


model = demo_model()
small, report = compactor.compact(model, torch.randn(1, 3, 32, 32), round_to="auto", timer=OldTimer())
auto = report.extra["auto"]
print("untimed:", auto["untimed"])
print("whole:", auto["whole"], "model_ms:", auto["model_ms"])
