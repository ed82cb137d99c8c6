"""Stage 8, report: what changed, what was kept and why, and what it bought. The table and the JSON
come from the same frozen object."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any, cast

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from ..engine.plan import IGNORED, Fate, GroupPlan
from ..engine.verify import Outputs, depends_on_input
from ..layers import Role, shrinker_for
from ..util import picklable


@dataclass(frozen=True)
class LayerChange:
    name: str
    type: str
    out_before: int | None
    out_after: int | None
    in_before: int | None
    in_after: int | None


@dataclass(frozen=True)
class ZeroedChannel:
    """One zeroed channel of a group, named by the layer that writes it (the group's root)."""

    layer: str
    channel: int
    fate: str
    reason: str


@dataclass(frozen=True)
class CompactionReport:
    params: dict[str, int]
    file_bytes: dict[str, int]
    max_abs_error: float
    tolerance: float
    verified_runs: int
    inputs: str
    layers: tuple[LayerChange, ...]
    zeroed: tuple[ZeroedChannel, ...]
    warnings: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    # graph_issues (Torch-Pruning mappings dropped), heads (attention heads removed or kept),
    # rounding_floor (when float rounding exceeded the tolerance); later stages add latency, macs...
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fates(self) -> dict[str, int]:
        counts = Counter(z.fate for z in self.zeroed)
        return {f.value: counts.get(f.value, 0) for f in Fate}

    @property
    def removed_fraction(self) -> float:
        """Of the zeroed channels, the fraction that no longer exists (removed, folded or merged)."""
        if not self.zeroed:
            return 1.0
        return sum(Fate(z.fate).removed for z in self.zeroed) / len(self.zeroed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["channels"] = {
            "zeroed": len(self.zeroed),
            "removed_fraction": self.removed_fraction,
            "fates": self.fates,
        }
        d.update(self.extra)
        return d

    def with_extra(self, **extra: Any) -> CompactionReport:
        return CompactionReport(**{**self.__dict__, "extra": {**self.extra, **extra}})

    def table(self) -> str:
        """The human-readable report (plain text, no colour codes)."""
        buffer = io.StringIO()
        console = Console(file=buffer, width=110, color_system=None, force_terminal=False)
        render(self, console)
        return buffer.getvalue()


def render(report: CompactionReport, console: Console, *, warnings: bool = True) -> None:
    """The report as tables and lines; ``warnings=False`` leaves the warnings out (the CLI prints them on stderr)."""
    summary = Table(title="compactor: dense vs compacted", title_justify="left")
    summary.add_column("metric")
    summary.add_column("before", justify="right")
    summary.add_column("after", justify="right")
    summary.add_column("ratio", justify="right")
    for label, key, fmt in (("parameters", "params", _count), ("file size", "file_bytes", _bytes)):
        before, after = getattr(report, key)["before"], getattr(report, key)["after"]
        summary.add_row(label, fmt(before), fmt(after), f"{after / max(1, before):.3f}")
    macs = report.extra.get("macs")
    if macs:
        summary.add_row(
            "MACs",
            _count(macs["before"]),
            _count(macs["after"]),
            f"{macs['after'] / max(1, macs['before']):.3f}",
        )
    for backend, ms in report.extra.get("latency_ms", {}).items():
        summary.add_row(
            f"latency {backend} (ms)",
            f"{ms['before']:.3f}",
            f"{ms['after']:.3f}",
            f"{ms['after'] / ms['before']:.3f}",
        )
    console.print(summary)
    for backend, why in report.extra.get("not_measured", {}).items():
        console.print(f"latency {backend}: not measured ({why})", markup=False)

    changed = [c for c in report.layers if (c.out_before, c.in_before) != (c.out_after, c.in_after)]
    if changed:
        layers = Table(title=f"layers rebuilt ({len(changed)})", title_justify="left")
        for col in ("layer", "type", "out channels", "in channels"):
            layers.add_column(col)
        for c in changed:
            layers.add_row(c.name, c.type, _arrow(c.out_before, c.out_after), _arrow(c.in_before, c.in_after))
        console.print(layers)

    fates = {k: v for k, v in report.fates.items() if v}
    if report.zeroed:
        gone = sum(Fate(z.fate).removed for z in report.zeroed)
        console.print(
            f"zeroed channels: {len(report.zeroed)}, of which "
            + ", ".join(f"{v} {k}" for k, v in fates.items())
            + f"; {gone} of {len(report.zeroed)} ({report.removed_fraction:.0%}) no longer exist",
            markup=False,
        )
    else:
        console.print(
            "zeroed channels: none (no channel is zero or unread in every layer it couples)", markup=False
        )
    kept = Counter((z.layer, z.fate, z.reason) for z in report.zeroed if not Fate(z.fate).removed)
    for (layer, fate, reason), n in sorted(kept.items()):
        console.print(f"  {layer}: {n} {fate} ({reason})", markup=False)
    for h in report.extra.get("heads", []):
        console.print(
            f"attention heads of {h['layer']}: {_arrow(h['heads_before'], h['heads_after'])} ({h['reason']})",
            markup=False,
        )
    console.print(
        f"verified on {report.verified_runs} runs [{report.inputs}]: max abs error {report.max_abs_error:.3g} "
        f"(tolerance {report.tolerance:g} × max(1, |output|))",
        markup=False,
    )
    if report.extra.get("rounding_floor"):
        console.print(
            f"the masked model's own rounding (against float64) allows up to {report.extra['rounding_floor']:.3g} "
            f"of difference; every removal was decided in float64",
            markup=False,
        )
    for w in report.warnings if warnings else ():
        console.print(f"warning: {w}", markup=False)
    odd = odd_widths(report)
    if odd and report.extra.get("round_to", 1) == 1:
        console.print(
            f"hint: {len(odd)} rebuilt layer(s) now have channel counts off a multiple of {ALIGN} ({', '.join(odd[:3])}"
            f"{', ...' if len(odd) > 3 else ''}); --round-to {ALIGN} (round_to={ALIGN}) keeps a few zero channels to round "
            f"them up, which CPU and GPU kernels often run faster (benchmarks/REPORT.md)",
            markup=False,
        )


ALIGN = 8  # the channel multiple that vectorised conv/matmul kernels favour


def odd_widths(report: CompactionReport) -> list[str]:
    """Rebuilt mixing layers (conv, linear: they have input channels) whose channel count was a multiple of
    ``ALIGN`` and no longer is: "name: count"."""
    odd = []
    for c in (c for c in report.layers if c.in_before is not None):
        for before, after in ((c.out_before, c.out_after), (c.in_before, c.in_after)):
            if before and after and before != after and before % ALIGN == 0 and after % ALIGN:
                odd.append(f"{c.name}: {after}")
                break
    return odd


def layer_changes(before: nn.Module, after: nn.Module) -> tuple[LayerChange, ...]:
    changes = []
    after_modules = dict(after.named_modules())
    for name, module in before.named_modules():
        shrinker = shrinker_for(module)
        new = after_modules.get(name)
        if shrinker is None or new is None or name == "":
            continue
        new_shrinker = shrinker_for(new)
        reads_own_outputs = shrinker.role_of(module) is Role.CHANNELWISE  # inputs are its outputs
        changes.append(
            LayerChange(
                name,
                type(module).__name__,
                shrinker.out_channels(module),
                new_shrinker.out_channels(new) if new_shrinker else None,
                None if reads_own_outputs else shrinker.in_channels(module),
                None if reads_own_outputs or not new_shrinker else new_shrinker.in_channels(new),
            )
        )
    return tuple(changes)


def zeroed_channels(plans: list[GroupPlan]) -> tuple[ZeroedChannel, ...]:
    return tuple(
        ZeroedChannel(p.group.root, f.channel, f.fate.value, f.reason) for p in plans for f in p.fates
    )


def dead_model_warnings(references: list[Outputs], plans: list[GroupPlan]) -> Iterator[str]:
    """A warning when the model's output does not depend on its input, naming the layers that cause it."""
    if depends_on_input(references):
        return
    # A layer is dead when every channel it writes is input-independent; one whose channels are only
    # ignored by a dead layer downstream is a victim, not a cause, and is not named.
    dead = [
        p.group.root
        for p in plans
        if p.fates and len(p.fates) == p.group.size and not any(f.reason == IGNORED for f in p.fates)
    ]
    where = f" (every channel of {', '.join(dead[:3])} is pruned)" if dead else ""
    yield f"the model's output does not depend on its input{where}; compaction kept it exact, but check the pruning"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _ByteCounter:
    """A write-only sink that counts what ``torch.save`` writes, without keeping a copy of it."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def serialized_bytes(model: nn.Module) -> int:
    """The size of ``torch.save(model)``: the bytes a ``.pt`` file of it holds."""
    counter = _ByteCounter()
    with picklable(model):
        torch.save(model, cast(IO[bytes], counter))  # torch.save needs only write() and flush()
    return counter.count


def _count(n: int) -> str:
    return f"{n:,}"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return str(size)


def _arrow(before: int | None, after: int | None) -> str:
    if before is None:
        return "-"
    return f"{before}" if before == after else f"{before} → {after}"
