"""Stage 3, coupling: which channels must go together, found by one of two analyses.

Torch-Pruning's ``DependencyGraph`` (:mod:`.tp_adapter`, the only module that imports the library, and
:mod:`.tp_groups`, which reads its groups in compactor's terms), or compactor's own channel labels
(:mod:`.labels`: the tracer in :mod:`.tracer`, :mod:`.moves` and :mod:`.trace`, its op tables in
:mod:`.ops`). Both answer with the types of :mod:`.groups`; :func:`build_groups` chooses between them.
"""

from __future__ import annotations

from torch import nn

from ...errors import CouplingByRule, CouplingUnfollowed, GraphError, first_line
from ...inputs import ExampleInputs
from . import labels, tp_adapter
from .groups import ANALYSES, Analysis, ChannelGroup, Join, Kind, Member
from .labels import label_groups
from .tp_groups import _suspect

__all__ = [
    "ANALYSES",
    "Analysis",
    "ChannelGroup",
    "Join",
    "Kind",
    "Member",
    "build_groups",
    "label_groups",
]


def build_groups(
    model: nn.Module, inputs: ExampleInputs, *, train: bool = False, analysis: Analysis = "auto"
) -> list[ChannelGroup]:
    """Trace ``model`` on ``inputs`` and return one group per set of coupled channels.

    Torch-Pruning's answer is taken where it can be trusted. Where it fails to trace, or its groups hold
    what it maps wrongly (a split or chunk, a slice of channels, a reshape or permute that moves them, an
    index mapping that cannot be right, a walk that does not settle), compactor's own channel labels
    (:mod:`.labels`) answer for the whole model instead; if those fail too (an op of the model fails under
    the label trace), Torch-Pruning's error stands. An error of compactor's own (a bug) is raised as it is.

    ``train``: trace the train-mode forward (Torch-Pruning switches to eval mode before it calls the
    forward; this switches back). Batch statistics move then: pass a copy.

    ``analysis``: ``"auto"`` as above; ``"torch-pruning"`` or ``"labels"``: that analysis alone (to compare
    them, or to rule one out)."""
    if analysis not in ANALYSES:
        raise ValueError(f"analysis must be one of {', '.join(ANALYSES)}, found {analysis!r}")
    by_rule = False
    try:
        groups: list[ChannelGroup] | None = tp_adapter._tp_groups(
            model, inputs, train=train, stop_by_rule=analysis == "auto"
        )
        failure: GraphError | None = None
    except (
        CouplingByRule
    ):  # its groups would be suspect: the labels answer, Torch-Pruning's only if they fail
        groups, failure, by_rule = None, None, True
    except GraphError as e:
        groups, failure = None, e
    if analysis == "torch-pruning" or (analysis == "auto" and groups is not None and not _suspect(groups)):
        if failure is not None:
            raise failure
        assert groups is not None
        return groups
    try:
        return labels.label_groups(model, inputs, train=train)
    except GraphError as e:  # an op of the model fails under the label trace: keep what there is
        cause = e.__cause__ if isinstance(e, CouplingUnfollowed) and e.__cause__ is not None else e
        if by_rule:
            groups = tp_adapter._tp_groups(model, inputs, train=train)
        if groups is not None and analysis == "auto":
            return groups
        raise GraphError(
            f"compactor could not follow the channels ({type(cause).__name__}: {first_line(cause)})"
        ) from (failure or cause)
