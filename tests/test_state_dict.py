"""--arch module:callable + a weights file: each layout loads to the same model; bad input gets one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _formats_models import Hyper, RunsCode, SmallCNN, channel_pruned, example_input, trained

from compactor.errors import ArchitectureError, InputFileError, StateDictError
from compactor.io.arch import build_arch
from compactor.io.state_dict import detect_prefix, load_state_dict_model

ARCH = "_formats_models:small_cnn"
X = example_input()


def assert_same_model(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert torch.equal(loaded.eval()(X), reference.eval()(X))


def test_plain_state_dict(tmp_path: Path) -> None:
    model = trained(SmallCNN())
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert_same_model(load_state_dict_model(tmp_path / "w.pt", ARCH), model)
    assert_same_model(load_state_dict_model(tmp_path / "w.pt", "_formats_models:SmallCNN"), model)


def test_safetensors_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import save_file, save_model

    model = trained(SmallCNN())
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    assert_same_model(load_state_dict_model(tmp_path / "w.safetensors", ARCH), model)

    tied = build_arch("_formats_models:tied_cnn")
    save_model(tied, str(tmp_path / "tied.safetensors"))  # the tied head is stored once
    loaded = load_state_dict_model(tmp_path / "tied.safetensors", "_formats_models:tied_cnn")
    assert loaded.head.weight is loaded.fc.weight
    assert_same_model(loaded, tied)


def test_compactor_safetensors_rebuilds_the_compacted_shapes(tmp_path: Path) -> None:
    import compactor
    from compactor.io.save import save_output

    small, _ = compactor.compact(channel_pruned(), X)
    save_output(small, tmp_path / "small.safetensors", X)
    assert_same_model(load_state_dict_model(tmp_path / "small.safetensors", ARCH), small)


def test_masked_state_dict_bakes_orig_times_mask(tmp_path: Path) -> None:
    masked = channel_pruned()
    state = masked.state_dict()
    assert "conv1.weight_orig" in state and "conv1.weight_mask" in state
    torch.save(state, tmp_path / "masked.pt")
    loaded = load_state_dict_model(tmp_path / "masked.pt", ARCH)
    assert torch.equal(loaded.conv1.weight, state["conv1.weight_orig"] * state["conv1.weight_mask"])
    assert int((loaded.conv1.weight.flatten(1) == 0).all(1).sum()) == 4  # the masked filters are zeros
    assert torch.equal(loaded.eval()(X), masked(X))


def lightning_checkpoint(
    state: dict[str, torch.Tensor], attribute: str, **extra: object
) -> dict[str, object]:
    """The layout of ``Trainer.save_checkpoint``: the LightningModule's state_dict plus training state."""
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"{attribute}.{k}": v for k, v in state.items()},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        **extra,
    }


def test_lightning_checkpoint_prefix_detected_and_metadata_classes_ignored(tmp_path: Path) -> None:
    model = trained(SmallCNN())
    ckpt = lightning_checkpoint(model.state_dict(), "net", hparams_name="kwargs", hyper_parameters=Hyper(0.1))
    ckpt["state_dict"]["loss_fn.weight"] = torch.ones(5)  # another attribute of the LightningModule
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert_same_model(load_state_dict_model(tmp_path / "last.ckpt", ARCH), model)
    assert_same_model(load_state_dict_model(tmp_path / "last.ckpt", ARCH, prefix="net"), model)
    assert_same_model(load_state_dict_model(tmp_path / "last.ckpt", ARCH, prefix="net."), model)


def test_masked_lightning_checkpoint(tmp_path: Path) -> None:
    masked = channel_pruned()
    torch.save(lightning_checkpoint(masked.state_dict(), "model"), tmp_path / "pruned.ckpt")
    assert torch.equal(load_state_dict_model(tmp_path / "pruned.ckpt", ARCH).eval()(X), masked(X))


def test_prefix_detection() -> None:
    expected = set(SmallCNN().state_dict())
    ddp = {f"module.{k}": None for k in expected}
    assert detect_prefix(ddp, expected) == "module."
    assert detect_prefix({f"a.b.{k}_orig": None for k in expected}, expected) == "a.b."
    assert detect_prefix(dict.fromkeys(expected), expected) == ""


def test_code_in_the_file_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    model = trained(SmallCNN())
    torch.save(
        lightning_checkpoint(model.state_dict(), "model", hyper_parameters=RunsCode(str(marker))),
        tmp_path / "a.ckpt",
    )
    assert_same_model(load_state_dict_model(tmp_path / "a.ckpt", ARCH), model)
    torch.save({"conv1.weight": RunsCode(str(marker))}, tmp_path / "b.pt")
    with pytest.raises(
        InputFileError,
        match=r"entry 'conv1.weight' is a pickled builtins.exec object, not a tensor, so this is not a state_dict",
    ):
        load_state_dict_model(tmp_path / "b.pt", ARCH)
    assert not marker.exists()


def test_refuses_a_pickled_module(tmp_path: Path) -> None:
    torch.save(trained(SmallCNN()), tmp_path / "model.pt")
    with pytest.raises(InputFileError) as info:
        load_state_dict_model(tmp_path / "model.pt", ARCH)
    assert str(info.value) == (
        f"{tmp_path / 'model.pt'} holds a pickled _formats_models.SmallCNN object, not a state_dict; it is "
        f"probably the model itself: pass it directly, without --arch"
    )


def test_refuses_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = trained(SmallCNN()).state_dict()
    del state["fc.bias"]
    state["head.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(StateDictError) as info:
        load_state_dict_model(tmp_path / "w.pt", ARCH)
    assert str(info.value) == (
        f"{tmp_path / 'w.pt'} does not fit --arch {ARCH}: 1 missing (fc.bias); 1 unexpected (head.weight) keys; "
        f"check that --arch builds the model that was saved, or pass --prefix to choose the part of the "
        f"checkpoint that holds it"
    )


def test_refuses_a_shape_mismatch(tmp_path: Path) -> None:
    torch.save(SmallCNN(width=4).state_dict(), tmp_path / "w.pt")
    with pytest.raises(
        StateDictError,
        match=r"w.pt does not fit --arch _formats_models:small_cnn: conv1.weight is "
        r"\(4, 3, 3, 3\) in the file but \(8, 3, 3, 3\) in the architecture; --arch must build the dense",
    ):
        load_state_dict_model(tmp_path / "w.pt", ARCH)


def test_refuses_a_wrong_prefix(tmp_path: Path) -> None:
    torch.save(lightning_checkpoint(SmallCNN().state_dict(), "model"), tmp_path / "a.ckpt")
    with pytest.raises(
        StateDictError,
        match=r"--prefix 'net.': no key of .*a.ckpt starts with it; its keys start with model.",
    ):
        load_state_dict_model(tmp_path / "a.ckpt", ARCH, prefix="net")


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (
            "_formats_models",
            r"--arch '_formats_models' is not module:callable; write e.g. --arch mymodels:resnet18",
        ),
        ("no_such_module_xyz:Net", r"module 'no_such_module_xyz' cannot be imported \(ModuleNotFoundError: "),
        ("_formats_models:Missing", r"module '_formats_models' has no 'Missing'; name a class or function"),
        ("_formats_models:NOT_CALLABLE", r"NOT_CALLABLE is a int, not callable; name a class or a function"),
        (
            "_formats_models:not_a_module",
            r"not_a_module\(\) returned a str, not an nn.Module; it must return the dense",
        ),
        (
            "_formats_models:RunsCode",
            r"calling RunsCode\(\) failed \(TypeError: .*\); it must build the dense model",
        ),
    ],
)
def test_refuses_a_bad_arch(arch: str, message: str) -> None:
    with pytest.raises(ArchitectureError, match=message):
        build_arch(arch)


def test_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"weights file .*nope.pt does not exist; check the path"):
        load_state_dict_model(tmp_path / "nope.pt", ARCH)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(
        InputFileError, match=r"junk.pt is not a PyTorch file \(expected the zip archive written by"
    ):
        load_state_dict_model(tmp_path / "junk.pt", ARCH)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(InputFileError, match=r"junk.safetensors is not a safetensors file \("):
        load_state_dict_model(tmp_path / "junk.safetensors", ARCH)
    (tmp_path / "cut.pt").write_bytes(b"\x80\x02junk")
    with pytest.raises(InputFileError, match=r"cut.pt could not be read as a PyTorch file \("):
        load_state_dict_model(tmp_path / "cut.pt", ARCH)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(InputFileError, match=r"list.pt holds a list, not a state_dict; save one with"):
        load_state_dict_model(tmp_path / "list.pt", ARCH)


@pytest.mark.slow  # importing lightning takes ~10 s
def test_real_lightning_checkpoint(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = channel_pruned()
            self.loss = torch.nn.CrossEntropyLoss(weight=torch.ones(5))

    module = Module()
    trainer = lightning.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_state_dict_model(tmp_path / "last.ckpt", ARCH)
    assert torch.equal(loaded.eval()(X), module.model.eval()(X))
