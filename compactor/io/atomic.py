"""Write outputs atomically, refuse to overwrite the input, leave nothing half-written.

Every writer goes through :func:`atomic_write`: the bytes go to a temporary file in the destination's
directory, then ``os.replace`` renames it over the destination. On any failure the temporary file is
removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import OutputPathError, first_line


def check_output_path(
    out: str | os.PathLike[str],
    model_path: str | os.PathLike[str] | None,
    *,
    force: bool,
    directory: bool = False,
) -> Path:
    """Fail early, before any work, if ``out`` cannot be written or would overwrite the input.
    ``directory``: ``out`` is a directory to create (a Hugging Face directory): new, or empty."""
    path = Path(out)
    if directory:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise OutputPathError(
                f"-o {path} is a directory that is not empty; give a new directory (a Hugging Face model) or a "
                f"file name such as {path / 'small.pt'}"
            )
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise OutputPathError(
                f"cannot write -o {path}: {parent} is not a writable directory; create it first"
            )
        return path
    if (
        model_path is not None
        and path.exists()
        and path.resolve() == Path(model_path).resolve()
        and not force
    ):
        raise OutputPathError(
            f"-o {path} is the input model; choose another output path, or pass --force to replace it"
        )
    if path.is_dir():
        raise OutputPathError(f"-o {path} is a directory; give a file name such as {path / 'small.pt'}")
    if path.exists() and not path.is_file():  # a device or a pipe: renaming over it would replace it
        raise OutputPathError(f"-o {path} is not a regular file (a device or a pipe); give a file name")
    if (
        model_path is not None
        and path.exists()
        and Path(model_path).exists()
        and path.samefile(model_path)
        and not force
    ):
        raise OutputPathError(
            f"-o {path} is the input model (a link to it); choose another output path, or pass --force to replace it"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"cannot write -o {path}: {parent} is not a directory; choose another path")
    if not parent.is_dir():
        raise OutputPathError(f"cannot write -o {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputPathError(f"cannot write -o {path}: permission denied; choose a writable location")
    return path


TMP_MARK = ".compactor-"  # temporaries are ".<name>.compactor-<pid>-<random>.tmp"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    The temporary's name says whose it is (``.small.pt.compactor-<pid>-<random>.tmp``): a run killed
    mid-write leaves one behind, and the next run writing ``path`` removes those whose process is gone."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    remove_stale_temporaries(folder, target.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARK}{os.getpid()}-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; a saved model gets the usual mode
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: Path, name: str) -> list[Path]:
    """Remove the temporaries of ``name`` in ``folder`` left by runs whose process no longer exists."""
    removed = []
    for tmp in folder.glob(f".{glob.escape(name)}{TMP_MARK}*.tmp"):
        pid_text = tmp.name[len(name) + 1 + len(TMP_MARK) :].partition("-")[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> int:
    """Run ``writer(tmp_path)`` and move the result into place; return the bytes written."""
    try:
        with atomic_write(path) as tmp:
            writer(tmp)
            size = tmp.stat().st_size
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}; check the path and free space") from e
    except (
        RuntimeError
    ) as e:  # torch's zip writer reports a short write (disk full, size limit) as a RuntimeError
        if "inline_container" not in str(e) and "write" not in str(e).lower():
            raise
        raise OutputPathError(
            f"cannot write {path}: the write failed ({first_line(e)}); check free space and file size limits, "
            f"or choose another path"
        ) from e
    return size
