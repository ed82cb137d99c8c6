"""Hostile files and careless models (issue 25): no code runs from a file, a damaged or hostile file fails in
one line (a :class:`~compactor.errors.CompactorError` from the API, ``error:`` and exit 2 from the CLI),
nothing is half-written, and models built in unusual ways compact or are refused, never crash.

Each hostile file carries a payload that would leave a marker file if it ran; the marker must not appear."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.errors import (
    CompactorError,
    InputFileError,
    StateDictError,
    UnsafeCodeError,
    UnsafePickleError,
)


def _cli(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compactor.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(cwd)},
    )


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


class _Marker:
    """A pickle payload: unpickled with full pickle, it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.path))}",))


# --- .pt2: the members torch.export.load would unpickle ---------------------------------------------------
def _pt2(tmp_path: Path) -> Path:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    path = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), str(path))
    return path


def _rewrite(
    src: Path, dst: Path, change: dict[str, bytes | None], add: dict[str, bytes] | None = None
) -> None:
    """A copy of the zip ``src`` with members (by the part after the archive's root folder) replaced."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].partition("/")[0]
        for info in zin.infolist():
            rest = info.filename.partition("/")[2]
            data = change.get(rest, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
        for rest, data in (add or {}).items():
            zout.writestr(f"{root}/{rest}", data)


def _pickled(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_pt2_whose_sample_inputs_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    hostile = tmp_path / "sample.pt2"
    _rewrite(_pt2(tmp_path), hostile, {"data/sample_inputs/model.pt": _pickled(_Marker(marker))})
    with pytest.raises(UnsafePickleError) as e:
        compactor.load(hostile)
    assert str(e.value).startswith(
        f"{hostile}: its member good/data/sample_inputs/model.pt is a pickle that needs more than tensors "
        f"(unsupported global posix.system); refusing to load it"
    )
    assert "\n" not in str(e.value) and not marker.exists()
    code = "import sys, torch\ntry:\n    torch.export.load(sys.argv[1])\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code, str(hostile)], capture_output=True, timeout=120)
    assert marker.exists()  # the payload is live: torch.export.load alone runs it


def test_a_pt2_weight_stored_as_a_hostile_pickle_is_refused(tmp_path: Path) -> None:
    good = _pt2(tmp_path)
    marker = tmp_path / "ran.txt"
    with zipfile.ZipFile(good) as z:
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(z.read(name))
    first = next(iter(config["config"].values()))
    first.update(use_pickle=True, path_name="weight_evil")
    hostile = tmp_path / "weight.pt2"
    _rewrite(
        good,
        hostile,
        {"data/weights/model_weights_config.json": json.dumps(config).encode()},
        {"data/weights/weight_evil": _pickled(_Marker(marker))},
    )
    with pytest.raises(UnsafePickleError, match="its member good/data/weights/weight_evil is a pickle"):
        compactor.load(hostile)
    assert not marker.exists()


def test_a_pt2_with_a_custom_object_or_a_broken_config_fails_in_one_line(tmp_path: Path) -> None:
    good = _pt2(tmp_path)
    custom = tmp_path / "custom.pt2"
    config = {"config": {"obj": {"path_name": "custom_obj_0", "use_pickle": False}}}
    _rewrite(good, custom, {"data/constants/model_constants_config.json": json.dumps(config).encode()})
    with pytest.raises(UnsafePickleError, match="holds a custom object obj"):
        compactor.load(custom)
    broken = tmp_path / "broken.pt2"
    _rewrite(good, broken, {"data/weights/model_weights_config.json": b'{"config": [1, 2]}'})
    with pytest.raises(InputFileError, match=r"is not a torch\.export payload config"):
        compactor.load(broken)


def test_a_good_pt2_loads_and_runs(tmp_path: Path) -> None:
    model = compactor.load(_pt2(tmp_path))
    assert tuple(model(torch.randn(2, 4)).shape) == (2, 2)


# --- Hugging Face directories: auto_map means code from the directory ------------------------------------
def test_a_directory_with_auto_map_is_refused_without_asking(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "remote"
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    transformers.BertModel(config).save_pretrained(str(folder))
    spec = json.loads((folder / "config.json").read_text())
    spec.update(architectures=["EvilModel"], auto_map={"AutoModel": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(spec))
    (folder / "modeling_evil.py").write_text("open('evil_ran.txt', 'w').write('ran')\nEvilModel = None\n")
    code = "import compactor, sys\ntry:\n    compactor.load(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    r = subprocess.run(
        [sys.executable, "-c", code, str(folder)], cwd=tmp_path, input="y\n", capture_output=True, text=True
    )
    assert r.stdout.startswith(
        f"UnsafeCodeError {folder}/config.json has auto_map (AutoModel: modeling_evil.EvilModel): the model's "
        f"code is in the directory"
    ), r.stdout + r.stderr
    assert "trust_remote_code=True" in r.stdout and "[y/N]" not in r.stdout + r.stderr
    assert not (tmp_path / "evil_ran.txt").exists() and not (folder / "evil_ran.txt").exists()
    assert issubclass(UnsafeCodeError, CompactorError)


def _hf_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A plain ``save_pretrained`` directory and one compactor wrote with its manifest (uneven widths)."""
    transformers = pytest.importorskip("transformers")
    from compactor.io.save import save_output

    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    plain = tmp_path / "plain"
    model.save_pretrained(str(plain))
    with torch.no_grad():
        for layer, rows in zip(model.encoder.layer, (8, 4)):
            layer.intermediate.dense.weight[:rows] = 0
            layer.intermediate.dense.bias[:rows] = 0
    ids = torch.arange(8).reshape(1, 8)
    small, _ = compactor.compact(model, ids)
    manifest = tmp_path / "manifest"
    save_output(small, manifest, ids, format="hf")
    return plain, manifest


@pytest.mark.parametrize(
    ("layout", "change", "message"),
    [
        ("manifest", {"model_type": "no-such-model"}, "does not build BertModel"),
        ("plain", {"architectures": ["AutoTokenizer"]}, "names no transformers model class"),
        ("plain", {"architectures": ["set_seed"]}, "names no transformers model class"),
        ("manifest", {"architectures": [3]}, "names no transformers model class"),
    ],
)
def test_a_config_that_names_no_model_is_a_compactor_error(
    tmp_path: Path, layout: str, change: dict[str, object], message: str
) -> None:
    plain, manifest = _hf_dirs(tmp_path)
    folder = manifest if layout == "manifest" else plain
    assert (folder / "model.safetensors").exists()
    spec = json.loads((folder / "config.json").read_text())
    spec.update(change)
    (folder / "config.json").write_text(json.dumps(spec))
    with pytest.raises(InputFileError, match=message):
        compactor.load(folder)


# --- safetensors: manifests and sparse indexes are checked before anything is allocated ------------------
class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def _saved(tmp_path: Path, sparse: bool) -> Path:
    from compactor.io.save import save_output
    from compactor.io.sparse import save_sparse

    torch.manual_seed(0)
    model = _Scaled().eval()
    with torch.no_grad():
        model.fc.weight[:, :6] = 0  # sparse enough to be stored as values + mask
    path = tmp_path / ("sparse.safetensors" if sparse else "dense.safetensors")
    if sparse:
        save_sparse(model, path)
    else:
        save_output(model, path, torch.randn(2, 8), format="safetensors")
    return path


def _tamper(path: Path, key: str, edit: object) -> Path:
    """A copy of ``path`` whose metadata ``key`` is ``edit(parsed JSON)`` (or the string ``edit``), and
    whose tensors are changed by ``tensors`` where given."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if callable(edit):
        result = edit(json.loads(metadata[key]), tensors)
        metadata[key] = result if isinstance(result, str) else json.dumps(result)
    else:
        metadata[key] = str(edit)
    out = path.with_name("tampered_" + path.name)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _set(path: list[str], value: object) -> object:
    def edit(spec: dict[str, object], tensors: dict[str, torch.Tensor]) -> dict[str, object]:
        node: dict[str, object] = spec
        for key in path[:-1]:
            node = node[key]  # type: ignore[assignment]
        node[path[-1]] = value
        return spec

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set(["tensors", "scale"], [2**23, 2**23]),
            "the manifest gives 'scale' the shape [8388608, 8388608]",
        ),
        (_set(["layers", "fc"], [1, 2]), "layer 'fc' is not a JSON object"),
        (_set(["layers", "fc", "out"], "8"), "layer 'fc' out is '8', not a count"),
        (_set(["layers", "fc", "bias"], [2**46]), "the manifest gives 'fc.bias' the shape [70368744177664]"),
        (_set(["layers"], "all"), "the manifest's layers is not a JSON object"),
        ("{not json", "the compactor manifest is not valid JSON"),
        (
            _set(["modules"], {"fc": {"__class__": 1}}),
            "module 'fc' sets '__class__', which is not a head count compactor records",
        ),
        (
            _set(["modules"], {"fc": {"num_key_value_groups": "2"}}),
            "module 'fc' attribute num_key_value_groups is '2', not a count",
        ),
    ],
)
def test_a_hostile_dense_manifest_is_one_error(tmp_path: Path, edit: object, message: str) -> None:
    bad = _tamper(_saved(tmp_path, sparse=False), "compactor.manifest", edit)
    with pytest.raises(InputFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compactor.load(bad, arch=_Scaled)


def test_a_manifest_head_count_the_architecture_lacks_is_one_error(tmp_path: Path) -> None:
    """Head counts (``modules``) are set only where the architecture has them, and never above its own."""
    bad = _tamper(
        _saved(tmp_path, sparse=False),
        "compactor.manifest",
        _set(["modules"], {"fc": {"num_key_value_groups": 2}}),
    )
    with pytest.raises(StateDictError, match="module 'fc' has num_key_value_groups=2 in the file but None"):
        compactor.load(bad, arch=_Scaled)


def _sparse_edit(change: str) -> object:
    def edit(info: dict[str, object], tensors: dict[str, torch.Tensor]) -> object:
        sparse = info["sparse"]
        assert isinstance(sparse, dict) and "fc.weight" in sparse
        if change == "huge":
            sparse["fc.weight"] = [2**25, 2**25]  # 2**50 elements
        elif change == "few values":
            tensors["fc.weight::values"] = tensors["fc.weight::values"][:-3].clone()
        elif change == "tied to nothing":
            info["tied"] = {"fc.bias": "nothing"}
        elif change == "shape of strings":
            sparse["fc.weight"] = ["8", "8"]
        elif change == "not json":
            return "{[oops"
        return info

    return edit


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("huge", "sparse tensor 'fc.weight' of shape [33554432, 33554432] has a mask of 8 bytes"),
        ("few values", "sparse tensor 'fc.weight' has 13 values for 16 mask bits"),
        ("tied to nothing", "tied tensor 'fc.bias' names 'nothing', which the file does not hold"),
        ("shape of strings", "sparse tensor 'fc.weight' is '8', not a count"),
        ("not json", "the sparse index is not valid JSON"),
    ],
)
def test_a_hostile_sparse_index_is_one_error(tmp_path: Path, change: str, message: str) -> None:
    bad = _tamper(_saved(tmp_path, sparse=True), "compactor.sparse", _sparse_edit(change))
    with pytest.raises(InputFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compactor.load(bad, arch=_Scaled)


def test_the_untampered_files_load_exactly(tmp_path: Path) -> None:
    for sparse in (False, True):
        model = compactor.load(_saved(tmp_path, sparse), arch=_Scaled)
        assert int((model.fc.weight == 0).sum()) == 48 and torch.equal(model.scale, torch.ones(8))


# --- data safety: the input may go away; a failure leaves -o as it was ----------------------------------
USER_MODULE = textwrap.dedent(
    """
    import os, shutil
    import torch
    from torch import nn


    class Vanishing(nn.Module):
        '''Deletes a file (and a folder) the first time it runs: what a user's cleanup job might do mid-run.'''

        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.fc2 = nn.Linear(8, 2)
            with torch.no_grad():
                self.fc2.weight[:, :3] = 0
            self.victims = []

        def forward(self, x):
            for victim in self.victims:
                if os.path.isdir(victim):
                    shutil.rmtree(victim)
                elif os.path.exists(victim):
                    os.remove(victim)
            return self.fc2(torch.relu(self.fc1(x)))
    """
)


def _vanishing(tmp_path: Path, victims: list[str]) -> None:
    (tmp_path / "vanishing.py").write_text(USER_MODULE)
    code = f"import torch, vanishing\nm = vanishing.Vanishing()\nm.victims = {victims!r}\ntorch.save(m, 'model.pt')\n"
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        check=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )


def test_the_input_deleted_while_compact_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _vanishing(tmp_path, ["model.pt"])
    monkeypatch.chdir(tmp_path)  # where compactor.load finds the model's module
    r = _cli("model.pt", "-o", "small.pt", "--input-shape", "2,4", "--report", "r.json", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "model.pt").exists()
    assert compactor.load(tmp_path / "small.pt").fc2.in_features == 5
    assert json.loads((tmp_path / "r.json").read_text())["input_file_bytes"] > 0


def test_a_failure_after_the_model_is_written_leaves_no_output(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    _vanishing(tmp_path, ["reports"])  # the --report folder is gone when the report is written
    r = _cli("model.pt", "-o", "small.pt", "--input-shape", "2,4", "--report", "reports/r.json", cwd=tmp_path)
    assert _one_error_line(r).startswith("error: cannot write reports/r.json")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("__")) == [
        "model.pt",
        "vanishing.py",
    ]


# --- careless models -----------------------------------------------------------------------------------
def _convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


X = torch.randn(2, 3, 8, 8)


def _rows(conv: nn.Module, name: str, rows: list[int], dim: int = 0) -> None:
    mask = torch.ones_like(getattr(conv, name))
    mask.index_fill_(dim, torch.tensor(rows), 0.0)
    prune.custom_from_mask(conv, name, mask)


@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm", "parametrizations.weight_norm"])
def test_weight_reparametrisations_with_masks_are_folded_and_exact(how: str) -> None:
    model = _convs()
    if how == "weight_norm":
        nn.utils.weight_norm(model[0])
        _rows(model[0], "weight_g", [1, 4, 6])  # g = 0: those filters output exactly 0 (+ bias)
        with torch.no_grad():
            model[0].bias[[1, 4, 6]] = 0
        expected, folded = (5, 4), "0: weight_norm(weight)"
    elif how == "spectral_norm":
        nn.utils.spectral_norm(model[2])
        _rows(model[2], "weight_orig", [0, 2, 5], dim=1)  # input channels 0, 2, 5 unread
        expected, folded = (5, 4), "2: spectral_norm(weight)"
    else:
        nn.utils.parametrizations.weight_norm(model[2])
        _rows(model[2].parametrizations.weight, "original1", [3, 7], dim=1)  # v's input columns: unread
        expected, folded = (6, 4), "2: parametrizations(weight: _WeightNorm)"
    with torch.no_grad():
        want = model(X)
    small, report = compactor.compact(model, X)
    assert (small[0].out_channels, small[2].out_channels) == expected
    assert small[2].in_channels == expected[0]
    assert report.extra["reparametrizations"] == [folded]
    with torch.no_grad():
        assert torch.allclose(small(X), want, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(small, buffer)  # the compacted model pickles: no local hook left behind
    assert all(not m._forward_pre_hooks for m in small.modules())


def test_a_dynamically_quantized_linear_is_left_whole_with_a_reason() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    model = torch.ao.quantization.quantize_dynamic(dense, {nn.Linear}, dtype=torch.qint8)
    model[4] = nn.Linear(4, 3)
    with torch.no_grad():
        model[4].weight[:, :2] = 0
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = model(x)
    small, report = compactor.compact(model, x)
    assert small[4].in_features == 4  # fed by a quantized layer, which is not rebuilt
    assert report.warnings == (
        "2 quantized layer(s) left whole (0 (quantized.dynamic.modules.linear.Linear), 2 "
        "(quantized.dynamic.modules.linear.Linear)): compactor rebuilds float layers only, so the channels they "
        "write or read stay; compact the float model, then quantize",
    )
    with torch.no_grad():
        assert torch.equal(small(x), want)


def test_three_hundred_nested_sequentials_compact() -> None:
    inner: nn.Module = nn.Linear(4, 4)
    for _ in range(300):
        inner = nn.Sequential(inner)
    model = nn.Sequential(inner, nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[2].weight[:, 1] = 0
    x = torch.randn(2, 4)
    limit = sys.getrecursionlimit()
    small, report = compactor.compact(model, x)
    assert sys.getrecursionlimit() == limit
    leaf = small[0]
    for _ in range(300):
        leaf = leaf[0]
    assert (leaf.out_features, small[2].in_features) == (3, 3)
    assert report.max_abs_error <= 1e-6


def test_the_cli_refuses_a_hostile_manifest_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "scaled.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn


            class Scaled(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(8, 8)
                    self.scale = nn.Parameter(torch.ones(8))

                def forward(self, x):
                    return self.fc(x) * self.scale
            """
        )
    )
    bad = _tamper(_saved(tmp_path, sparse=True), "compactor.sparse", _sparse_edit("huge"))
    r = _cli(bad.name, "--arch", "scaled:Scaled", "-o", "out.pt", "--input-shape", "2,8", cwd=tmp_path)
    assert "has a mask of 8 bytes" in _one_error_line(r)
    assert not (tmp_path / "out.pt").exists()


def test_a_pickle_nested_past_the_recursion_limit_loads_and_compacts(tmp_path: Path) -> None:
    """1200 nested Sequentials: torch.save needs a big stack to write it; compact reads and shrinks it."""
    code = textwrap.dedent(
        """
        import sys, threading, torch
        from torch import nn

        def make():
            inner = nn.Linear(4, 4)
            for _ in range(1200):
                inner = nn.Sequential(inner)
            model = nn.Sequential(inner, nn.ReLU(), nn.Linear(4, 2))
            with torch.no_grad():
                model[2].weight[:, 1] = 0
            torch.save(model, "deep.pt")

        sys.setrecursionlimit(100000)
        threading.stack_size(512 * 2**20)
        worker = threading.Thread(target=make)
        worker.start()
        worker.join()
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=300)
    r = _cli("deep.pt", "-o", "small.pt", "--input-shape", "2,4", "--report", "r.json", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["params"] == {"before": 30, "after": 23}  # one hidden unit gone: 5 + 2 parameters
