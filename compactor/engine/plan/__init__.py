"""Stage 4, plan: decide the fate of every zeroed channel, and the exact compensation its removal needs.

A root channel of a group is *zeroed* when either

* every mixing layer that writes it has an all-zero weight row (``input-independent``): downstream it
  carries a value that no input can change. So does a channel with one writer and a BatchNorm of weight 0
  after it (network slimming), and a dead channel multiplied by a live gate (``0 * g``, squeeze-excite:
  proved by shaking the gate with noise, see :func:`.observe.gated_zeros`). We observe that value at each
  consuming layer's input. Zero everywhere: remove it. A constant: fold ``k * W[:, c]`` into the
  consumer's bias (or, for a consumer with no bias feeding a BatchNorm, into that norm's running mean)
  where the consumer sees a constant at every position, or merge it into a *carrier* channel where zero
  padding makes the borders differ (``W[:, carrier] += k_c / k_carrier * W[:, c]``; one carrier per
  group, and per group of a grouped conv that reads it). Varying with position (a zero-padded
  depthwise conv on a constant): a function of the border pattern alone, so a basis per group stays and
  the rest merge into it, exact at every input size (``varying``); multiplied by a live gate: keep it.
* every mixing layer that reads it has an all-zero weight column (``ignored``): remove it, whatever it
  carries, unless something else reads it (a model output, a blocking layer).

A group is kept whole when a blocking layer holds it (LayerNorm, attention heads, which go
only whole through :mod:`compactor.engine.heads`), when it reaches a model output, when its channels pass a
split/chunk/slice whose sizes the forward code fixes, or when Torch-Pruning mapped it inconsistently.
A GroupNorm loses whole groups only, a grouped conv as many channels from each of its groups;
``round_to`` keeps counts at multiples; a :class:`WidthTarget` keeps at least a given width
(``--uniform``, and ``--round-to auto``, which asks the :class:`Planner` for each candidate width). These pin channels and plan again until nothing moves.

See ``docs/EXACTNESS.md`` for the math. The plan is data: the rebuild stage applies it to a copy, and
the verify stage decides whether it ships.

Modules: ``base`` (the plan's data), ``autowidth`` (``round_to="auto"``: each group's width chosen by timing
its candidates with :mod:`compactor.measure`), ``observe`` (run the model, record what each consumer reads),
``fates`` (decide each channel's fate), ``compensate`` (fold and merge constants: plan and apply),
``varying`` (position-varying constants: profile over border patterns, basis and merges),
``widths`` (what widths a layer can take: GroupNorm groups, grouped convs, ``round_to``).
"""

from .base import IGNORED, ChannelFate, Fate, Fold, GroupPlan, InputStats, Merge, WidthTarget, same_plans
from .compensate import apply_compensation
from .fates import Planner, plan_groups
from .observe import consumer_layers, observe_inputs
from .widths import round_layers

__all__ = [
    "IGNORED",
    "ChannelFate",
    "Fate",
    "Fold",
    "GroupPlan",
    "InputStats",
    "Merge",
    "Planner",
    "WidthTarget",
    "apply_compensation",
    "consumer_layers",
    "observe_inputs",
    "plan_groups",
    "round_layers",
    "same_plans",
]
