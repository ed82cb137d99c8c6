"""The plan stage as the pipeline calls it: observe what each consuming layer reads, then plan every group."""

from __future__ import annotations

from torch import nn

from ...inputs import ExampleInputs
from ..coupling.groups import ChannelGroup
from ..options import Options
from .base import GroupPlan
from .fates import Planner
from .observe import consumer_layers, observe_inputs


def make_plans(
    model: nn.Module, groups: list[ChannelGroup], runs: list[ExampleInputs], same: int, options: Options
) -> tuple[Planner, list[GroupPlan]]:
    """Plan every group of ``model``: what its consumers read is observed on the first two runs at the
    example's shapes (``runs[:same]``) and merged with the runs at another size (a constant that depends on the
    size varies across them, and stays). The planner comes back too: ``round_to="auto"`` asks it again."""
    layers = consumer_layers(groups, model)
    stats = observe_inputs(model, runs[: min(2, same)], layers)
    if len(runs) > same:
        stats = stats.merged(observe_inputs(model, runs[same:], layers))
    planner = Planner(model, groups, stats, runs[: min(2, same)])
    return planner, planner.plans(round_to=options.step, uniform=options.uniform)
