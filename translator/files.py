"""Files that appear whole or not at all: atomic writes, directory fsync, export version folders."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path) -> None:
    """Flushes a directory's entries (a rename into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_tree(path: Path) -> None:
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_path(path, directory: bool = False):
    """Yields a unique temporary path beside `path`; renames it to `path` if the block succeeds.

    The temporary name keeps `path`'s suffix (Keras and matplotlib choose the format from it)
    and is unique (`<name>.<random>.tmp<suffix>`), so concurrent writers never share a temp
    file. On success the file (or, with `directory=True`, every file in the directory) is
    fsynced, renamed over `path` and the parent directory fsynced; on any error the temporary
    file or directory is removed and `path` is untouched. A directory replaces an existing
    `path` only when that is an empty directory (`os.replace` semantics).

    Example:

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = pathlib.Path(tmp).write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{path.stem}.", f".tmp{path.suffix}"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create 0600/0700; the result gets the permissions an ordinary open()
    # or mkdir() would give (a server run as another user must be able to read an export).
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    try:
        yield tmp
        if directory:
            _fsync_tree(tmp)
        else:
            with open(tmp, "rb") as file:
                os.fsync(file.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write(path, data: bytes | str, encoding: str = "utf-8") -> None:
    """Writes `data` (bytes, or text in `encoding`) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)


def version_dirs(base_dir) -> list[tuple[int, Path]]:
    """The integer-named subdirectories of an export's base directory, oldest first.

    This is the layout TF Serving watches (`<model_base_path>/<version>/saved_model.pb`);
    anything else in the folder (model.keras, config.yaml, temporary folders) is ignored.
    """
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        return []
    found = [(int(p.name), p) for p in base_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found)
