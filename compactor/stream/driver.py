"""A Hugging Face checkpoint compacted block by block: at most one block's weights in memory at a time.

:func:`compact_checkpoint` builds the config's model on the meta device, reads the parts outside the
decoder blocks and captures what every block is called with (:mod:`.capture`); then, for each block in
order, reads only its tensors, compacts it with :func:`compactor.compact` (the one engine: masks, coupling,
plans, rebuild, verification of the compacted block against the dense one on the same hidden states), saves
it and frees it. The dense and the compacted hidden states are both carried forward, and the final logits of
the two are compared, so that error accumulating over blocks is caught. Nothing is moved into place before
every check has passed.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import compact
from ..engine.coupling.groups import CouplingCache
from ..errors import InputFileError, ModelStructureError, OutputPathError, VerificationError
from ..inputs import ExampleInputs
from ..io.checkpoint import Checkpoint, read_header
from ..io.hf import STREAMED_MANIFEST, build_skeleton, checked_config, move_into_place, temporary_dir
from ..io.safetensors import MANIFEST_VERSION, fit_to_manifest, manifest
from ..io.skeleton import aliases, decoder_blocks, fill, module_name, release, tensor_names
from ..modules import wide_clone
from ..outputs import DEFAULT_TOLERANCE, NOISE_FACTOR, compare_outputs
from ..util import map_large_allocations
from .capture import Block, capture, hidden_of, logits
from .report import BlockResult, StreamReport
from .shards import assemble, copy_side_files, read_part, save_part
from .uniform import Placed, config_layout, pad, padded_spec

Progress = Callable[[BlockResult, int, int, int, float], None]  # block, done, total, bytes read, seconds
DEFAULT_TOKENS = (2, 32)  # random token sequences when no example inputs are given: batch, length


def compact_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    example_inputs: Any = None,
    tolerance: float = DEFAULT_TOLERANCE,
    uniform: bool = False,
    max_shard_size: int | None = None,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
) -> StreamReport:
    """Compact the checkpoint directory ``source`` into the new directory ``output``, block by block.

    ``example_inputs``: keyword tensors for the model (``{"input_ids": ..., "attention_mask": ...}``) or a
    tensor of token ids; default: two random sequences of 32 tokens from the config's vocabulary.
    ``uniform``: every layer of a kind gets the largest width any block keeps (zero channels added back,
    each padded block checked again), so that ``config.json`` states the widths and stock ``from_pretrained``
    loads the directory. Without it, the directory holds the dense config and ``compactor_manifest.json``
    (``compactor.load`` reads it) unless the widths happen to be even.
    ``max_shard_size``: bytes per output shard (default: the input's largest weight file).
    """
    start = time.perf_counter()
    map_large_allocations()  # each block's freed tensors leave the process before the next is read
    source, output = Path(source), Path(output)
    checked_config(source, trust_remote_code)
    if (source / STREAMED_MANIFEST).is_file():
        raise InputFileError(
            f"{source} holds {STREAMED_MANIFEST}: compactor wrote it with uneven widths that its config.json does "
            f"not state, and streaming reads checkpoints their config builds; compact the directory it came from, "
            f"or load it with compactor.load and compact the model"
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OutputPathError(f"-o {output} exists and is not an empty directory; choose a new directory")
    checkpoint = Checkpoint.open(source)
    model = build_skeleton(source, trust_remote_code)
    inputs = _inputs(model, example_inputs)
    tmp = temporary_dir(output)
    try:
        report = _stream(model, checkpoint, inputs, tmp, tolerance, uniform, max_shard_size, progress, start)
        copy_side_files(source, tmp)
        move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _inputs(model: nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    if example_inputs is None:
        vocab = _vocabulary(model)
        generator = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, vocab, DEFAULT_TOKENS, generator=generator)}
    given = ExampleInputs.of(example_inputs)
    if given.args:
        return {"input_ids": given.args[0], **given.kwargs}
    return dict(given.kwargs)


def _vocabulary(model: nn.Module) -> int:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    count = getattr(embeddings, "num_embeddings", None)
    if not isinstance(count, int):
        raise ModelStructureError(
            f"{type(model).__name__} has no token embedding to draw example inputs from; pass example inputs"
        )
    return count


def _stream(
    model: Any,
    checkpoint: Checkpoint,
    inputs: dict[str, torch.Tensor],
    tmp: Path,
    tolerance: float,
    uniform: bool,
    max_shard_size: int | None,
    progress: Progress | None,
    start: float,
) -> StreamReport:
    ties = aliases(model)
    prefix, blocks = decoder_blocks(model)
    _refuse_experts(blocks)
    _check_keys(model, checkpoint, ties)
    every = tensor_names(model, "")
    in_blocks = {n for i in range(len(blocks)) for n in tensor_names(model, f"{prefix}.{i}")}
    head = _head_names(model)
    outside = [n for n in every if n not in in_blocks]
    early = [n for n in outside if n not in head]
    read = fill(model, early, checkpoint, ties)
    hidden, calls = capture(model, blocks, inputs)
    stored = set(checkpoint.names)
    parts = [save_part(tmp, 0, _stored(model, [n for n in early if n in stored]))]
    embedding = [n for n in early if n.startswith(module_name(model, model.get_input_embeddings()) + ".")]
    release(model, embedding, ties)
    dense, small = hidden, hidden
    wide = (
        hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else None
    )  # the dense blocks in float32
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # each block's compacted input and output
    results: list[BlockResult] = []
    spec: dict[str, Any] = {"version": MANIFEST_VERSION, "layers": {}, "tensors": {}}
    cache = CouplingCache()  # blocks built alike are traced once: most LLMs' blocks have one structure
    dtype = hidden.dtype
    for i in range(len(blocks)):
        began = time.perf_counter()
        name = f"{prefix}.{i}"
        names = tensor_names(model, name)
        read += fill(model, names, checkpoint, ties)
        block_input = small
        result, dense, small, compacted = _one_block(
            name, blocks[i], calls[i], dense, small, tolerance, cache
        )
        seen.append((block_input, small))
        if wide is not None:
            wide = _wide_step(blocks[i], calls[i], wide)
        tensors = {f"{name}.{k}": v for k, v in compacted.state_dict().items()}
        parts.append(save_part(tmp, i + 1, tensors))
        _add_manifest(spec, name, compacted)
        release(model, names, ties)
        del compacted, tensors
        result = BlockResult(**{**result.__dict__, "seconds": round(time.perf_counter() - began, 3)})
        results.append(result)
        if progress is not None:
            progress(result, i + 1, len(blocks), read, time.perf_counter() - start)
    late = [n for n in head if n not in early]
    read += fill(model, head, checkpoint, ties)
    expected, got = logits(model, blocks, inputs, dense), logits(model, blocks, inputs, small)
    floor = None
    if wide is not None:  # the dense model's own rounding over all blocks, as the engine allows per block
        # (the float32 stream's final hidden states go through the model's own 16-bit head: the head is
        # the same for all three streams, and no float32 copy of a 128k-row head is made)
        reference = logits(model, blocks, inputs, wide.to(dtype))
        floor = NOISE_FACTOR * float((expected.float() - reference.float()).abs().max())
    error, problems = compare_outputs(
        [("logits", expected)], [("logits", got)], tolerance, [floor] if floor is not None else None
    )
    if problems:
        raise VerificationError(
            f"the compacted model's logits differ from the dense model's: {problems[0]} (every block was within "
            f"its tolerance; their errors add up beyond the dense model's own rounding); nothing was written: "
            f"report this"
        )
    if any(n in stored for n in late):
        parts.append(save_part(tmp, len(blocks) + 1, _stored(model, [n for n in late if n in stored])))
    shapes: dict[str, tuple[int, ...]] = {}
    placed: Placed = {}
    if uniform:
        head_dims = {n: getattr(model.get_submodule(n), "head_dim", 0) for n in spec.get("modules", {})}
        padded, shapes, placed = padded_spec(spec, head_dims)
        _check_padded(model, blocks, prefix, calls, seen, parts, spec, padded, shapes, placed, tolerance)
        spec = padded
    fitted = fit_to_manifest(
        build_skeleton(checkpoint.folder), spec, "the compacted model", _shapes(parts, shapes)
    )
    config, why = config_layout(fitted)
    assemble(tmp, parts, max_shard_size or checkpoint.shard_bytes, _padder(shapes, placed), shapes)
    if config is not None:
        config.save_pretrained(str(tmp))
        layout, load = (
            f"config.json states the widths ({why})",
            f"transformers.{type(model).__name__}.from_pretrained(dir)",
        )
    else:
        _write_config(model, tmp)
        (tmp / STREAMED_MANIFEST).write_text(json.dumps(spec, indent=1) + "\n")
        layout, load = f"uneven widths in {STREAMED_MANIFEST} ({why})", "compactor.load(dir)"
    return StreamReport(
        source=str(checkpoint.folder), blocks=tuple(results), dtype=str(dtype).removeprefix("torch."),
        inputs=", ".join(f"{k}={tuple(v.shape)}" for k, v in inputs.items()), logits_error=error,
        tolerance=tolerance, read_bytes=read, written_bytes=sum(p.stat().st_size for p in tmp.iterdir()),
        params_outside=sum(math.prod(checkpoint.shape(n)) for n in outside if n in stored),
        seconds=round(time.perf_counter() - start, 3), layout=layout, load=load, logits_floor=floor,
    )  # fmt: skip


def _shapes(parts: list[Path], changed: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every tensor the output will hold, and its shape (after padding)."""
    return {k: changed.get(k, s.shape) for p in parts for k, s in read_header(p).items()}


def _padder(
    shapes: dict[str, tuple[int, ...]], placed: Placed
) -> Callable[[str, torch.Tensor], torch.Tensor]:
    return lambda name, t: pad(t, shapes[name], placed.get(name)) if name in shapes else t


def _check_padded(
    model: nn.Module,
    blocks: nn.ModuleList,
    prefix: str,
    calls: list[Any],
    seen: list[tuple[torch.Tensor, torch.Tensor]],
    parts: list[Path],
    spec: dict[str, Any],
    padded: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    placed: Placed,
    tolerance: float,
) -> None:
    """Each block that ``--uniform`` padded, rebuilt from its part and run again on the hidden states it was
    verified on: the zero channels must leave its output as it was, in the model's dtype and in float32 against
    the unpadded block (where bf16's tolerance could hide a misplaced channel: Phi-3's fused ``gate_up_proj``
    is split in halves, so zero rows added at its end would move every ``up`` row into the ``gate`` half)."""
    for i, part in enumerate(parts[1 : len(blocks) + 1]):
        name = f"{prefix}.{i}"
        if not any(k.startswith(name + ".") for k in shapes):
            continue
        block = _block_from(blocks[i], name, part, padded, shapes, placed)
        with torch.no_grad():
            got = hidden_of(Block(block, calls[i]).eval()(seen[i][0]))
        _, problems = compare_outputs([("hidden", seen[i][1])], [("hidden", got)], tolerance)
        if not problems:
            x = seen[i][0].float()
            plain = _block_from(blocks[i], name, part, spec, {}, {})
            want, wide = _wide_step(plain, calls[i], x), _wide_step(block, calls[i], x)
            _, problems = compare_outputs([("hidden", want)], [("hidden", wide)], tolerance)
        if problems:
            raise VerificationError(
                f"--uniform: {name} padded with zero channels changes its output ({problems[0]}); nothing was "
                f"written: leave --uniform out"
            )


def _block_from(
    dense: nn.Module,
    name: str,
    part: Path,
    spec: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    placed: Placed,
) -> nn.Module:
    """Block ``name`` rebuilt from its part file to ``spec``'s shapes (padded to ``shapes`` where given)."""

    def own(entries: dict[str, Any]) -> dict[str, Any]:
        return {k[len(name) + 1 :]: v for k, v in entries.items() if k.startswith(name + ".")}

    block_spec = {**spec, **{key: own(spec.get(key, {})) for key in ("layers", "tensors", "modules")}}
    stored = {k[len(name) + 1 :]: shapes.get(k, s.shape) for k, s in read_header(part).items()}
    block = fit_to_manifest(copy.deepcopy(dense), block_spec, name, stored)
    values = read_part(part)
    block.load_state_dict(
        {k[len(name) + 1 :]: pad(v, shapes.get(k, tuple(v.shape)), placed.get(k)) for k, v in values.items()},
        assign=True,
    )
    return block


def _wide_step(block: nn.Module, call: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The dense block in float32 on the float32 stream: how far 16-bit rounding takes the dense model.

    Each module's own tensors are cast to float32 for its forward only (at most one layer's float32 copy at a
    time: 235 MB for an 8B-shape down_proj, where a float32 twin of the block is 0.87 GB); a block whose
    forward reads a module's weights without calling it gets a float32 twin of the whole block instead."""
    try:
        with torch.no_grad(), _float32_per_module(block):
            return hidden_of(Block(block, call).eval()(hidden)).float()
    except RuntimeError:  # a dtype mismatch: some forward read a weight outside its module's call
        twin = Block(wide_clone(block, torch.float32), call).eval()
        with torch.no_grad():
            return hidden_of(twin(hidden)).float()


@contextmanager
def _float32_per_module(root: nn.Module) -> Iterator[None]:
    """While inside, every module of ``root`` runs its forward with its own 16-bit tensors in float32."""
    saved: dict[int, list[tuple[dict[str, Any], str, Any]]] = {}

    def before(module: nn.Module, _args: Any) -> None:
        swaps = []
        tables: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for table in tables:
            for name, t in table.items():
                if t is not None and t.dtype in (torch.float16, torch.bfloat16):
                    swaps.append((table, name, t))
                    table[name] = t.detach().float()
        saved[id(module)] = swaps

    def after(module: nn.Module, _args: Any, _out: Any) -> None:
        for table, name, t in saved.pop(id(module), []):
            table[name] = t

    hooks = []
    for module in root.modules():
        if module._parameters or module._buffers:
            hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for swaps in saved.values():  # a forward that raised: put the 16-bit tensors back
            for table, name, t in swaps:
                table[name] = t


def _one_block(
    name: str,
    block: nn.Module,
    call: Any,
    dense: torch.Tensor,
    small: torch.Tensor,
    tolerance: float,
    cache: CouplingCache | None = None,
) -> tuple[BlockResult, torch.Tensor, torch.Tensor, nn.Module]:
    """One block compacted and verified on the dense hidden states; both streams carried one block on."""
    wrapped = Block(block, call).eval()  # a new module trains by default: compact() returns it in its mode
    compacted, report = compact(wrapped, dense, tolerance=tolerance, time_limit=None, coupling_cache=cache)
    with torch.no_grad():
        next_dense = hidden_of(wrapped(dense))
        next_small = hidden_of(compacted(small))
    inner = compacted.block
    assert isinstance(inner, nn.Module)
    changed = {
        c.name.removeprefix("block."): (c.out_after, c.in_after)
        for c in report.layers
        if (c.out_before, c.in_before) != (c.out_after, c.in_after)
    }
    result = BlockResult(
        name=name,
        params_before=report.params["before"],
        params_after=report.params["after"],
        max_abs_error=report.max_abs_error,
        rounding_floor=report.extra.get("rounding_floor"),
        widths=changed,
        warnings=tuple(report.warnings),
        seconds=0.0,
        kept={fate: n for fate, n in report.fates.items() if n and fate.startswith("kept")},
        heads=tuple(
            f"{h['layer'].removeprefix('block.')}: {h['reason'].replace('block.', name + '.')}"
            for h in report.extra.get("heads", [])
        ),
    )
    return result, next_dense, next_small, inner


def _refuse_experts(blocks: nn.ModuleList) -> None:
    experts = next(
        (
            type(m).__name__
            for m in blocks[0].modules()
            if "expert" in type(m).__name__.lower() or "moe" in type(m).__name__.lower()
        ),
        None,
    )
    if experts is not None:
        raise ModelStructureError(
            f"the decoder blocks hold a Mixture-of-Experts layer ({experts}): transformers stores experts one by one "
            f"and fuses them at load, and routing decides which expert a token reads, so a block's zero neurons "
            f"are not streamed yet; load the model with compactor.load and compact it whole"
        )


def _check_keys(model: nn.Module, checkpoint: Checkpoint, ties: dict[str, list[str]]) -> None:
    known = {alias for names in ties.values() for alias in names}
    extra = [n for n in checkpoint.names if n not in known]
    if extra:
        raise InputFileError(
            f"{checkpoint.folder} holds {extra[0]!r} ({len(extra)} such tensors), which the model config.json "
            f"builds has no place for; give the config the weights were saved with"
        )


def _head_names(model: Any) -> list[str]:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:
        return []
    return tensor_names(model, module_name(model, head))


def _stored(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict(keep_vars=True)
    return {n: state[n].detach() for n in names}


def _add_manifest(spec: dict[str, Any], name: str, block: nn.Module) -> None:
    part = manifest(block)
    for key in ("layers", "tensors", "modules"):
        spec.setdefault(key, {}).update({f"{name}.{k}": v for k, v in part.get(key, {}).items()})


def _write_config(model: Any, folder: Path) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(folder))


__all__ = ["compact_checkpoint"]
