"""A transformers model pickled with ``torch.save`` while the ``kernels`` package is installed (what pip
installs beside transformers 5.x today) names ``kernels._internals.layer.layer._rebuild_kernel_func``.

The safe loader rebuilds those wrappers from already imported code, never importing what the file names; a
model saved without ``kernels`` gets the wrappers the installed transformers reads; one saved with them is
read where ``kernels`` is missing; hub-kernelized wrappers and crafted rebuild calls are refused in one
line, and the module they name is never imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import compactor

pytest.importorskip("transformers")
pytest.importorskip("kernels")

# Before transformers is imported: its decorators then leave the functions plain, as without ``kernels``.
NO_KERNELS = "import transformers.utils.import_utils as iu; iu.is_kernels_available = lambda *a, **k: False\n"

MAKE = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :20] = 0  # FFN channels 0..19 no longer read
    ids = torch.arange(16).reshape(2, 8) % 100
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    wrappers = sum(bool(vars(m).get("_kernel_funcs")) for m in model.modules())
    torch.save(model, sys.argv[1])
    torch.save({"ids": ids, "logits": logits, "wrappers": wrappers}, sys.argv[1] + ".expected")
    """
)


def _python(code: str, *args: str, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {**os.environ, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    r = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compactor.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kernels")
    _python(MAKE, "with_kernels.pt", cwd=d)
    _python(NO_KERNELS + MAKE, "without_kernels.pt", cwd=d)
    return d


def _expected(work: Path, name: str) -> dict[str, torch.Tensor | int]:
    out: dict[str, torch.Tensor | int] = torch.load(work / f"{name}.expected", weights_only=True)
    return out


def test_both_files_are_what_the_issue_describes(work: Path) -> None:
    """The file written with kernels names the rebuild function; the one without does not."""
    assert b"_rebuild_kernel_func" in (work / "with_kernels.pt").read_bytes()
    assert b"_rebuild_kernel_func" not in (work / "without_kernels.pt").read_bytes()
    assert _expected(work, "with_kernels.pt")["wrappers"] == 2  # one per attention module
    assert _expected(work, "without_kernels.pt")["wrappers"] == 0


@pytest.mark.parametrize(
    ("name", "note"),
    [
        (
            "with_kernels.pt",
            "note: with_kernels.pt: 2 hub-kernel wrapper(s) of apply_rotary_pos_emb (transformers' "
            "use_kernel_forward_from_hub) rebuilt from the installed transformers and kernels; nothing the file "
            "names was imported or fetched for them, and verification compares the model",
        ),
        (
            "without_kernels.pt",
            "note: without_kernels.pt: 2 module(s) saved without the kernels package given the hub-kernel "
            "wrappers that the installed transformers reads in their forward (as its constructor makes them)",
        ),
    ],
)
def test_a_pickled_llama_compacts_without_trust_pickle(work: Path, name: str, note: str) -> None:
    out = f"small_{name}"
    r = _cli(name, "-o", out, "--input-shape", "2,8:int64", cwd=work)
    assert r.returncode == 0, r.stderr
    assert note in r.stderr.splitlines()
    assert "Traceback" not in r.stderr
    small = compactor.load(work / out)
    assert [layer.mlp.down_proj.in_features for layer in small.model.layers] == [44, 44]
    assert [layer.mlp.gate_proj.out_features for layer in small.model.layers] == [44, 44]
    expected = _expected(work, name)
    with torch.no_grad():
        logits = small(input_ids=expected["ids"], use_cache=False).logits
    assert torch.allclose(logits, expected["logits"], atol=1e-5, rtol=1e-5)


def test_the_loaded_wrappers_are_instances_of_the_installed_classes(work: Path) -> None:
    """Each attention module owns a fresh wrapper of the class transformers decorated its function with."""
    import transformers.models.llama.modeling_llama as llama

    model = compactor.load(work / "with_kernels.pt")
    funcs = [vars(m)["_kernel_funcs"] for m in model.modules() if vars(m).get("_kernel_funcs")]
    assert len(funcs) == 2 and all(set(f) == {"rotary_pos_emb"} for f in funcs)
    wrappers = [f["rotary_pos_emb"] for f in funcs]
    assert all(type(w) is type(llama.apply_rotary_pos_emb) for w in wrappers)
    assert wrappers[0] is not wrappers[1] and all(w is not llama.apply_rotary_pos_emb for w in wrappers)


def test_a_file_saved_with_kernels_loads_where_kernels_is_not_used(work: Path) -> None:
    """torch's own full unpickling fails there (the file imports kernels' rebuild function, whose result the
    plain transformers does not read); compactor's loader drops the wrappers and the logits are the saved ones."""
    code = NO_KERNELS + textwrap.dedent(
        """
        import sys, torch, compactor
        model = compactor.load(sys.argv[1])
        expected = torch.load(sys.argv[1] + ".expected", weights_only=True)
        with torch.no_grad():
            logits = model(input_ids=expected["ids"], use_cache=False).logits
        left = sum("_kernel_funcs" in vars(m) for m in model.modules())
        print(torch.equal(logits, expected["logits"]), left)
        """
    )
    assert _python(code, "with_kernels.pt", cwd=work).split() == ["True", "0"]


HUB = "open('hub_imported.txt', 'w').write('ran')\n\ndef rotary(self, *args, **kwargs):\n    return None\n"

KERNELIZE = textwrap.dedent(
    """
    import sys, types, torch
    import fakehub
    model = torch.load(sys.argv[1], weights_only=False)
    for m in model.modules():
        for wrapper in (vars(m).get("_kernel_funcs") or {}).values():
            wrapper.forward = types.MethodType(fakehub.rotary, wrapper)  # what kernelize() does
    torch.save(model, sys.argv[2])
    """
)


def test_a_kernelized_model_is_refused_without_importing_the_hub_code(work: Path) -> None:
    (work / "fakehub.py").write_text(HUB)
    _python(KERNELIZE, "with_kernels.pt", "kernelized.pt", cwd=work, pythonpath=work)
    (work / "hub_imported.txt").unlink()
    r = _cli("kernelized.pt", "-o", "kernelized_out.pt", "--input-shape", "2,8:int64", cwd=work)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "error: kernelized.pt holds a transformers model with hub kernels attached (kernels' "
        "_rebuild_kernel_func, and fakehub.rotary, a function it would import); refusing to load it: pass "
        "--trust-pickle (Python: trust_pickle=True) only if you trust the file, or save the model with "
        "model.save_pretrained(dir) and give the directory"
    ]
    assert not (work / "hub_imported.txt").exists() and not (work / "kernelized_out.pt").exists()


CRAFT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from kernels._internals.layer.layer import _rebuild_kernel_func

    class Call:
        def __reduce__(self):
            return (_rebuild_kernel_func, (sys.argv[2], "f"))

    model = nn.Sequential(nn.Linear(4, 4))
    model[0].hook = Call()
    torch.save(model, sys.argv[1])
    """
)


@pytest.mark.parametrize("module", ["evilmod", "torch.nn.modules.linear"])
def test_a_crafted_rebuild_call_is_refused_and_imports_nothing(work: Path, module: str) -> None:
    (work / "evilmod.py").write_text("open('evil_imported.txt', 'w').write('ran')\nf = print\n")
    path = f"craft_{module.partition('.')[0]}.pt"
    _python(CRAFT, path, module, cwd=work)
    r = _cli(path, "-o", "craft_out.pt", "--input-shape", "1,4", cwd=work)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"error: {path} rebuilds a kernel function {module}.f while loading, which torch.save of a "
        f"transformers model never does (it names a function of a model module the file also needs); refusing "
        f"to load it: pass "
        f"--trust-pickle (Python: trust_pickle=True) only if you trust the file, or save the model with "
        f"model.save_pretrained(dir) and give the directory"
    ]
    assert not (work / "evil_imported.txt").exists() and not (work / "craft_out.pt").exists()
