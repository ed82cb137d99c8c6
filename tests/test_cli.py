"""The real ``compact`` command in a subprocess: success paths and every bad-input case with its message."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import compactor

MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.nn.utils import prune

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3)
            self.fc = nn.Linear(8 * 6 * 6, 4)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.conv2(x))
            return self.fc(x.flatten(1))

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 2)

        def forward(self, ids):
            return self.fc(self.emb(ids).mean(1))

    class Broken(Net):
        def forward(self, x):
            raise ValueError("this model is broken on purpose")

    def masked_net():
        torch.manual_seed(0)
        net = Net()
        prune.ln_structured(net.conv1, "weight", amount=0.5, n=2, dim=0)
        with torch.no_grad():
            dead = net.conv1.weight_mask.flatten(1).sum(1) == 0
            net.conv1.bias[dead] = 0.0
            net.bn1.bias[dead] = 0.0
        return net.eval()
    """
)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), *sys.path])}
    return subprocess.run(
        [sys.executable, "-m", "compactor.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding models.py and files saved from it (classes resolve as ``models.Net``)."""
    d = tmp_path_factory.mktemp("cli")
    (d / "models.py").write_text(MODEL_SOURCE)
    script = textwrap.dedent(
        """
        import os, torch, models
        torch.save(models.masked_net(), "masked.pt")
        import torch.serialization as ser
        tag, ser.location_tag = ser.location_tag, lambda storage: "cuda:0"  # as if saved on a GPU
        torch.save(models.masked_net(), "gpu_saved.pt")
        ser.location_tag = tag
        torch.save(models.masked_net().state_dict(), "state_dict.pt")
        torch.save(models.Tokens(), "tokens.pt")
        torch.save(models.Broken(), "broken.pt")
        torch.save(torch.randn(2, 3, 8, 8), "x.pt")
        torch.save({"x": torch.randn(2, 3, 8, 8)}, "x_dict.pt")
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned > pwned.txt",))
        torch.save({"model": Evil()}, "evil.pt")
        open("notes.txt", "w").write("not a model")
        """
    )
    subprocess.run(
        [sys.executable, "-c", script], cwd=d, check=True, env={**os.environ, "PYTHONPATH": str(d)}
    )
    return d


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compacts_and_writes_model_and_report(workdir: Path) -> None:
    before = digest(workdir / "masked.pt")
    r = run_cli(
        "masked.pt", "-o", "small.pt", "--input-shape", "2,3,8,8", "--report", "report.json", cwd=workdir
    )
    assert r.returncode == 0, r.stderr
    assert digest(workdir / "masked.pt") == before  # the input file is never touched
    report = json.loads((workdir / "report.json").read_text())
    assert report["params"]["after"] < report["params"]["before"]
    assert report["file_bytes"]["after"] < report["file_bytes"]["before"]
    assert report["max_abs_error"] <= 1e-4
    conv1 = next(layer for layer in report["layers"] if layer["name"] == "conv1")
    assert (conv1["out_before"], conv1["out_after"]) == (8, 4)
    assert "verified on 3 runs" in r.stdout and "conv1" in r.stdout
    sys.path.insert(0, str(workdir))
    try:
        import models

        small = torch.load(workdir / "small.pt", weights_only=False)
        masked = models.masked_net()
    finally:
        sys.path.remove(str(workdir))
    assert small.conv1.out_channels == 4 and small.conv2.in_channels == 4
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in small.named_parameters())
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-5)


def test_formats_bench_onnx_round_to_in_one_run(workdir: Path) -> None:
    r = run_cli(
        "masked.pt", "-o", "small.pt2", "--input-shape", "2,3,8,8", "--bench", "--backends", "torch-cpu",
        "--repeats", "3", "--onnx", "small.onnx", "--round-to", "2", "--report", "bench.json", "-q", cwd=workdir,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((workdir / "bench.json").read_text())
    assert set(report["latency_ms"]["torch-cpu"]) == {"before", "after"}
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["output"]["format"] == "pt2" and (workdir / "small.pt2").is_file()
    assert (workdir / "small.onnx").is_file() and report["onnx"]["bytes"] == (
        workdir / "small.onnx"
    ).stat().st_size
    conv1 = next(layer for layer in report["layers"] if layer["name"] == "conv1")
    assert conv1["out_after"] % 2 == 0
    program = torch.export.load(str(workdir / "small.pt2")).module()
    x = torch.randn(2, 3, 8, 8)
    sys.path.insert(0, str(workdir))
    try:
        import models

        torch.testing.assert_close(program(x), models.masked_net()(x), rtol=1e-4, atol=1e-5)
    finally:
        sys.path.remove(str(workdir))


def test_state_dict_with_arch_to_safetensors_and_sparse(workdir: Path) -> None:
    r = run_cli(
        "state_dict.pt",
        "--arch",
        "models:Net",
        "-o",
        "small.safetensors",
        "--input-shape",
        "1,3,8,8",
        "-q",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    r2 = run_cli(
        "masked.pt", "-o", "sparse.safetensors", "--sparse-storage", "--input-shape", "1,3,8,8", "--report", "sparse.json",
        "-q", cwd=workdir,
    )  # fmt: skip
    assert r2.returncode == 0, r2.stderr
    assert json.loads((workdir / "sparse.json").read_text())["sparse_storage"]["sparse_bytes"] > 0
    sys.path.insert(0, str(workdir))
    try:
        import models

        x = torch.randn(2, 3, 8, 8)
        expected = models.masked_net()(x)
        for name in ("small.safetensors", "sparse.safetensors"):
            small = compactor.load(workdir / name, arch=models.Net)
            assert small.conv1.out_channels == 4, name
            torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)
    finally:
        sys.path.remove(str(workdir))


def test_file_saved_on_gpu_loads_on_cpu(workdir: Path) -> None:
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does on this machine
        torch.load(workdir / "gpu_saved.pt", weights_only=False)
    r = run_cli("gpu_saved.pt", "-o", "from_gpu.pt", "--input-shape", "1,3,8,8", "-q", cwd=workdir)
    assert r.returncode == 0, r.stderr
    small = torch.load(workdir / "from_gpu.pt", weights_only=False)
    assert small.conv1.weight.device.type == "cpu" and small.conv1.out_channels == 4


def test_example_inputs_file_as_dict(workdir: Path) -> None:
    r = run_cli("masked.pt", "-o", "small_dict.pt", "--example-inputs", "x_dict.pt", "-q", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and (workdir / "small_dict.pt").is_file()


def test_demo_into_a_missing_directory_names_the_users_path(tmp_path: Path) -> None:
    r = run_cli("--demo", "-o", "nowhere/small.pt", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: cannot write -o nowhere/small.pt: directory nowhere does not exist; create it first"
    )
    assert list(tmp_path.iterdir()) == []


def test_demo_runs_on_a_fresh_directory(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    r = run_cli("--demo", "-o", "out/small.pt", "--report", "out/report.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["channels"]["removed_fraction"] > 0.9
    assert report["max_abs_error"] <= 1e-4
    assert "zeroed channels" in r.stdout


BAD_INPUTS = [
    pytest.param(["missing.pt", "-o", "o.pt"], "model file missing.pt does not exist", id="missing-file"),
    pytest.param(["notes.txt", "-o", "o.pt"], "is not a PyTorch file", id="not-a-torch-file"),
    pytest.param(["state_dict.pt", "-o", "o.pt"], "holds a state_dict", id="state-dict"),
    pytest.param(["evil.pt", "-o", "o.pt"], "needs the global posix.system", id="unsafe-global"),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--input-shape", "2,4,8,8"],
        "fails its own forward pass",
        id="wrong-shape",
    ),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--input-shape", "2,3,8,8:int64"],
        "fails its own forward pass",
        id="wrong-dtype",
    ),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--input-shape", "2,x,8"], "is not a shape", id="bad-shape-text"
    ),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--input-shape", "2,3,8,8:float99"], "unknown dtype", id="bad-dtype"
    ),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--example-inputs", "nope.pt"], "does not exist", id="missing-inputs"
    ),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--example-inputs", "notes.txt"],
        "is not a torch.save'd tensor",
        id="bad-inputs",
    ),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--example-inputs", "x.pt", "--input-shape", "1,3,8,8"],
        "not both",
        id="both-inputs",
    ),
    pytest.param(["tokens.pt", "-o", "o.pt"], "cannot infer an input shape", id="no-inputs"),
    pytest.param(
        ["broken.pt", "-o", "o.pt", "--input-shape", "1,3,8,8"],
        "this model is broken on purpose",
        id="broken-forward",
    ),
    pytest.param(
        ["masked.pt", "-o", "masked.pt", "--input-shape", "1,3,8,8"],
        "is the input model",
        id="overwrite-input",
    ),
    pytest.param(
        ["masked.pt", "-o", "no/such/dir/o.pt"], "does not exist; create it first", id="missing-out-dir"
    ),
    pytest.param(["masked.pt", "-o", "."], "is a directory", id="out-is-dir"),
    pytest.param(["masked.pt", "-o", "notes.txt/o.pt"], "is not a directory", id="out-parent-is-file"),
    pytest.param(["masked.pt", "-o", "o.bin"], "unknown suffix '.bin'", id="unknown-suffix"),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--sparse-storage"],
        "--sparse-storage writes safetensors",
        id="sparse-needs-safetensors",
    ),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--prefix", "model."],
        "--prefix goes with --arch",
        id="prefix-without-arch",
    ),
    pytest.param(["masked.pt", "-o", "o.pt", "--round-to", "0"], "--round-to 0", id="bad-round-to"),
    pytest.param(
        ["masked.pt", "-o", "o.pt", "--input-shape", "1,3,8,8", "--bench", "--backends", "tpu"],
        "unknown tpu",
        id="bad-backend",
    ),
    pytest.param(
        ["state_dict.pt", "--arch", "nosuchmodule:Net", "-o", "o.pt"],
        "nosuchmodule",
        id="arch-not-importable",
    ),
]


@pytest.fixture(scope="module")
def bad_runs(workdir: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every bad-input case, run concurrently (each is a real subprocess; torch's import dominates)."""
    before = {p.name: digest(p) for p in workdir.iterdir() if p.is_file()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case.id: pool.submit(run_cli, *case.values[0], cwd=workdir) for case in BAD_INPUTS}
        results = {case_id: f.result() for case_id, f in futures.items()}
    after = {p.name: digest(p) for p in workdir.iterdir() if p.is_file()}
    assert after == before, "a failing run wrote or changed a file"  # nothing written, no temporary file left
    assert not (workdir / "pwned.txt").exists()
    return results


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(
    bad_runs: dict[str, subprocess.CompletedProcess[str]],
    request: pytest.FixtureRequest,
    args: list[str],
    message: str,
) -> None:
    r = bad_runs[request.node.callspec.id]
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_debug_shows_the_traceback(workdir: Path) -> None:
    r = run_cli("broken.pt", "-o", "o.pt", "--input-shape", "1,3,8,8", "--debug", cwd=workdir)
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "ValueError: this model is broken on purpose" in r.stderr


def test_unwritable_output_location(workdir: Path, tmp_path: Path) -> None:
    """/proc refuses new files even to root: the failure surfaces at write time, still one line, exit 2."""
    target = "/proc/compactor-o.pt"
    r = run_cli("masked.pt", "-o", target, "--input-shape", "1,3,8,8", cwd=workdir)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert ("cannot write" in r.stderr or "permission denied" in r.stderr) and not Path(target).exists()


def test_trust_pickle_is_explicit(workdir: Path) -> None:
    r = run_cli("--help", cwd=workdir)
    assert r.returncode == 0
    assert "--trust-pickle" in r.stdout and "examples:" in r.stdout and "compact --demo" in r.stdout


def test_counting_macs_leaves_a_training_model_unchanged() -> None:
    from compactor.measure.timing import count_macs

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model, torch.randn(2, 3, 8, 8)) == 2 * 4 * 3 * 9 * 6 * 6
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
