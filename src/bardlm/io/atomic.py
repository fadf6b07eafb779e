"""All-or-nothing writes of several files (a checkpoint is weights + config + tokenizer + ...).

Renaming one file is atomic; renaming four is not: a crash between two renames would leave files
of two different saves. So a save is a small transaction:

1. every file is written to a temporary name beside its target and flushed (a full disk fails
   here, and nothing has been replaced);
2. a journal listing (temporary, target) pairs is written atomically: the commit point;
3. the temporary files are renamed into place, and the journal is removed.

Whoever opens the folder next (`recover`) finishes the renames of a journal left by a crash
between 2 and 3, so a reader sees the old save whole or the new save whole, never a mix. It also
deletes temporary files that no journal names and whose writer is dead (a crash before 2): a
temporary name carries its writer's process id, so a save still being written is left alone.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import BardlmError

JOURNAL = ".bardlm-commit.json"
Writer = Callable[[str], None]
# `.{target}.{pid}-{random}.tmp`; older versions wrote `.{target}.{random}.tmp` (no pid).
_TEMP = re.compile(r"^\..+\.tmp$")
_TEMP_PID = re.compile(r"\.(\d+)-[^.]+\.tmp$")


def _mkstemp(path: Path) -> str:
    """A new empty temporary file beside `path`, named after it and this process."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    return tmp


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_mode(path: str | Path) -> None:
    """Give a file made by `tempfile.mkstemp` (always 0600) the mode an ordinary `open` would:
    0666 less the umask, so a saved checkpoint is as readable to other accounts (a server user)
    as any other file this user writes. The mode survives the rename into place."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_many(writes: list[tuple[Path, Writer]]) -> None:
    """Write several files of one folder so that either all of them are replaced or none is."""
    if not writes:
        return
    folder = writes[0][0].parent
    if any(p.parent != folder for p, _ in writes):
        raise ValueError("atomic_write_many writes into one folder")
    folder.mkdir(parents=True, exist_ok=True)
    recover(folder)  # a journal of an earlier crash is finished first
    temps: list[tuple[str, Path]] = []
    path = folder
    try:
        for path, write in writes:
            tmp = _mkstemp(path)
            temps.append((tmp, path))
            write(tmp)
            default_mode(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        journal = json.dumps([[Path(t).name, p.name] for t, p in temps])
        _replace_with(folder / JOURNAL, journal)  # the commit point
    except BaseException as e:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise BardlmError(
                f"could not write {path} ({e.strerror or e}); the previous files are intact. "
                "Free disk space (or fix permissions) and save again"
            ) from None
        raise
    recover(folder)


def _replace_with(path: Path, text: str) -> None:
    tmp = _mkstemp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    default_mode(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def recover(folder: str | Path) -> None:
    """Finish a save interrupted after its commit point (see the module docstring)."""
    folder = Path(folder)
    journal = folder / JOURNAL
    if not journal.is_file():
        _clear_orphans(folder)
        return
    try:
        pairs = json.loads(journal.read_text(encoding="utf-8"))
        for tmp, name in pairs:
            try:
                os.replace(folder / tmp, folder / name)
            except FileNotFoundError:
                pass  # renamed already (before a crash, or by another process recovering too)
        _fsync_dir(folder)
        journal.unlink(missing_ok=True)
        _clear_orphans(folder)
    except FileNotFoundError:
        return  # another process finished this save meanwhile
    except (OSError, ValueError) as e:
        raise BardlmError(
            f"{folder} holds an unfinished save ({JOURNAL}) that cannot be completed ({e}); "
            "make the folder writable and retry"
        ) from None


def _clear_orphans(folder: Path) -> None:
    """Delete the temporary files of saves that died before their commit point (kill -9, power
    loss): no journal names them (a journal's were just renamed), and their writer is gone."""
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError:
        return  # an unreadable folder is reported by whoever reads it
    for name in names:
        if not _TEMP.match(name) or _writer_alive(name):
            continue
        try:
            (folder / name).unlink()
        except OSError:
            pass  # removed meanwhile, or a read-only folder: harmless leftovers


def _writer_alive(name: str) -> bool:
    """Whether the process named in a temporary file's name still runs (False without a pid)."""
    m = _TEMP_PID.search(name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return True  # a save of this very process (another thread) is under way
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def text_writer(text: str) -> Writer:
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")


def tensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Writer:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(tensors, tmp, metadata=metadata)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_many([(Path(path), text_writer(text))])
