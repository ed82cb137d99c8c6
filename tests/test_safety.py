"""Hostile and careless input through the real ``compact`` command: a wrong model is never shipped, code from
the file (or beside it) never runs, no file is destroyed, and bad input gets one line and exit status 2.

Each test asserts the exit status, the one-line message, that nothing was written or changed, and that the
side effect the input was built to cause did not happen."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import compactor

SOURCE = textwrap.dedent(
    """
    import enum

    import torch
    from torch import nn
    from torch.nn.utils import prune


    def _prune(conv, rows):
        mask = torch.ones_like(conv.weight)
        mask[rows] = 0
        prune.custom_from_mask(conv, "weight", mask)
        with torch.no_grad():
            conv.bias[rows] = 0.0


    class Flip(nn.Module):
        '''Flips the channel order when the input is large: a branch on a tensor's value.'''

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 4, 1)
            _prune(self.conv1, [1, 2, 5])

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            if x.mean() > 10:  # BRANCH
                y = y.flip(1)
            return self.conv2(y)


    class TwoHeads(nn.Module):
        '''Calls ``alt`` on inputs the example never shows.'''

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.main = nn.Conv2d(8, 4, 1)
            self.alt = nn.Conv2d(8, 4, 1)
            _prune(self.conv1, [0, 3])

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            return self.alt(y) if x.shape[-1] > 64 else self.main(y)


    class WithAux(nn.Module):
        '''GoogLeNet/Inception-v3: an auxiliary classifier that runs only in train mode.'''

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 5)
            self.aux_bn = nn.BatchNorm1d(8)  # one value per channel at a batch of one: train mode fails there
            self.aux = nn.Linear(8, 5)
            _prune(self.conv1, [2, 6])
            with torch.no_grad():
                self.bn1.running_mean[[2, 6]] = 0.0
                self.bn1.bias[[2, 6]] = 0.0
            _prune(self.conv2, [0, 7])

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            out = self.head(torch.relu(self.conv2(x)).mean((2, 3)))
            if self.training:
                return out, self.aux(self.aux_bn(x.mean((2, 3))))
            return out


    class Width(nn.Module):
        '''Returns a width as an int beside its tensor.'''

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 4, 1)
            _prune(self.conv1, [0, 1, 2, 3])

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            return {"out": self.conv2(y), "width": int(self.conv1.out_channels), "note": None}


    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 4, 1)
            _prune(self.conv1, [0, 1])

        def forward(self, x):
            return self.conv2(torch.relu(self.conv1(x)))


    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, ids):
            return self.fc((ids % 7).float())


    class Views(nn.Module):
        '''Thirty views, each under the per-tensor limit, together 1.8 GB from 120 stored bytes.'''

        def __init__(self):
            super().__init__()
            for i in range(30):
                self.register_buffer(f"t{i}", torch.zeros(1).expand(15_000_000))

        def forward(self, x):
            return x


    class Marked(nn.Module):
        '''Writes a marker when its __init__ runs: loading a file must never run it.'''

        def __init__(self):
            super().__init__()
            open("init_ran.txt", "w").write("ran")


    class FarFlip(Plain):
        def forward(self, x):
            y = torch.relu(self.conv1(x))
            if x.std() > 1000:  # FAR BRANCH: no scaling by 10 or shift of the example reaches it
                y = y.flip(1)
            return self.conv2(y)


    class NumpyFlip(Plain):
        def forward(self, x):
            y = torch.relu(self.conv1(x))
            if x.detach().numpy().mean() > 10:
                y = y.flip(1)
            return self.conv2(y)


    class NonzeroFlip(Plain):
        def forward(self, x):
            y = torch.relu(self.conv1(x))
            if (x > 10).nonzero().shape[0]:
                y = y.flip(1)
            return self.conv2(y)


    class Meta:
        def __init__(self, width):
            self.width = width


    class ReturnsObject(Plain):
        def forward(self, x):
            return self.conv2(torch.relu(self.conv1(x))), Meta(self.conv1.out_channels)


    class Color(enum.Enum):
        RED = 1

        @classmethod
        def _missing_(cls, value):
            open("missing_ran.txt", "w").write("ran")
            return cls.RED


    class View(nn.Module):
        '''A 4-byte storage read as a 20000 x 20000 table: 1.6 GB the moment anything copies it.'''

        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(1).expand(20000, 20000))

        def forward(self, x):
            return x
    """
)

MAKE = textwrap.dedent(
    """
    import os, torch
    import safety_models as models
    from torch import nn
    torch.manual_seed(0)
    for name in ("Flip", "TwoHeads", "WithAux", "Width", "Plain", "Tokens"):
        torch.save(getattr(models, name)().eval(), name.lower() + ".pt")
    conv = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        conv.weight[2] = 0
        conv.bias[2] = 0
    torch.save(conv, "single.pt")
    torch.save(nn.DataParallel(models.Plain()), "parallel.pt")
    import tempfile, torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    torch.save(nn.parallel.DistributedDataParallel(models.Plain()), "distributed.pt")
    dist.destroy_process_group()

    class Calls:
        def __reduce__(self):
            return (nn.Linear, (16, 16))
    torch.save(Calls(), "calls.pt")

    torch.save(models.View(), "view.pt")
    torch.save(models.Views(), "views.pt")
    for name in ("NumpyFlip", "NonzeroFlip", "ReturnsObject", "FarFlip"):
        torch.save(getattr(models, name)().eval(), name.lower() + ".pt")

    big = models.Plain()
    big.register_buffer("pad", torch.zeros(12 * 2**20))
    torch.save(big, "plain_big.pt")

    torch.save(torch.tensor([[-2**63, 2**63 - 1]]), "wide_ids.pt")
    x = torch.ones(1, 3, 4, 4)
    x[0, 0, 0, 0], x[0, 1, 1, 1] = float("nan"), float("inf")
    torch.save(x, "nan.pt")
    """
)


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    def preexec() -> None:
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "compactor.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        preexec_fn=preexec,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("safety")
    (d / "safety_models.py").write_text(SOURCE)
    subprocess.run([sys.executable, "-c", MAKE], cwd=d, check=True, env={**os.environ, "PYTHONPATH": str(d)})
    return d


def error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --- paths the example inputs do not take -----------------------------------------------------------------
def test_a_branch_on_tensor_values_is_named_and_strict_refuses_it(work: Path) -> None:
    """A branch none of the changed example inputs reaches (``x.std() > 1000``) stays a warning."""
    line = next(i for i, text in enumerate(SOURCE.splitlines(), 1) if "# FAR BRANCH" in text)
    r = cli("farflip.pt", "-o", "far_small.pt", "--input-shape", "2,3,8,8", "--report", "far.json", cwd=work)
    assert r.returncode == 0, r.stderr
    expected = f"safety_models.py:{line} (bool)"
    assert f"warning: the forward converts tensors to Python values at {expected}" in r.stderr
    report = json.loads((work / "far.json").read_text())
    assert report["paths"]["value_branches"] == [f"{expected}"]
    assert any(expected in w and "--strict refuses this" in w for w in report["warnings"])
    assert "explored" not in report

    before = files(work)
    r = cli("farflip.pt", "-o", "far_strict.pt", "--input-shape", "2,3,8,8", "--strict", cwd=work)
    assert r.returncode == 2
    assert error_line(r).startswith(
        f"error: --strict: the forward converts tensors to Python values at {expected}"
    )
    assert files(work) == before


def test_a_branch_the_changed_inputs_reach_is_verified_on_both_sides(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``if x.mean() > 10: y = y.flip(1)``: the example shifted by 30 times its largest value takes the
    other side, so it joins the verified runs. There the channel order is reversed, which the trace on the
    example did not see: the plan that removes conv1's zero channels 1, 2 and 5 from conv2's columns 1, 2
    and 5 fails on it (conv2's column 2 reads channel 5 there... and so on), and the groups are restored
    until both sides agree. No warning, and --strict accepts it."""
    r = cli("flip.pt", "-o", "flip_small.pt", "--input-shape", "2,3,8,8", "--report", "flip.json", cwd=work)
    assert r.returncode == 0, r.stderr
    report = json.loads((work / "flip.json").read_text())
    assert report["paths"]["value_branches"] == []
    assert not any("converts tensors" in w for w in report["warnings"])
    assert report["explored"].startswith("also verified on the example inputs shifted by +")
    assert report["verified_runs"] == 5  # the example, 2 fresh, 1 explored, 1 at another size
    monkeypatch.chdir(work)  # compactor.load resolves safety_models.py from here, as the CLI does
    dense = compactor.load(work / "flip.pt", trust_pickle=True)
    small = compactor.load(work / "flip_small.pt")
    for shift in (0.0, 40.0):  # both sides of the branch
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) + shift
        with torch.no_grad():
            torch.testing.assert_close(small(x), dense(x), rtol=1e-4, atol=1e-4)
    r = cli("flip.pt", "-o", "flip_strict.pt", "--input-shape", "2,3,8,8", "--strict", cwd=work)
    assert r.returncode == 0, r.stderr


def test_a_layer_no_forward_called_is_left_as_it_was(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)  # compactor.load resolves safety_models.py from here, as the CLI does
    r = cli("twoheads.pt", "-o", "twoheads_small.pt", "--input-shape", "1,3,8,8", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (
        "warning: 1 layer(s) with parameters were not called by any forward on the example inputs (alt (Conv2d))"
        in r.stderr
    )
    dense = compactor.load(work / "twoheads.pt")
    small = compactor.load(work / "twoheads_small.pt")
    assert small.main.in_channels == 6 and small.conv1.out_channels == 6
    assert small.alt.in_channels == 8 and torch.equal(small.alt.weight, dense.alt.weight)
    assert torch.equal(small.alt.bias, dense.alt.bias)

    r = cli("twoheads.pt", "-o", "twoheads_strict.pt", "--input-shape", "1,3,8,8", "--strict", cwd=work)
    assert r.returncode == 2 and "(alt (Conv2d))" in error_line(r)
    assert not (work / "twoheads_strict.pt").exists()


@pytest.mark.parametrize("batch", [2, 1])
def test_a_train_mode_only_layer_loses_what_goes_and_trains_after_compaction(
    work: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """An auxiliary classifier (and its BatchNorm) that only train mode runs does not pin the channels it
    reads: it rides along, losing them too, so that fine-tuning still runs it; the report says its
    train-mode outputs are not what they were. Also with a batch of one (what users give), where BatchNorm
    cannot run in train mode: train mode runs and is traced on the example twice over."""
    monkeypatch.chdir(work)
    shape = f"{batch},3,8,8"
    r = cli("withaux.pt", "-o", "withaux_small.pt", "--input-shape", shape, "--report", "aux.json", cwd=work)
    assert r.returncode == 0, r.stderr
    report = json.loads((work / "aux.json").read_text())
    assert report["paths"]["train_only_layers"] == ["aux", "aux_bn"]
    assert [(z["channel"], z["fate"]) for z in report["zeroed"] if z["layer"] == "conv1"] == [
        (2, "removed"),
        (6, "removed"),
    ]
    (warning,) = [w for w in report["warnings"] if "run only in train mode" in w]
    assert warning.startswith("aux, aux_bn run only in train mode: they lost the input channels that went")
    small = compactor.load(work / "withaux_small.pt")
    assert small.conv1.out_channels == 6 and small.conv2.out_channels == 6 and small.head.in_features == 6
    assert small.aux_bn.num_features == 6 and small.aux.in_features == 6
    small.train()
    out, aux = small(torch.randn(2, 3, 8, 8))  # fine-tuning runs the auxiliary classifier: it must still fit
    assert out.shape == (2, 5) and aux.shape == (2, 5)


def test_plain_outputs_are_compared_too(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)
    r = cli(
        "width.pt", "-o", "width_small.pt", "--input-shape", "1,3,8,8", "--report", "width.json", cwd=work
    )
    assert r.returncode == 0, r.stderr
    small = compactor.load(work / "width_small.pt")
    out = small(torch.randn(1, 3, 8, 8))
    assert out["width"] == 8 and out["note"] is None  # removing the 4 channels would have changed it
    report = json.loads((work / "width.json").read_text())
    reasons = {z["reason"] for z in report["zeroed"] if z["layer"] == "conv1"}
    # the example, two fresh runs and one at another size (1,3,16,16): the summary names three
    assert reasons == {"; ".join(f"run {i}: output.width is 4, expected 8" for i in range(3)) + " (+1 more)"}


def test_a_model_that_is_a_single_layer_is_rebuilt_as_the_root(work: Path) -> None:
    r = cli(
        "single.pt", "-o", "single_small.pt", "--input-shape", "1,3,8,8", "--report", "single.json", cwd=work
    )
    assert r.returncode == 0, r.stderr
    small = compactor.load(work / "single_small.pt")
    assert isinstance(small, torch.nn.Conv2d) and list(dict(small.named_children())) == []
    assert (
        sorted(small.state_dict()) == ["bias", "weight"] and small.out_channels == 8
    )  # a model output: kept
    assert (work / "single_small.pt").stat().st_size <= (work / "single.pt").stat().st_size + 64


# --- code from the file, or beside it ----------------------------------------------------------------------
def _named(work: Path, name: str, global_name: str) -> Path:
    """A torch.save archive whose pickle builds an object of class ``global_name`` (module.qualname)."""
    import zipfile

    module, _, qual = global_name.rpartition(".")
    pickle = b"\x80\x02c" + module.encode() + b"\n" + qual.encode() + b"\n)\x81."  # GLOBAL, (), NEWOBJ, STOP
    torch.save({"x": 1}, work / name)
    with zipfile.ZipFile(work / name) as src:
        entries = {i.filename: src.read(i.filename) for i in src.infolist()}
    with zipfile.ZipFile(work / name, "w", zipfile.ZIP_STORED) as dst:
        for entry, data in entries.items():
            dst.writestr(entry, pickle if entry.endswith("data.pkl") else data)
    return work / name


@pytest.mark.parametrize(
    ("global_name", "marker"),
    [("this.Foo", None), ("antigravity.geohash", "browser.txt"), ("train.Net", "train_ran.txt")],
)
def test_names_in_the_pickle_are_judged_before_anything_is_imported(
    work: Path, global_name: str, marker: str | None
) -> None:
    (work / "train.py").write_text("open('train_ran.txt', 'w').write('ran')\nNet = dict\n")
    browser = work / "browser.sh"
    browser.write_text("#!/bin/sh\ntouch browser.txt\n")
    browser.chmod(0o755)
    path = _named(work, f"named_{global_name.partition('.')[0]}.pt", global_name)
    r = cli(
        path.name, "-o", "named_out.pt", "--input-shape", "1,3,8,8", cwd=work, env={"BROWSER": str(browser)}
    )
    assert r.returncode == 2
    assert error_line(r).startswith(f"error: {path.name} needs the global {global_name}, ")
    assert "--trust-pickle" in r.stderr and "Beautiful is better than ugly" not in r.stdout + r.stderr
    assert marker is None or not (work / marker).exists()
    assert not (work / "named_out.pt").exists()


def test_a_user_module_is_imported_after_its_source_shows_a_module_class(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(work)
    r = cli("plain.pt", "-o", "plain_small.pt", "--input-shape", "1,3,8,8", "-q", cwd=work)
    assert r.returncode == 0, r.stderr
    assert compactor.load(work / "plain_small.pt").conv1.out_channels == 6


def test_modules_beside_the_model_do_not_shadow_the_standard_library(work: Path, tmp_path: Path) -> None:
    (tmp_path / "safety_models.py").write_text(SOURCE)
    for shadow in ("secrets", "profile"):
        (tmp_path / f"{shadow}.py").write_text(f"open('{shadow}_ran.txt', 'w').write('ran')\n")
    (tmp_path / "plain.pt").write_bytes((work / "plain.pt").read_bytes())
    r = cli(
        "plain.pt", "-o", "plain.pt2", "--onnx", "plain.onnx", "--input-shape", "1,3,8,8", "-q", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "secrets_ran.txt").exists() and not (tmp_path / "profile_ran.txt").exists()


def test_a_pickle_that_calls_a_module_class_is_refused(work: Path) -> None:
    r = cli("calls.pt", "-o", "calls_out.pt", "--input-shape", "1,16", cwd=work)
    assert r.returncode == 2
    assert error_line(r) == (
        "error: calls.pt calls torch.nn.modules.linear.Linear while loading, which torch.save(model) never does "
        "(it rebuilds modules from their state); refusing to run it. Re-save the model with torch.save(model, path)"
    )


def test_a_zero_stride_view_bomb_is_refused_before_it_is_copied(work: Path) -> None:
    r = cli("view.pt", "-o", "view_out.pt", "--input-shape", "1,3", cwd=work)
    assert r.returncode == 2
    assert error_line(r).startswith(
        "error: view.pt: tensor table of shape (20000, 20000) reads 4 stored bytes as 1,600,000,000 (an expanded view"
    )


def test_a_compressed_archive_is_refused_before_loading(work: Path) -> None:
    import zipfile

    with zipfile.ZipFile(work / "plain_big.pt") as src:
        entries = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    with zipfile.ZipFile(work / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in entries:
            dst.writestr(name, data)
    r = cli("bomb.pt", "-o", "bomb_out.pt", "--input-shape", "1,3,8,8", cwd=work)
    assert r.returncode == 2
    line = error_line(r)
    assert (
        line.startswith("error: bomb.pt expands to ")
        and "(compressed entries, which torch.save never writes)" in line
    )


# --- files destroyed -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["-o", "batch.pt", "--example-inputs", "batch.pt"],
            "-o batch.pt and --example-inputs batch.pt are the same file",
        ),
        (
            ["-o", "small.pt", "--report", "small.pt", "--input-shape", "1,3,8,8"],
            "-o small.pt and --report small.pt are the same file",
        ),
        (
            ["-o", "small.pt", "--onnx", "link.onnx", "--input-shape", "1,3,8,8"],
            "-o small.pt and --onnx link.onnx are the same file",
        ),
        (
            ["-o", "small.pt", "--report", "plain.pt", "--input-shape", "1,3,8,8"],
            "MODEL plain.pt and --report plain.pt are the same file",
        ),
    ],
)
def test_two_flags_naming_one_file_are_refused_before_any_work(
    work: Path, flags: list[str], message: str
) -> None:
    torch.save(torch.randn(1, 3, 8, 8), work / "batch.pt")
    (work / "small.pt").write_bytes(b"keep me")
    (work / "link.onnx").unlink(missing_ok=True)
    (work / "link.onnx").symlink_to(work / "small.pt")
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    r = cli("plain.pt", *flags, cwd=work)
    assert r.returncode == 2
    assert error_line(r).startswith(f"error: {message}, so writing one would destroy the other")
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


def test_stale_temporaries_of_a_killed_run_are_removed(work: Path, tmp_path: Path) -> None:
    (tmp_path / "safety_models.py").write_text(SOURCE)
    (tmp_path / "plain.pt").write_bytes((work / "plain.pt").read_bytes())
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".out.pt.compactor-{int(dead.stdout)}-abc123.tmp"
    stale.write_bytes(b"half a model")
    live = (
        tmp_path / f".out.pt.compactor-{os.getpid()}-def456.tmp"
    )  # this process is alive: not ours to remove
    live.write_bytes(b"another run, still writing")
    r = cli("plain.pt", "-o", "out.pt", "--input-shape", "1,3,8,8", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and live.exists() and (tmp_path / "out.pt").exists()


# --- bad input that used to end as an internal error -------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "wrapper"), [("parallel", "DataParallel"), ("distributed", "DistributedDataParallel")]
)
def test_a_parallel_wrapper_says_to_unwrap_it(work: Path, name: str, wrapper: str) -> None:
    r = cli(f"{name}.pt", "-o", f"{name}_out.pt", "--input-shape", "1,3,8,8", cwd=work)
    assert r.returncode == 2
    assert error_line(r) == (
        f"error: {name}.pt holds a {wrapper} wrapper, which cannot be loaded outside its process group; save "
        f"the model inside it instead: torch.save(model.module, path)"
    )
    assert not (work / f"{name}_out.pt").exists()


def test_a_layer_whose_arguments_disagree_with_its_weights(work: Path) -> None:
    script = "import torch, safety_models as s; m = s.Plain(); m.conv2.in_channels = 5; torch.save(m, 'nonsense.pt')"
    subprocess.run(
        [sys.executable, "-c", script], cwd=work, check=True, env={**os.environ, "PYTHONPATH": str(work)}
    )
    r = cli("nonsense.pt", "-o", "nonsense_out.pt", "--input-shape", "1,3,8,8", cwd=work)
    assert r.returncode == 2
    assert error_line(r) == (
        "error: layer conv2 (Conv2d) has weight of shape (4, 8, 1, 1), but its attributes say 4x5: the model was "
        "built or edited inconsistently; rebuild that layer with arguments that match its weights"
    )
    assert not (work / "nonsense_out.pt").exists()


def test_a_write_that_fails_names_the_path_and_leaves_nothing(work: Path, tmp_path: Path) -> None:
    (tmp_path / "safety_models.py").write_text(SOURCE)
    (tmp_path / "plain.pt").write_bytes((work / "plain.pt").read_bytes())
    r = cli("plain.pt", "-o", "out.pt", "--input-shape", "1,3,8,8", cwd=tmp_path, limit=2000)
    assert r.returncode == 2
    assert error_line(r) == "error: cannot write out.pt: File too large; check the path and free space"
    assert files(tmp_path) == ["plain.pt", "safety_models.py"]


def test_a_full_disk_names_the_path_and_leaves_nothing(work: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=1024"], capture_output=True
        )  # until full
        r = cli(str(work / "plain.pt"), "-o", str(disk / "out.pt"), "--input-shape", "1,3,8,8", cwd=work)
        assert r.returncode == 2
        assert (
            error_line(r)
            == f"error: cannot write {disk / 'out.pt'}: No space left on device; check the path and free space"
        )
        assert os.listdir(disk) == ["filler"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_integer_inputs_spanning_the_whole_int64_range(work: Path) -> None:
    r = cli("tokens.pt", "-o", "tokens_out.pt", "--example-inputs", "wide_ids.pt", "-q", cwd=work)
    assert r.returncode == 0, r.stderr


def test_nan_in_the_example_inputs_is_named(work: Path) -> None:
    r = cli("plain.pt", "-o", "nan_out.pt", "--example-inputs", "nan.pt", cwd=work)
    assert r.returncode == 2
    assert error_line(r) == (
        "error: example inputs: input 0 (1, 3, 4, 4):float32 holds 2 NaN or Inf value(s); give finite inputs "
        "(compaction is verified by comparing outputs, and NaN never compares equal)"
    )
    assert not (work / "nan_out.pt").exists()


# --- the red-team's second pass ------------------------------------------------------------------------------
def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _int(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little", signed=True)


def _archive(work: Path, name: str, pickle: bytes, extra: list[tuple[str, bytes]] | None = None) -> Path:
    import zipfile

    torch.save({"x": 1}, work / name)
    with zipfile.ZipFile(work / name) as src:
        entries = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    with zipfile.ZipFile(work / name, "w", zipfile.ZIP_STORED) as dst:
        for entry, data in entries:
            dst.writestr(entry, pickle if entry.endswith("data.pkl") else data)
        for entry, data in extra or []:
            dst.writestr(entry, data)
    return work / name


REBUILD = _global("torch._tensor", "_rebuild_from_type_v2")
LINEAR = _global("torch.nn.modules.linear", "Linear")
MARKED = _global("safety_models", "Marked")


@pytest.mark.parametrize(
    ("name", "pickle", "called"),
    [
        # _rebuild_from_type_v2(func, type, args, state) calls func(*args): torch allows it by default
        (
            "through_rebuild.pt",
            b"\x80\x02" + REBUILD + b"(" + MARKED + MARKED + b")}tR.",
            "safety_models.Marked",
        ),
        (
            "through_rebuild_linear.pt",
            b"\x80\x02" + REBUILD + b"(" + LINEAR + LINEAR + b"(" + _int(64) + _int(64) + b"t}tR.",
            "torch.nn.modules.linear.Linear",
        ),
        (
            "bytearray.pt",
            b"\x80\x02" + _global("builtins", "bytearray") + b"(" + _int(2**30) + b"tR.",
            "builtins.bytearray",
        ),
        (
            "enum_missing.pt",
            b"\x80\x02" + _global("safety_models", "Color") + b"(" + _int(99) + b"tR.",
            "safety_models.Color",
        ),
    ],
)
def test_a_pickle_cannot_call_code_through_what_torch_allows(
    work: Path, name: str, pickle: bytes, called: str
) -> None:
    _archive(work, name, pickle)
    r = cli(name, "-o", "called_out.pt", "--input-shape", "1,64", cwd=work)
    assert r.returncode == 2
    assert error_line(r).startswith(
        f"error: {name} calls {called} while loading, which torch.save(model) never does"
    )
    assert not (work / "init_ran.txt").exists() and not (work / "missing_ran.txt").exists()
    assert not (work / "called_out.pt").exists()


def test_the_pickle_checked_is_the_one_torch_reads(work: Path) -> None:
    hostile = b"\x80\x02" + LINEAR + b"(" + _int(64) + _int(64) + b"tR."
    decoy = b"\x80\x02}."  # an empty dict, in a folder torch never reads
    _archive(work, "decoy.pt", hostile, extra=[("decoy/aaa/data.pkl", decoy)])
    r = cli("decoy.pt", "-o", "decoy_out.pt", "--input-shape", "1,64", cwd=work)
    assert r.returncode == 2 and "calls torch.nn.modules.linear.Linear while loading" in error_line(r)


def test_a_view_bomb_split_across_many_tensors_is_refused(work: Path) -> None:
    r = cli("views.pt", "-o", "views_out.pt", "--input-shape", "1,3", cwd=work)
    assert r.returncode == 2
    assert "(an expanded view; 30 tensors read 120 stored bytes as 1,800,000,000)" in error_line(r)


@pytest.mark.parametrize(
    ("name", "kind"), [("numpyflip", ".numpy()"), ("nonzeroflip", "nonzero (a shape from values)")]
)
def test_branches_that_never_call_bool_are_found_too(work: Path, name: str, kind: str) -> None:
    r = cli(f"{name}.pt", "-o", f"{name}_out.pt", "--input-shape", "1,3,8,8", "--strict", cwd=work)
    assert r.returncode == 2
    line = error_line(r)
    assert (
        line.startswith("error: --strict: the forward converts tensors to Python values at ")
        and f"({kind})" in line
    )


def test_a_branch_inside_a_package_beside_torch_is_model_code(work: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchmetrics")
    (tmp_path / "via_metrics.py").write_text(textwrap.dedent(
        """
        import torch
        from torch import nn
        from torchmetrics.utilities.compute import normalize_logits_if_needed

        class ViaMetrics(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 1)

            def forward(self, x):
                return normalize_logits_if_needed(self.conv(x), "sigmoid")
        """
    ))  # fmt: skip
    script = "import torch, via_metrics; torch.save(via_metrics.ViaMetrics(), 'metrics.pt')"
    subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        check=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    r = cli("metrics.pt", "-o", "metrics_out.pt", "--input-shape", "1,3,4,4", "--strict", cwd=tmp_path)
    assert r.returncode == 2 and "torchmetrics" in error_line(r)


def test_objects_returned_beside_tensors_are_said(work: Path) -> None:
    r = cli("returnsobject.pt", "-o", "returnsobject_out.pt", "--input-shape", "1,3,8,8", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (
        "warning: the model returns objects that are neither tensors nor plain values (output[1] (Meta))"
        in r.stderr
    )


def test_a_pipe_as_output_is_not_replaced(work: Path) -> None:
    fifo = work / "pipe.pt"
    os.mkfifo(fifo)
    r = cli("plain.pt", "-o", "pipe.pt", "--input-shape", "1,3,8,8", cwd=work)
    assert r.returncode == 2
    assert error_line(r) == "error: -o pipe.pt is not a regular file (a device or a pipe); give a file name"
    assert fifo.is_fifo()
