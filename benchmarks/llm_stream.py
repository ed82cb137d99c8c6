"""Streamed LLM checkpoints (issue 23): a Llama-shape bf16 directory compacted block by block.

    python -m benchmarks.llm_stream --shape 852m [--pickled] [--speed] --out benchmarks/LLM_STREAM.md
    python -m benchmarks.llm_stream --shape 8b --append --out benchmarks/LLM_STREAM.md

Each shape's checkpoint is written with random bf16 weights, shard by shard (never the whole model in
memory): 20, 30 or 40% of every block's FFN neurons zeroed (30% on average, uneven across blocks) and 2 of
the 8 key/value groups (with their query heads) zeroed in every other block. Then, in this one run:
``cp -r`` of the directory (timed), ``compact DIR -o OUT/`` in a child process (wall time and peak RSS from
``/usr/bin/time -v``), optionally the pickled path (``--pickled``: the same model as one ``torch.save``
file, compacted the old way), and optionally (``--speed``) prefill and decode speed of the dense and the
compacted model, interleaved. Targets (852M: < 60 s, < 1.5 GiB; 8B: < 3 GiB, < 3x the copy) are reported,
not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "852m": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000, shard=500 * 10**6),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, shard=5 * 10**9),
}  # fmt: skip
TARGETS = {"852m": {"seconds": 60.0, "rss_gib": 1.5}, "8b": {"rss_gib": 3.0, "copy_ratio": 3.0}}
FFN_ZEROED = (0.2, 0.3, 0.4)  # block i zeroes FFN_ZEROED[i % 3] of its neurons
KV_ZEROED = (1, 3)  # key/value groups zeroed in every other block


def config_of(shape: str) -> Any:
    import transformers

    spec = {k: v for k, v in SHAPES[shape].items() if k != "shard"}
    config = transformers.LlamaConfig(**spec, tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    return config


def write_checkpoint(folder: Path, shape: str) -> dict[str, Any]:
    """The pruned checkpoint, written a tensor at a time; what was zeroed."""
    import transformers

    from compactor.stream.shards import write_shard

    config = config_of(shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    layout = [(k, torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()]
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    zeros = _zeros(config)
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in layout:
        n = 2 * _numel(entry[2])
        if shards[-1] and size + n > SHAPES[shape]["shard"]:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    weight_map = {}
    shapes = {k: s for k, _, s in layout}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / name, shard, lambda key: _tensor(key, shapes[key], zeros))
        weight_map.update({k: name for k, _, _ in shard})
    total = sum(2 * _numel(s) for _, _, s in layout)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return {"params": total // 2, "bytes": total, "shards": len(shards)}


def _zeros(config: Any) -> dict[str, tuple[int, torch.Tensor]]:
    """Per tensor: (dimension, indices) to zero."""
    g = torch.Generator().manual_seed(0)
    inter, hd = config.intermediate_size, config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    out: dict[str, tuple[int, torch.Tensor]] = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        idx = torch.randperm(inter, generator=g)[: int(inter * FFN_ZEROED[i % 3])]
        out[p + "mlp.gate_proj.weight"] = (0, idx)
        out[p + "mlp.up_proj.weight"] = (0, idx)
        out[p + "mlp.down_proj.weight"] = (1, idx)
        if i % 2 == 0:
            kv = torch.tensor([r for k in KV_ZEROED for r in range(k * hd, (k + 1) * hd)])
            q = torch.tensor([r for k in KV_ZEROED for r in range(k * group * hd, (k + 1) * group * hd)])
            out[p + "self_attn.k_proj.weight"] = (0, kv)
            out[p + "self_attn.v_proj.weight"] = (0, kv)
            out[p + "self_attn.q_proj.weight"] = (0, q)
            out[p + "self_attn.o_proj.weight"] = (1, q)
    return out


def _tensor(key: str, shape: tuple[int, ...], zeros: dict[str, tuple[int, torch.Tensor]]) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    t = torch.empty(shape, dtype=torch.bfloat16)
    for rows in torch.split(torch.arange(shape[0]), 4096):  # in slices: no float32 copy of the whole
        t[rows] = (torch.randn((len(rows), *shape[1:]), generator=g) * 0.02).to(torch.bfloat16)
    if key in zeros:
        dim, idx = zeros[key]
        t.index_fill_(dim, idx, 0)
    return t


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def timed_child(argv: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (GiB) of a child process, from ``/usr/bin/time -v``."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))  # type: ignore[union-attr]
    return {"seconds": round(seconds, 1), "rss_gib": round(rss / 2**20, 2)}


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def speed(dense_dir: Path, small_dir: Path, repeats: int) -> dict[str, Any]:
    """Prefill (512 tokens) and decode (batch 1, 128 new tokens) of both models, interleaved."""
    import transformers

    import compactor

    models = {
        "dense": transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval(),  # type: ignore[no-untyped-call]
        "compacted": compactor.load(small_dir),
    }
    ids = torch.randint(0, 32000, (1, 512), generator=torch.Generator().manual_seed(0))
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    with torch.no_grad():
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times[name]["prefill"].append(time.perf_counter() - start)
                start = time.perf_counter()
                model.generate(ids[:, :16], max_new_tokens=128, min_new_tokens=128, do_sample=False)
                times[name]["decode"].append(time.perf_counter() - start)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    out: dict[str, Any] = {"params": params, "repeats": repeats, "threads": torch.get_num_threads()}
    for name in models:
        out[name] = {
            "prefill_s": round(statistics.median(times[name]["prefill"]), 3),
            "decode_tok_s": round(128 / statistics.median(times[name]["decode"]), 2),
        }
    return out


def run(shape: str, work: Path, pickled: bool, do_speed: bool, repeats: int) -> dict[str, Any]:
    src, copy, out = work / "src", work / "copy", work / "out"
    started = time.perf_counter()
    written = write_checkpoint(src, shape)
    result: dict[str, Any] = {"shape": shape, **SHAPES[shape], "checkpoint": written}
    result["write_s"] = round(time.perf_counter() - started, 1)
    free = shutil.disk_usage(work).free
    result["disk_free_gib"] = round(free / 2**30, 1)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(copy)], check=True)
    result["copy_s"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(copy)
    report = work / "report.json"
    result["compact"] = timed_child(
        [sys.executable, "-m", "compactor", str(src), "-o", str(out), "-q", "--report", str(report)]
    )
    details = json.loads(report.read_text())
    result["params_after"] = details["params"]["after"]
    result["logits_error"] = details["logits_error"]
    result["logits_floor"] = details.get("logits_floor")
    result["bytes_after"] = dir_bytes(out)
    result["blocks"] = len(details["blocks"])
    result["block_s_median"] = round(statistics.median(b["seconds"] for b in details["blocks"]), 2)
    result["kv_groups_removed"] = sum(
        1 for b in details["blocks"] if "self_attn.k_proj" in b["widths"]
    ) * len(KV_ZEROED)
    result["copy_ratio"] = round(result["compact"]["seconds"] / max(result["copy_s"], 0.1), 2)
    if pickled:
        result["pickled"] = _pickled(src, work)
    if do_speed:
        result["speed"] = speed(src, out, repeats)
    return result


def _pickled(src: Path, work: Path) -> dict[str, Any]:
    """The path before streaming: the whole model pickled, then ``compact model.pt -o small.pt``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    torch.save(model, work / "model.pt")
    del model
    measured = timed_child([sys.executable, "-m", "compactor", str(work / "model.pt"), "-o", str(work / "small.pt"), "-q",
                            "--example-inputs", str(_tokens(work)), "--time-limit", "0"])  # fmt: skip
    (work / "model.pt").unlink()
    (work / "small.pt").unlink(missing_ok=True)
    return measured


def _tokens(work: Path) -> Path:
    path = work / "tokens.pt"
    ids = torch.randint(0, 32000, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids}, path)
    return path


def render(results: list[dict[str, Any]], commit: str) -> str:
    made = ", ".join(f"`{r.get('commit', commit)}` ({r['shape']})" for r in results)  # each shape's own run
    lines = [
        "# Streamed LLM checkpoints: a Hugging Face directory compacted block by block",
        "",
        f"Generated by `python -m benchmarks.llm_stream` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"compactor at {made}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}. Random bf16 weights; every block loses {', '.join(f'{int(f * 100)}' for f in FFN_ZEROED)}% "
        f"of its FFN neurons in turn, every other block {len(KV_ZEROED)} of its 8 key/value groups.",
        "",
        "| shape | params | shards | cp -r s | compact s | s per block (median) | x copy | peak RSS GiB | params after | size after | logits error | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        targets = TARGETS[r["shape"]]
        met = []
        if "seconds" in targets:
            met.append(
                f"< {targets['seconds']:.0f} s: {'yes' if r['compact']['seconds'] < targets['seconds'] else 'no'}"
            )
        if "rss_gib" in targets:
            met.append(
                f"< {targets['rss_gib']} GiB: {'yes' if r['compact']['rss_gib'] < targets['rss_gib'] else 'no'}"
            )
        if "copy_ratio" in targets:
            met.append(
                f"< {targets['copy_ratio']:.0f}x copy: {'yes' if r['copy_ratio'] < targets['copy_ratio'] else 'no'}"
            )
        allowed = f" (allowed {r['logits_floor']:.2g})" if r.get("logits_floor") else ""
        lines.append(
            f"| {r['shape']} | {r['checkpoint']['params'] / 1e6:,.0f}M | {r['checkpoint']['shards']} | {r['copy_s']} | "
            f"{r['compact']['seconds']} | {r.get('block_s_median', '-')} | {r['copy_ratio']} | {r['compact']['rss_gib']} | "
            f"{r['params_after'] / r['checkpoint']['params']:.3f} | {r['bytes_after'] / r['checkpoint']['bytes']:.3f} | "
            f"{r['logits_error']:.2g}{allowed} | {'; '.join(met)} |"
        )
    for r in results:
        if "pickled" in r:
            p = r["pickled"]
            lines += ["", f"{r['shape']}, the pickled path in the same run (`torch.save(model)`, then `compact model.pt`): "
                      f"{p['seconds']} s and {p['rss_gib']} GiB peak RSS, against {r['compact']['seconds']} s and "
                      f"{r['compact']['rss_gib']} GiB streamed."]  # fmt: skip
        if "speed" in r:
            s = r["speed"]
            ratio = s["params"]["compacted"] / s["params"]["dense"]
            lines += [
                "",
                f"{r['shape']}, what the user gains (CPU, {s['threads']} threads, batch 1, median of {s['repeats']} interleaved rounds; "
                f"parameter ratio {ratio:.3f}):",
                "",
                "| model | prefill 512 tokens s | decode 128 tokens, tokens/s |",
                "|---|---:|---:|",
                f"| dense | {s['dense']['prefill_s']} | {s['dense']['decode_tok_s']} |",
                f"| compacted | {s['compacted']['prefill_s']} | {s['compacted']['decode_tok_s']} |",
                f"| ratio | {s['dense']['prefill_s'] / s['compacted']['prefill_s']:.2f}x | "
                f"{s['compacted']['decode_tok_s'] / s['dense']['decode_tok_s']:.2f}x |",
            ]
        lines += [
            "",
            f"{r['shape']} raw: `{json.dumps({k: v for k, v in r.items() if k not in ('speed',)})}`",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), action="append", required=True)
    p.add_argument("--pickled", action="store_true", help="also the pickled path (852m: ~4 min, ~16 GiB)")
    p.add_argument("--speed", action="store_true", help="also prefill and decode, dense vs compacted")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--out", default="benchmarks/LLM_STREAM.md")
    p.add_argument("--json", default="benchmarks/llm_stream.json")
    args = p.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else []
    results = [r for r in previous if r["shape"] not in args.shape]
    for shape in args.shape:
        work = Path(tempfile.mkdtemp(prefix=f"llm-{shape}-", dir=args.work))
        try:
            results.append({**run(shape, work, args.pickled, args.speed, args.repeats), "commit": commit})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(results[-1]), flush=True)
    results.sort(key=lambda r: list(SHAPES).index(r["shape"]))
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    Path(args.out).write_text(render(results, commit))


if __name__ == "__main__":
    main()
