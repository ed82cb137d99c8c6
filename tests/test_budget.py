"""The time budget (``compact(time_limit=...)``, ``--time-limit``): past it, one line names the part that was
not analysed, and nothing is returned or written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import ResNet, mask_ln

import compactor
from compactor import util
from compactor.engine.coupling import build_groups
from compactor.errors import TimeLimitError
from compactor.inputs import ExampleInputs

HINT = "nothing was written (raise it with --time-limit SECONDS, Python: time_limit=)"


def _masked() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet((8, 16), (1, 1))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            mask_ln(m, 0.3)
    return model.eval()


def test_a_tiny_limit_stops_after_the_first_stage() -> None:
    with pytest.raises(TimeLimitError) as e:
        compactor.compact(_masked(), torch.randn(1, 3, 16, 16), time_limit=1e-9)
    assert (
        str(e.value)
        == f"the time limit of 1e-09 s was reached before the attention heads could be analysed; {HINT}"
    )


def test_the_coupling_walk_names_the_layer_it_stopped_at(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _masked()
    clock = iter([0.0] + [100.0] * 10_000)  # the deadline is set at 0 s; every later reading is past it
    monkeypatch.setattr(util.time, "monotonic", lambda: next(clock))
    with util.deadline(10), pytest.raises(TimeLimitError) as e:
        build_groups(model, ExampleInputs.of(torch.randn(1, 3, 16, 16)))
    assert (
        str(e.value)
        == f"the time limit of 10 s was reached before the channel coupling from fc could be analysed; {HINT}"
    )


def test_no_limit_and_a_bad_limit() -> None:
    with util.deadline(None):
        util.check_time("anything")  # no deadline: never raises
    with (
        pytest.raises(ValueError, match="time_limit must be a positive number of seconds or None, found 0"),
        util.deadline(0),
    ):
        pass


def test_cli_time_limit_is_one_line_exit_1(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "compactor.cli",
            "--demo",
            "-o",
            str(tmp_path / "o.pt"),
            "--time-limit",
            "1e-9",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    demo, error = r.stderr.strip().splitlines()  # --demo says where it wrote its masked model first
    assert demo.startswith("demo: wrote a masked model to ")
    assert (
        error
        == f"error: the time limit of 1e-09 s was reached before the attention heads could be analysed; {HINT}"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["demo_masked.pt"]  # the demo's input, no output
