"""Mixture-of-Experts layers: the neurons each expert never uses, removed from transformers' fused experts.

Transformers 5 stores a layer's experts as one module holding 3-D parameters (Qwen3-MoE, Qwen2-MoE, Mixtral,
OLMoE, DeepSeek, ...: ``use_experts_implementation``): ``gate_up_proj`` ``[experts, 2 x intermediate,
hidden]`` (every expert's gate rows, then its up rows) and ``down_proj`` ``[experts, hidden, intermediate]``.
Expert ``e`` computes ``down[e] @ (act(gate[e] @ x) * (up[e] @ x))``. Neuron ``i`` of expert ``e`` adds nothing,
for every token routed to it, when

* ``down[e][:, i]`` is zero (nothing reads it),
* ``up[e][i]`` is zero (it is ``act(.) * 0``), or
* ``gate[e][i]`` is zero and ``act(0) == 0`` (SiLU, GELU, ReLU).

The tensors hold one width for the layer, but each expert's neurons may be put in any order of its own: the
router and the other experts never see it. So each expert's dead neurons are sorted last, and the layer is cut
to the largest live count among its experts, rounded up to whole 16 bytes (:data:`ROW_BYTES`: transformers'
``grouped_mm`` kernel needs them; 4 neurons in float32, 8 in bfloat16): every expert keeps all of its live neurons (and some dead
ones where it has fewer), and the layer loses the fewest dead neurons of any expert, rounded down to that. What per-expert widths
would save beyond that is reported (:attr:`ExpertChange.per_expert_saving`). The router is left as it is.

Layouts other than that one (``is_transposed``, bias, interleaved gate and up, no gate) are left whole, with
the reason. The candidate is verified against the masked model's outputs, as the heads stage's is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..inputs import ExampleInputs
from ..modules import clone_module
from ..outputs import Outputs, compare
from ..util import set_submodule

# The width is kept a multiple of this many bytes' worth of elements: transformers' default experts kernel
# (``torch.nn.functional.grouped_mm``) refuses rows that are not (4 elements in float32, 8 in bfloat16).
ROW_BYTES = 16


@dataclass(frozen=True)
class ExpertChange:
    """What happened to one experts module's zeroed neurons."""

    layer: str
    experts: int
    width_before: int  # neurons per expert
    width_after: int
    live: tuple[int, ...]  # live neurons per expert
    per_expert_saving: int  # parameters that per-expert widths (each expert its live count) would save beyond
    reason: str

    @property
    def changed(self) -> bool:
        return self.width_after < self.width_before

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Experts:
    name: str
    module: nn.Module
    experts: int
    width: int
    hidden: int


def expert_stacks(model: nn.Module) -> dict[str, str]:
    """``parameter name -> experts module name`` for the fused 3-D expert parameters: each ``[e]`` slice is one
    expert's own matrix (the sparsity report counts zero rows and columns per expert)."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if _shape(module) is not None:
            for attr in ("gate_up_proj", "down_proj"):
                found[f"{name}.{attr}" if name else attr] = name
    return found


def _shape(module: nn.Module) -> tuple[int, int, int] | None:
    """(experts, intermediate width, hidden width) of a fused experts module, or None if it is not one."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    if gate_up.dim() != 3 or down.dim() != 3 or isinstance(module, nn.Linear):
        return None
    return (
        gate_up.shape[0],
        down.shape[-1] if not getattr(module, "is_transposed", False) else down.shape[1],
        (gate_up.shape[-1] if not getattr(module, "is_transposed", False) else gate_up.shape[1]),
    )


def _refusal(module: nn.Module, experts: int, width: int, hidden: int) -> str | None:
    """Why compactor leaves this experts module whole, or None."""
    gate_up, down = module.gate_up_proj, module.down_proj
    assert isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
    for flag, value in (("is_transposed", False), ("is_concatenated", True), ("has_gate", True)):
        if getattr(module, flag, value) != value:
            return f"{flag}={not value} is a layout compactor does not cut yet: experts kept whole"
    if getattr(module, "has_bias", False) or any(
        isinstance(getattr(module, b, None), torch.Tensor) for b in ("gate_up_proj_bias", "down_proj_bias")
    ):
        return "experts with biases are not cut yet: kept whole"
    if tuple(gate_up.shape) != (experts, 2 * width, hidden) or tuple(down.shape) != (experts, hidden, width):
        return f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not pair up"
    if getattr(module, "num_experts", experts) != experts:
        return f"num_experts={getattr(module, 'num_experts', None)} but the tensors hold {experts} experts"
    return None


def _act_of_zero_is_zero(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    if not callable(act):
        return False
    try:
        with torch.no_grad():
            return bool((act(torch.zeros(4, dtype=torch.float64)) == 0).all())
    except Exception:  # an activation that cannot run on a probe: a zero gate proves nothing
        return False


def dead_neurons(module: nn.Module) -> torch.Tensor:
    """``[experts, width]`` booleans: True where the neuron adds nothing to its expert's output."""
    gate_up, down = module.gate_up_proj, module.down_proj
    assert isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
    width = down.shape[-1]
    rows_zero = (gate_up.detach() == 0).all(-1)  # [experts, 2 x width]
    dead: torch.Tensor = (down.detach() == 0).all(1) | rows_zero[:, width:]
    if _act_of_zero_is_zero(module):
        dead |= rows_zero[:, :width]
    return dead


def _cut(module: nn.Module, dead: torch.Tensor, keep: int) -> nn.Module:
    """A copy of ``module`` whose experts each keep ``keep`` neurons: their live ones first, in order."""
    gate_up, down = module.gate_up_proj, module.down_proj
    assert isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
    width = down.shape[-1]
    order = torch.stack([torch.cat([(~d).nonzero().flatten(), d.nonzero().flatten()])[:keep] for d in dead])
    rows = torch.cat([order, order + width], dim=1)  # gate rows, then up rows
    new = clone_module(module, share_parameters=True)
    new.gate_up_proj = nn.Parameter(
        torch.gather(gate_up.detach(), 1, rows[:, :, None].expand(-1, -1, gate_up.shape[-1])).clone(),
        requires_grad=gate_up.requires_grad,
    )
    new.down_proj = nn.Parameter(
        torch.gather(down.detach(), 2, order[:, None, :].expand(-1, down.shape[1], -1)).clone(),
        requires_grad=down.requires_grad,
    )
    if isinstance(getattr(new, "intermediate_dim", None), int):
        setattr(new, "intermediate_dim", keep)  # noqa: B010  (an int attribute of a module)
    return new


Check = Callable[[nn.Module], str | None]


def compact_experts(
    model: nn.Module, verify: Check | None = None, skip: frozenset[str] = frozenset()
) -> tuple[nn.Module, list[ExpertChange]]:
    """``model`` with every fused experts module cut to the widest expert's live neurons (``model`` itself is
    changed where a module is cut: pass a copy). ``verify(candidate)`` returns None when the candidate
    reproduces the reference outputs; a candidate that fails is given up, every module kept with that reason."""
    changes: list[ExpertChange] = []
    originals: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        shape = _shape(module)
        if shape is None or name in skip:
            continue
        experts, width, hidden = shape
        why = _refusal(module, experts, width, hidden)
        dead = dead_neurons(module) if why is None else torch.zeros(experts, width, dtype=torch.bool)
        live = tuple(int(n) for n in (~dead).sum(1))
        if why is not None:
            if bool((module.gate_up_proj == 0).any()):
                changes.append(ExpertChange(name, experts, width, width, live, 0, why))
            continue
        if not dead.any():
            continue
        most = max(1, max(live))
        align = max(1, ROW_BYTES // module.down_proj.element_size())
        keep = min(width, -(-most // align) * align)
        saving = sum(keep - n for n in live) * 3 * hidden
        reason = (
            f"every expert keeps its live neurons ({min(live)}-{max(live)} of {width}), sorted first: the layer "
            f"is cut to {keep}"
            + (
                f" ({most}, the most any expert uses, rounded up to a multiple of {align}: transformers' "
                f"grouped_mm experts kernel needs rows of whole {ROW_BYTES} bytes)"
                if keep != most
                else ", the most any expert uses"
            )
        )
        if saving:
            reason += f"; per-expert widths would save {saving:,} parameters more"
        changes.append(ExpertChange(name, experts, width, keep, live, saving, reason))
        if keep < width:
            originals[name] = module
            model = set_submodule(model, name, _cut(module, dead, keep))
    if verify is None or not originals:
        return model, changes
    problem = verify(model)
    if problem is None:
        return model, changes
    for name, module in originals.items():
        model = set_submodule(model, name, module)
    return model, [
        ExpertChange(c.layer, c.experts, c.width_before, c.width_before, c.live, 0, f"kept: {problem}")
        if c.changed
        else c
        for c in changes
    ]


def remove_expert_neurons(
    model: nn.Module,
    runs: list[ExampleInputs],
    references: list[Outputs],
    tolerance: float,
    uncalled: frozenset[str] = frozenset(),
) -> tuple[nn.Module, list[ExpertChange]]:
    """The experts stage: :func:`compact_experts` on a copy that shares what it does not cut, verified against
    the masked model's outputs (``references`` on ``runs``); experts no forward called are left as they are."""

    def check(candidate: nn.Module) -> str | None:
        verdict = compare(candidate, runs, references, tolerance)
        return None if verdict.ok else verdict.summary()

    if not expert_stacks(model):
        return model, []
    new, changes = compact_experts(clone_module(model, share_parameters=True), verify=check, skip=uncalled)
    return new.eval(), changes
