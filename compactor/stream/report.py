"""What a streamed compaction did, block by block: frozen records, a table, and JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class BlockResult:
    """One decoder block: its parameters before and after, the layers whose widths changed (name ->
    (out, in)), its verified error and what its report warned of."""

    name: str
    params_before: int
    params_after: int
    max_abs_error: float
    rounding_floor: float | None
    widths: dict[str, tuple[int | None, int | None]]
    warnings: tuple[str, ...]
    seconds: float
    kept: dict[str, int] = field(default_factory=dict)  # zeroed channels that stay, by reason
    heads: tuple[str, ...] = ()  # per attention module: which heads (KV groups) went or stayed, and why


@dataclass(frozen=True)
class StreamReport:
    """The whole checkpoint: every block, the final logits' error, what was read and written."""

    source: str
    blocks: tuple[BlockResult, ...]
    dtype: str
    inputs: str
    logits_error: float
    tolerance: float
    read_bytes: int
    written_bytes: int
    params_outside: int  # embeddings, final norm, head: kept as they are
    seconds: float
    layout: str = ""  # how the output states its widths
    load: str = ""  # how to load it
    logits_floor: float | None = None  # 16-bit: what the dense model's own rounding allows (NOISE_FACTOR x
    # its distance to the float32 stream of the same blocks)

    @property
    def params(self) -> dict[str, int]:
        return {
            "before": self.params_outside + sum(b.params_before for b in self.blocks),
            "after": self.params_outside + sum(b.params_after for b in self.blocks),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params": self.params}

    def render(self) -> str:
        """The table the CLI prints."""
        rows = [f"{'block':<22} {'params before':>14} {'after':>12} {'max error':>10}  widths changed"]
        for b in self.blocks:
            widths = ", ".join(
                f"{n.rpartition('.')[2]} {o if o is not None else ''}x{i if i is not None else ''}"
                for n, (o, i) in list(b.widths.items())[:4]
            ) + (f" (+{len(b.widths) - 4} more)" if len(b.widths) > 4 else "")
            rows.append(
                f"{b.name:<22} {b.params_before:>14,} {b.params_after:>12,} {b.max_abs_error:>10.3g}  {widths or '-'}"
            )
        for b in self.blocks:
            reasons = [f"{n} {fate}" for fate, n in b.kept.items()] + [h for h in b.heads if "kept" in h]
            if reasons:
                rows.append(f"  {b.name} keeps: {'; '.join(reasons)}")
        before, after = self.params["before"], self.params["after"]
        rows.append(
            f"parameters {before:,} -> {after:,} ({after / before:.1%}); {self.dtype}; logits max abs error "
            f"{self.logits_error:.3g} (dense and compacted run block by block on {self.inputs}"
            + (
                f"; the dense model's own bf16/fp16 rounding allows {self.logits_floor:.3g}"
                if self.logits_floor
                else ""
            )
            + "); "
            f"read {self.read_bytes / 2**30:.2f} GiB, wrote {self.written_bytes / 2**30:.2f} GiB in {self.seconds:.1f} s"
        )
        warned = sorted({w for b in self.blocks for w in b.warnings})
        rows += [f"warning: {w}" for w in warned[:5]]
        return "\n".join(rows)


__all__ = ["BlockResult", "StreamReport"]
