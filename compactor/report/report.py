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
from ..layers import Role, shrinker_for
from ..outputs import Outputs, depends_on_input
from ..util import picklable
from .filters import PrunedFilter, kept_by_layer, spans, summary


@dataclass(frozen=True)
class LayerChange:
    name: str
    type: str
    out_before: int | None
    out_after: int | None
    in_before: int | None
    in_after: int | None
    groups: int = 1  # a grouped conv's groups (channels go in equal numbers from each)


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
    filters: tuple[PrunedFilter, ...] = ()  # every all-zero output row of a mixing layer, and its fate
    seconds: dict[str, float] = field(default_factory=dict)
    # graph_issues (Torch-Pruning mappings dropped), heads (attention heads removed or kept), experts (the
    # neurons of fused Mixture-of-Experts layers),
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
        d.pop("filters")
        d["pruned_filters"] = summary(self.filters)
        d["channels"] = {
            "zeroed": len(self.zeroed),
            "removed_fraction": self.removed_fraction,
            "fates": self.fates,
        }
        d.update(self.extra)
        why = why_not_faster(self)
        if why:
            d["why_not_faster"] = why
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
    for line in auto_lines(report):
        console.print(line, markup=False)

    changed = [c for c in report.layers if (c.out_before, c.in_before) != (c.out_after, c.in_after)]
    if changed:
        layers = Table(title=f"layers rebuilt ({len(changed)})", title_justify="left")
        for col in ("layer", "type", "out channels", "in channels"):
            layers.add_column(col)
        for c in changed:
            layers.add_row(c.name, c.type, _arrow(c.out_before, c.out_after), _arrow(c.in_before, c.in_after))
        console.print(layers)

    _zeroed_lines(report, console)
    _filter_lines(report, console)
    for h in report.extra.get("heads", []):
        console.print(
            f"attention heads of {h['layer']}: {_arrow(h['heads_before'], h['heads_after'])}"
            + (
                f", query heads per group {_arrow(*h['query_heads'])}"
                if h.get("query_heads") and h["query_heads"][0] != h["query_heads"][1]
                else ""
            )
            + f" ({h['reason']})",
            markup=False,
        )
    for e in report.extra.get("experts", []):
        console.print(
            f"experts of {e['layer']}: neurons per expert {_arrow(e['width_before'], e['width_after'])} "
            f"({e['experts']} experts; {e['reason']})",
            markup=False,
        )
    console.print(
        f"verified on {report.verified_runs} runs [{report.inputs}]: max abs error {report.max_abs_error:.3g} "
        f"(tolerance {report.tolerance:g} × max(1, |output|))",
        markup=False,
    )
    if report.extra.get("sizes"):  # the run at another input size, or why there was none
        console.print(f"  {report.extra['sizes']}", markup=False)
    if report.extra.get("explored"):  # changed example inputs that took another side of a value branch
        console.print(f"  {report.extra['explored']}", markup=False)
    if report.extra.get("cache"):  # KV cache tensors compared head by head
        console.print(f"  {report.extra['cache']}", markup=False)
    for note in report.extra.get("path_notes", []):  # branches that are said, not warned of
        console.print(f"  {note}", markup=False)
    if report.extra.get("reparametrizations"):
        folded = report.extra["reparametrizations"]
        more = f" and {len(folded) - 3} more" if len(folded) > 3 else ""
        console.print(
            f"re-parametrisations folded into plain weights ({', '.join(folded[:3])}{more}): the compacted layers "
            f"hold the weight they computed; verified against the model with them",
            markup=False,
        )
    if report.extra.get("rounding_floor"):
        console.print(
            f"the masked model's own rounding (against {report.extra.get('judged_in', 'float64')}) allows up to "
            f"{report.extra['rounding_floor']:.3g} of difference; every removal was decided in "
            f"{report.extra.get('judged_in', 'float64')}",
            markup=False,
        )
    if report.extra.get("split_sizes"):
        splits = list(report.extra["split_sizes"].items())
        shown = ", ".join(f"{name} {before} -> {after}" for name, (before, after) in splits[:3])
        more = f" and {len(splits) - 3} more" if len(splits) > 3 else ""
        console.print(f"split sizes rewritten with the kept channels: {shown}{more}", markup=False)
    if "float64_error" in report.extra:
        console.print(
            f"that rounding exceeds the tolerance: float64 copies of the masked and compacted models were "
            f"compared as well, max abs error {report.extra['float64_error']:.3g}",
            markup=False,
        )
    for w in report.warnings if warnings else ():
        console.print(f"warning: {w}", markup=False)
    for line in why_not_faster(report):
        console.print(line, markup=False)
    odd = odd_widths(report)
    if odd and report.extra.get("round_to", 1) == 1:
        console.print(
            f"hint: {len(odd)} rebuilt layer(s) now have channel counts off a multiple of {ALIGN} ({', '.join(odd[:3])}"
            f"{', ...' if len(odd) > 3 else ''}); --round-to {ALIGN} (round_to={ALIGN}) keeps a few zero channels to round "
            f"them up, which CPU and GPU kernels often run faster (benchmarks/REPORT.md); --round-to auto times which widths "
            f"run faster where the model deploys",
            markup=False,
        )


def _zeroed_lines(report: CompactionReport, console: Console) -> None:
    """Zeroed channels (zero in every layer that writes them, or read by none) and their fates; the kept
    ones per layer, less those the pruned-filter lines list. No percentage: the pruned-filter line says how
    much of the pruning is gone."""
    fates = {k: v for k, v in report.fates.items() if v}
    if report.zeroed:
        console.print(
            f"zeroed channels (zero in every layer that writes them, or read by none): {len(report.zeroed)}, of which "
            + ", ".join(f"{v} {k}" for k, v in fates.items()),
            markup=False,
        )
    else:
        console.print(
            "zeroed channels: none (no channel is zero or unread in every layer it couples)", markup=False
        )
    listed = {(f.layer, f.row) for f in report.filters if not f.removed}  # in the pruned-filter lines
    kept = Counter(
        (z.layer, z.fate, z.reason)
        for z in report.zeroed
        if not Fate(z.fate).removed and (z.layer, z.channel) not in listed
    )
    for (layer, fate, reason), n in sorted(kept.items()):
        console.print(f"  {layer}: {n} {fate} ({reason})", markup=False)


def _filter_lines(report: CompactionReport, console: Console) -> None:
    """Pruned filters (all-zero output rows): how many, how many went, and per layer why the others stay."""
    if not report.filters:
        console.print("pruned filters (all-zero output rows): none", markup=False)
        return
    s = summary(report.filters)
    why = ", ".join(f"{n} {fate.removeprefix('kept: ')}" for fate, n in s["kept_by_reason"].items())
    console.print(
        f"pruned filters (all-zero output rows): {s['total']}, of which {s['removed']} removed "
        f"({s['removed_fraction']:.0%}), {s['kept']} kept" + (f": {why}" if why else ""),
        markup=False,
    )
    for k in kept_by_layer(report.filters):
        reasons = (
            k.reasons[0][0]
            if len(k.reasons) == 1
            else "; ".join(f"{len(rows)} {reason}" for reason, rows in k.reasons)
        )
        console.print(
            f"  {k.layer}: {len(k.rows)} of {k.pruned} kept, {k.fate.removeprefix('kept: ')} "
            f"({'row' if len(k.rows) == 1 else 'rows'} {spans(k.rows)}): {reasons}",
            markup=False,
        )


ALIGN = 8  # the channel multiple that vectorised conv/matmul kernels favour
EFFICIENCY_FLOOR = 0.8  # below this speedup / (dense MACs / compacted MACs), the report says why


def auto_lines(report: CompactionReport) -> list[str]:
    """What ``--round-to auto`` chose and measured, in a few lines."""
    auto = report.extra.get("auto")
    if not auto:
        return []
    padded = [c for c in auto["choices"] if c["width"] > c["exact"]]
    whole = auto.get("whole") or {}
    lines = [
        f"--round-to auto on {auto['target']}: {len(auto['choices'])} channel group(s) timed in {auto['seconds']:.2f} s, "
        f"{auto.get('padded', len(padded))} padded (+{auto['extra_params']:,} parameters kept)"
        + (
            f"; whole model {auto['model_ms']['before']:.3f} → {auto['model_ms']['after']:.3f} ms"
            if auto.get("model_ms")
            else ""
        )
    ]
    if whole.get("ms"):
        lines.append(
            "  whole model: "
            + ", ".join(
                f"{n} {ms:.2f} ms ({whole['params'][n]:,} parameters)" for n, ms in whole["ms"].items()
            )
            + f"; kept: {whole['picked']}"
        )
    if whole.get("gaps"):
        lines.append(
            f"  run-off against the fastest ({whole['fastest']}), paired round by round: "
            + ", ".join(
                f"{n} {g['slower']:+.1%} (noise ±{2 * g['se']:.1%}, {g['n']} rounds)"
                for n, g in whole["gaps"].items()
            )
        )
    for c in padded if whole.get("picked", "per group") == "per group" else []:
        ms = {int(w): t for w, t in c["ms"].items()}
        lines.append(
            f"  {c['root']}: {c['exact']} → {c['width']} of {c['dense']} channels "
            f"({ms[c['exact']]:.3f} → {ms[c['width']]:.3f} ms over {', '.join(c['layers'])})"
        )
    if auto["untimed"]:
        lines.append(
            f"  not timed (groups keep their exact widths): {', '.join(auto['untimed'][:5])}"
            + (f" and {len(auto['untimed']) - 5} more" if len(auto["untimed"]) > 5 else "")
        )
    return lines


def efficiencies(report: CompactionReport) -> dict[str, tuple[float, float]]:
    """Per backend measured: (speedup, efficiency), speedup = dense / compacted latency and efficiency =
    speedup / (dense MACs / compacted MACs). From ``--bench``'s latencies, else ``--round-to auto``'s check."""
    macs = report.extra.get("macs")
    if not macs or not macs.get("before") or not macs.get("after"):
        return {}
    latencies = dict(report.extra.get("latency_ms", {}))
    auto = report.extra.get("auto")
    if auto and auto.get("model_ms") and auto["target"] not in latencies:
        latencies[auto["target"]] = auto["model_ms"]
    out = {}
    for backend, ms in latencies.items():
        if ms.get("before") and ms.get("after"):
            speedup = ms["before"] / ms["after"]
            out[backend] = (speedup, speedup * macs["after"] / macs["before"])
    return out


def why_not_faster(report: CompactionReport) -> list[str]:
    """For each backend whose speedup efficiency is below ``EFFICIENCY_FLOOR``: the slowest layers dense vs
    compacted (where they were timed), odd widths, layers that did not shrink, grouped layouts, what to try."""
    lines: list[str] = []
    macs = report.extra.get("macs", {})
    for backend, (speedup, eff) in efficiencies(report).items():
        if eff >= EFFICIENCY_FLOOR:
            continue
        lines.append(
            f"why not faster on {backend}: {speedup:.2f}x faster for {macs['after'] / macs['before']:.3f} of the "
            f"MACs, efficiency {eff:.2f} < {EFFICIENCY_FLOOR} (speedup / MACs ratio)"
        )
        timed = _layer_times(report, backend)
        if timed:
            slowest = sorted(timed, key=lambda t: -t["after_ms"])[:5]
            lines.append(
                "  slowest layers, dense → compacted, each alone (ms): "
                + ", ".join(f"{t['layer']} {t['before_ms']:.3f} → {t['after_ms']:.3f}" for t in slowest)
            )
        odd = odd_widths(report)
        if odd:
            lines.append(
                f"  odd widths (off a multiple of {ALIGN}): {', '.join(odd[:6])}{', ...' if len(odd) > 6 else ''}"
            )
        kept = _kept_by_layer(report)
        if kept:
            lines.append(
                f"  layers that did not shrink (zeroed channels kept): {', '.join(kept[:6])}{', ...' if len(kept) > 6 else ''}"
            )
        grouped = [
            f"{c.name} (groups={c.groups})"
            for c in report.layers
            if c.groups > 1 and (c.out_before, c.in_before) != (c.out_after, c.in_after)
        ]
        if grouped:
            lines.append(
                f"  grouped layouts (each group loses as many channels; small groups run slowly): {', '.join(grouped[:4])}"
                + (f" and {len(grouped) - 4} more" if len(grouped) > 4 else "")
            )
        lines.append(f"  try: {'; '.join(_advice(report, backend))}")
    return lines


def _layer_times(report: CompactionReport, backend: str) -> list[dict[str, Any]]:
    timed: list[dict[str, Any]] = report.extra.get("layer_ms", {}).get(backend, [])
    auto = report.extra.get("auto")
    if not timed and auto and auto["target"] == backend:
        timed = auto["layers"]
    return timed


def _kept_by_layer(report: CompactionReport) -> list[str]:
    counts = Counter((z.layer, z.fate) for z in report.zeroed if not Fate(z.fate).removed)
    return [f"{layer}: {n} {fate}" for (layer, fate), n in sorted(counts.items(), key=lambda kv: -kv[1])]


def _advice(report: CompactionReport, backend: str) -> list[str]:
    tips = []
    auto = report.extra.get("auto")
    if not auto or auto["target"] != backend:
        tips.append(f"--round-to auto --target {backend} (widths timed on {backend})")
    if backend == "torch-cpu":
        tips.append(
            "fold BatchNorm into the convs, or deploy with ONNX Runtime (--onnx), which does: eager PyTorch runs "
            "each BatchNorm and activation as its own pass over memory, which removing channels cuts less than MACs"
        )
    if odd_widths(report) and not auto:
        tips.append(f"--round-to {ALIGN} or 16 (one multiple for every layer)")
    tips.append("fewer threads: small layers parallelise worse than large ones")
    return tips


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
                _groups(module),
            )
        )
    return tuple(changes)


def _groups(module: nn.Module) -> int:
    groups = getattr(module, "groups", 1)
    return groups if isinstance(groups, int) and groups > 0 else 1


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
