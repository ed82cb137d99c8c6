"""Outputs that deploy, through the real CLI and in fresh processes: exports that run at any batch size and
sequence length, a .pt2 that needs nothing but torch, Hugging Face directories that from_pretrained loads,
one compactor.load, and a report that tells the truth about files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import compactor

pytest.importorskip("transformers")

MAKE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.nn.utils import prune
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
    from transformers import ViTConfig, ViTForImageClassification
    import deploy_models as dm

    def dead_rows(layer, n):
        mask = torch.ones_like(layer.weight)
        mask[:n] = 0
        prune.custom_from_mask(layer, "weight", mask)

    def bert(counts):
        torch.manual_seed(0)
        m = BertForSequenceClassification(
            BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50)
        ).eval()
        for layer, n in zip(m.bert.encoder.layer, counts):
            dead_rows(layer.intermediate.dense, n)
        return m

    torch.save(bert([16, 16]), "bert_even.pt")
    torch.save(bert([16, 8]), "bert_uneven.pt")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=64, vocab_size=50)
    ).eval()
    for layer in llama.model.layers:
        dead_rows(layer.mlp.gate_proj, 24)
    torch.save(llama, "llama.pt")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=64, vocab_size=50)
    ).eval()
    for layer, n in zip(llama.model.layers, (24, 16)):
        dead_rows(layer.mlp.gate_proj, n)
    torch.save(llama, "llama_uneven.pt")
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                  patch_size=8, num_labels=3)
    ).eval()
    for name, module in vit.named_modules():
        if name.endswith("mlp.fc1"):
            dead_rows(module, 16)
    torch.save(vit, "vit.pt")
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                  patch_size=8, num_labels=3)
    ).eval()
    fc1 = [module for name, module in vit.named_modules() if name.endswith("mlp.fc1")]
    for module, n in zip(fc1, (16, 8)):
        dead_rows(module, n)
    torch.save(vit, "vit_uneven.pt")
    torch.save({"input_ids": torch.randint(0, 50, (1, 32))}, "ids.pt")
    torch.save(dm.conv(), "conv.pt")
    torch.save(dm.FixedBatch(), "fixed.pt")
    torch.save({"state_dict": dm.conv().state_dict(), "epoch": 3}, "last.ckpt")
    """
)

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.nn.utils import prune

    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(1), nn.Linear(4 * 6 * 6, 5))

    def conv():
        torch.manual_seed(0)
        m = build()
        mask = torch.ones_like(m[0].weight)
        mask[:3] = 0
        prune.custom_from_mask(m[0], "weight", mask)
        with torch.no_grad():
            m[0].bias[:3] = 0.0
        return m.eval()

    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(x.view(1, -1))
    """
)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compactor.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def fresh(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a new interpreter that has imported nothing of ours."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("deploy")
    (d / "deploy_models.py").write_text(MODELS)
    subprocess.run([sys.executable, "-c", MAKE], cwd=d, check=True, env={**os.environ, "PYTHONPATH": str(d)})
    return d


# --- exports that run at any batch size -----------------------------------------------------------------
def test_pt2_and_onnx_run_at_another_batch_size_with_nothing_but_torch(work: Path) -> None:
    r = cli(
        "conv.pt",
        "-o",
        "conv.pt2",
        "--onnx",
        "conv.onnx",
        "--input-shape",
        "1,3,8,8",
        "--report",
        "conv.json",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((work / "conv.json").read_text())
    assert report["output"]["export"]["dynamic"] == {"input_0": [0]}
    assert report["onnx"]["export"]["dynamic"] == {"input_0": [0]}
    assert report["file_bytes"]["after"] == (work / "conv.pt2").stat().st_size == report["output"]["bytes"]
    done = fresh(
        """
        import sys, torch, onnxruntime
        x = torch.randn(4, 3, 8, 8)
        y = torch.export.load("conv.pt2").module()(x)
        s = onnxruntime.InferenceSession("conv.onnx")
        z = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
        assert not any(m.startswith(("compactor", "deploy_models")) for m in sys.modules)
        torch.save({"x": x, "y": y, "z": torch.from_numpy(z)}, "conv_out.pt")
        """,
        work,
    )
    assert done.returncode == 0, done.stderr
    out = torch.load(work / "conv_out.pt")
    small = torch.export.load(str(work / "conv.pt2")).module()
    masked = torch.load(work / "conv.pt", weights_only=False)
    assert out["y"].shape == (4, 5)
    torch.testing.assert_close(out["y"], masked(out["x"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["z"], masked(out["x"]), rtol=0, atol=1e-4)
    assert torch.equal(small(out["x"]), out["y"])


def test_static_shapes_keep_the_example_shape(work: Path) -> None:
    r = cli("conv.pt", "-o", "static.pt2", "--input-shape", "1,3,8,8", "--static-shapes", "-q", cwd=work)
    assert r.returncode == 0, r.stderr
    done = fresh("import torch; torch.export.load('static.pt2').module()(torch.randn(4, 3, 8, 8))", work)
    assert done.returncode != 0 and "to be equal to 1, but got 4" in done.stderr


def test_a_dimension_the_model_fixes_stays_static_and_is_said(work: Path) -> None:
    r = cli("fixed.pt", "-o", "fixed.pt2", "--input-shape", "1,6", "--report", "fixed.json", "-q", cwd=work)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: fixed.pt2: the dynamic-shape export failed (")
    assert notes[0].endswith("): exported at the example's shapes")
    assert json.loads((work / "fixed.json").read_text())["output"]["export"]["fixed_by_model"] == {
        "input_0": [0]
    }


def test_a_bert_pt2_runs_at_another_length_without_transformers_and_holds_no_inputs(work: Path) -> None:
    r = cli(
        "bert_even.pt",
        "-o",
        "bert.pt2",
        "--example-inputs",
        "ids.pt",
        "--report",
        "bert.json",
        "-q",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr
    export = json.loads((work / "bert.json").read_text())["output"]["export"]
    assert export["dynamic"] == {"input_ids": [0, 1]} and export["outputs"] == "dict"
    done = fresh(
        """
        import sys, torch
        out = torch.export.load("bert.pt2").module()(input_ids=torch.randint(0, 50, (3, 16)))
        assert sorted(out) == ["logits"] and out["logits"].shape == (3, 2), out
        assert not any(m.startswith(("transformers", "compactor")) for m in sys.modules)
        """,
        work,
    )
    assert done.returncode == 0, done.stderr
    r = cli(
        "bert_even.pt",
        "-o",
        "bert_kept.pt2",
        "--example-inputs",
        "ids.pt",
        "--keep-example-inputs",
        "-q",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr
    assert torch.export.load(str(work / "bert.pt2")).example_inputs is None
    assert torch.export.load(str(work / "bert_kept.pt2")).example_inputs is not None


# --- Hugging Face directories -----------------------------------------------------------------------------
FROM_PRETRAINED = """
import sys, torch, transformers
model = transformers.{auto}.from_pretrained("{folder}").eval()
inputs = {inputs}
assert "compactor" not in sys.modules
torch.save({{"inputs": inputs, "out": model(**inputs)[0], "config": model.config.to_dict()}}, "{folder}.out.pt")
"""


@pytest.mark.parametrize(
    ("model", "auto", "inputs", "field", "width"),
    [
        ("bert_even", "AutoModelForSequenceClassification", "torch.load('ids.pt')", "intermediate_size", 48),
        ("llama", "AutoModelForCausalLM", "torch.load('ids.pt')", "intermediate_size", 40),
        (
            "vit",
            "AutoModelForImageClassification",
            "{'pixel_values': torch.randn(2, 3, 16, 16)}",
            "intermediate_size",
            48,
        ),
    ],
)
def test_even_widths_are_stated_in_the_config_and_from_pretrained_reloads_them(
    work: Path, model: str, auto: str, inputs: str, field: str, width: int
) -> None:
    example = ["--example-inputs", "ids.pt"] if "ids" in inputs else ["--input-shape", "2,3,16,16"]
    r = cli(f"{model}.pt", "-o", f"{model}_dir/", *example, "--report", f"{model}_dir.json", "-q", cwd=work)
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors"} <= set(
        os.listdir(work / f"{model}_dir")
    )  # (+ generation_config.json)
    mask = os.umask(0)
    os.umask(mask)
    assert (work / f"{model}_dir").stat().st_mode & 0o777 == 0o777 & ~mask  # as a directory made by hand
    assert (work / f"{model}_dir" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    hf = json.loads((work / f"{model}_dir.json").read_text())["output"]["hf"]
    assert hf["layout"] == "config" and hf["fields"] == f"{field}={width}"
    assert hf["load"] == f"transformers.{auto}.from_pretrained(dir)"
    done = fresh(FROM_PRETRAINED.format(auto=auto, folder=f"{model}_dir", inputs=inputs), work)
    assert done.returncode == 0, done.stderr
    got = torch.load(work / f"{model}_dir.out.pt", weights_only=False)
    assert got["config"][field] == width
    masked = torch.load(work / f"{model}.pt", weights_only=False).eval()
    torch.testing.assert_close(got["out"], masked(**got["inputs"])[0], rtol=0, atol=1e-5)


UNEVEN_CHECK = """
import torch, compactor
model = compactor.load("{folder}")
inputs = {inputs}
assert not model.training
widths = [m.out_features for n, m in model.named_modules() if n.endswith({layer!r})]
torch.save({{"inputs": inputs, "out": model(**inputs)[0], "widths": widths}}, "{folder}.out.pt")
"""


@pytest.mark.parametrize(
    ("model", "inputs", "layer", "widths"),
    [
        ("bert_uneven", "torch.load('ids.pt')", "intermediate.dense", [48, 56]),
        ("llama_uneven", "torch.load('ids.pt')", "mlp.gate_proj", [40, 48]),
        ("vit_uneven", "{'pixel_values': torch.randn(2, 3, 16, 16)}", "mlp.fc1", [48, 56]),
    ],
)
def test_uneven_widths_are_written_with_the_manifest_and_compactor_load_rebuilds_them(
    work: Path, model: str, inputs: str, layer: str, widths: list[int]
) -> None:
    example = ["--example-inputs", "ids.pt"] if "ids" in inputs else ["--input-shape", "2,3,16,16"]
    folder = f"{model}_dir"
    r = cli(
        f"{model}.pt", "-o", folder, "--format", "hf", *example, "--report", f"{folder}.json", "-q", cwd=work
    )
    assert r.returncode == 0, r.stderr
    hf = json.loads((work / f"{folder}.json").read_text())["output"]["hf"]
    assert hf == {
        "layout": "manifest",
        "why": f"intermediate_size differs across layers ({', '.join(map(str, widths))}); --uniform evens it out",
        "load": "compactor.load(dir)",
        "bytes": sum(p.stat().st_size for p in (work / folder).iterdir()),
    }
    done = fresh(UNEVEN_CHECK.format(folder=folder, inputs=inputs, layer=layer), work)
    assert done.returncode == 0, done.stderr
    got = torch.load(work / f"{folder}.out.pt", weights_only=False)
    assert got["widths"] == widths
    masked = torch.load(work / f"{model}.pt", weights_only=False).eval()
    torch.testing.assert_close(got["out"], masked(**got["inputs"])[0], rtol=0, atol=1e-5)


def test_uniform_keeps_the_fewest_zero_channels_that_even_the_widths(work: Path) -> None:
    r = cli(
        "bert_uneven.pt",
        "-o",
        "uniform_dir/",
        "--uniform",
        "--example-inputs",
        "ids.pt",
        "--report",
        "uniform.json",
        "-q",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((work / "uniform.json").read_text())
    assert (
        report["output"]["hf"]["layout"] == "config"
        and report["output"]["hf"]["fields"] == "intermediate_size=56"
    )
    assert report["channels"]["fates"]["kept: --uniform"] == 8  # layer 0 lost 16, layer 1 only 8
    done = fresh(
        FROM_PRETRAINED.format(
            auto="AutoModelForSequenceClassification", folder="uniform_dir", inputs="torch.load('ids.pt')"
        ),
        work,
    )
    assert done.returncode == 0, done.stderr


def test_a_directory_needs_a_transformers_model(work: Path) -> None:
    r = cli("conv.pt", "-o", "conv_dir/", "--input-shape", "1,3,8,8", cwd=work)
    assert r.returncode == 2 and not (work / "conv_dir").exists()
    assert r.stderr.strip().startswith(
        "error: -o conv_dir: a Hugging Face directory needs a transformers model"
    )


# --- one loader, and small things -------------------------------------------------------------------------
def test_compactor_load_returns_every_format_in_eval_mode(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(work)
    for out in ("load.pt", "load.pth", "load.pt2", "load.safetensors"):
        r = cli("conv.pt", "-o", out, "--input-shape", "1,3,8,8", "-q", cwd=work)
        assert r.returncode == 0, r.stderr
    masked = torch.load(work / "conv.pt", weights_only=False).eval()
    x = torch.randn(2, 3, 8, 8)
    arch = "deploy_models:build"
    for model in (
        compactor.load("load.pt"),
        compactor.load("load.pth"),
        compactor.load("load.pt2"),
        compactor.load("load.safetensors", arch=arch),
    ):
        assert not model.training
        torch.testing.assert_close(model(x), masked(x), rtol=0, atol=1e-5)


def test_the_file_size_after_is_the_file_written(work: Path) -> None:
    r = cli(
        "conv.pt",
        "-o",
        "sparse.safetensors",
        "--sparse-storage",
        "--input-shape",
        "1,3,8,8",
        "--report",
        "sparse.json",
        "-q",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((work / "sparse.json").read_text())
    assert report["file_bytes"]["after"] == (work / "sparse.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["conv.pt", "-o", "x.pt", "--onnx", "x.pt2", "--input-shape", "1,3,8,8"],
            "error: --onnx x.pt2: give a path ending in .onnx",
        ),
        (
            ["last.ckpt", "-o", "x.pt", "--input-shape", "1,3,8,8"],
            "error: last.ckpt is a checkpoint (weights and training state, not a model); say which architecture",
        ),
        (
            ["load.safetensors", "-o", "x.pt", "--input-shape", "1,3,8,8"],
            "error: load.safetensors holds weights only; say which architecture they belong to: --arch module:callable",
        ),
    ],
)
def test_careless_inputs_get_the_flag_to_add(work: Path, args: list[str], message: str) -> None:
    (work / "load.safetensors").exists() or cli(
        "conv.pt", "-o", "load.safetensors", "--input-shape", "1,3,8,8", "-q", cwd=work
    )
    r = cli(*args, cwd=work)
    assert r.returncode == 2 and r.stderr.strip().startswith(message), r.stderr
    assert not (work / "x.pt").exists()


def test_a_guessed_input_shape_is_said(work: Path) -> None:
    r = cli("conv.pt", "-o", "guessed.pt", cwd=work)  # 32x32 is not what this model takes: the guess is named
    assert (
        r.returncode == 2 and "[(1, 3, 32, 32):float32] (a guess: no example inputs were given)" in r.stderr
    )
    r = cli("fixed.pt", "-o", "guessed.pt", "--report", "guessed.json", "-q", cwd=work)
    assert r.returncode == 0, r.stderr
    line = "warning: no example inputs were given: compacted and verified on a guessed input of shape 1,6 (fc (Linear) reads 6 channels)"
    assert line in r.stderr
    assert any(
        w.startswith(line.removeprefix("warning: "))
        for w in json.loads((work / "guessed.json").read_text())["warnings"]
    )


def test_the_demo_leaves_nothing_behind_and_says_removed_once(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "compactor.cli", "--demo"],
        capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == []
    assert (
        "zeroed channels (zero in every layer that writes them, or read by none): 64, of which 43 removed, 19 "
        "merged, 2 carrier\npruned filters (all-zero output rows): 64, of which 62 removed (97%), 2 kept: 2 carrier\n"
        "  blocks.0.conv1: 1 of 16 kept, carrier (row 17): kept to carry the merged constant channels\n"
    ) in r.stdout


def test_a_quick_benchmark_never_writes_the_committed_report() -> None:
    from benchmarks.__main__ import ROOT, default_out

    assert default_out(quick=False) == ROOT / "REPORT.md"
    assert default_out(quick=True).parent != ROOT


def test_a_model_of_one_dimensional_inputs() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].weight[:5] = 0.0
        model[0].bias[:5] = -1.0  # dead neurons: ReLU gives exactly 0
    x = torch.randn(8)
    small, report = compactor.compact(model, x)
    assert small[0].out_features == 27 and small[2].in_features == 27 and report.fates["removed"] == 5
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)
