"""Files that appear whole or not at all (atomic writes, sets published together); locks."""

import contextlib
import errno
import fcntl
import glob
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

# What a filesystem answers when it cannot fsync a directory (or open one to do it): nothing
# to flush there. Anything else (EIO, ENOSPC) is an error the caller must hear about.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES}


def fsync_dir(path) -> None:
    """Flushes a directory's entries (a rename into it) to disk; a no-op where unsupported.

    Raises:
        OSError: the filesystem failed to flush (an I/O error, a full disk).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (and Windows) cannot fsync a directory
        if e.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_tree(path) -> None:
    """Flushes every file under `path` and every directory's entries to disk."""
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
            fsync_tree(tmp)
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


@contextlib.contextmanager
def staging_dir(parent, prefix: str = ".staging-"):
    """Yields a new, uniquely named, empty directory inside `parent`; removes it at the end.

    For writing a set of files (`publish` then renames them out of it): inside `parent`, so
    on its filesystem and every rename out of it atomic; hidden (`.<prefix><random>.tmp`), so
    neither TF Serving nor `version_dirs` take it for a version. Whatever is left in it at the
    end (everything, after an error) is deleted.

    A process killed mid-write (`kill -9`, a power cut) cannot delete its staging directory,
    so each one names its owner (`.owner`: host and process id) and is locked (`flock`) while
    in use, and a new one first deletes the abandoned ones of the same `prefix` in `parent`:
    those whose owner ran on this host, is gone, and holds no lock. One that holds the previous
    files of an interrupted `publish` (a non-empty `.previous/`) is kept, with a warning.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    try:
        (path / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        fd = os.open(path, os.O_RDONLY)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        with contextlib.suppress(OSError):  # where directories cannot be locked: no sweeping
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _remove_abandoned(parent, prefix, keep=path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


_OWNER = ".owner"


def _abandoned(directory: Path) -> bool:
    """Whether the staging `directory` was made on this host by a process that is gone."""
    try:
        host, pid = (directory / _OWNER).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False  # no owner recorded (being created, or not ours): leave it
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _remove_abandoned(parent: Path, prefix: str, keep: Path) -> None:
    """Deletes the abandoned staging directories `<prefix>*.tmp` in `parent` (see
    `staging_dir`)."""
    for other in parent.glob(f"{glob.escape(prefix)}*.tmp"):
        try:
            if other == keep or not other.is_dir() or other.is_symlink() or not _abandoned(other):
                continue
            previous = other / ".previous"
            if previous.is_dir() and any(previous.iterdir()):
                log.warning(
                    "keeping %s: an interrupted export left the previous files of %s in its "
                    ".previous/ (move them back, then delete it)",
                    other,
                    parent,
                )
                continue
            fd = os.open(other, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # in use by a live writer
            continue
        else:
            log.info("removing %s, left by an interrupted write", other)
            shutil.rmtree(other, ignore_errors=True)
        finally:
            os.close(fd)


def publish(moves, backup_dir) -> None:
    """Renames each `(staged, target)` of `moves` over its target, in order, as one change.

    The staged paths must be on the targets' filesystem (see `staging_dir`), complete and
    fsynced. Each rename is atomic, so a reader sees every target whole, old or new. The last
    move is the commit point: it runs only once the others are on disk (their directories
    fsynced), and it must not replace anything (a directory target that exists is an error).
    If a move before it fails, the targets already replaced get their previous files back
    (hard links kept in `backup_dir`, a directory on the same filesystem) and the new ones are
    removed, so nothing visible changed, and the error is raised. A failure to fsync after
    the commit point only logs a warning: the new set is in place.

    Raises:
        FileExistsError: the last target exists.
        OSError: a move failed (the previous files are back).
    """
    moves = [(Path(a), Path(b)) for a, b in moves]
    *files, (last_staged, last_target) = moves
    if last_target.exists():
        raise FileExistsError(f"{last_target} exists already")
    backup_dir = Path(backup_dir)
    backup_dir.mkdir(parents=True, exist_ok=True)
    replaced = []  # (target, its previous file's backup or None)
    try:
        for i, (staged, target) in enumerate(files):
            backup = None
            if target.exists():
                backup = backup_dir / f"{i}-{target.name}"
                os.link(target, backup)
            os.replace(staged, target)
            replaced.append((target, backup))
        for directory in {target.parent for _, target in moves}:
            fsync_dir(directory)
        os.rename(last_staged, last_target)
    except BaseException:
        for target, backup in reversed(replaced):
            try:
                if backup is None:
                    target.unlink()
                else:
                    os.replace(backup, target)
            except OSError as e:  # a second failure: say what is left
                log.error("could not put back %s after a failed publish: %s", target, e)
        raise
    try:
        fsync_dir(last_target.parent)
    except OSError as e:
        log.warning("%s is in place, but flushing its directory failed: %s", last_target, e)


@contextlib.contextmanager
def locked_directory(path):
    """Holds an exclusive lock on the directory `path` itself (no lock file), waiting for it.

    For short critical sections among cooperating processes, such as two exports publishing
    into one folder. Where the filesystem cannot lock a directory, it runs unlocked.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.debug("cannot lock %s (%s): going on without the lock", path, e)
        yield
    finally:
        os.close(fd)  # releases the lock


class LockedError(OSError):
    """An exclusive lock is held by another process; `holder` describes it (`pid N on host
    H since T`, or `an unknown process`)."""

    def __init__(self, path, holder: str):
        super().__init__(f"{path} is locked by {holder}")
        self.path = path
        self.holder = holder


@contextlib.contextmanager
def exclusive_lock(path):
    """Holds an exclusive lock on the file `path` (created if missing) or fails at once.

    A `flock` lock: the kernel releases it when the process ends, however it ends, so a lock
    is never stale. The holder writes `pid N on host H since T` into the file, for the message
    another process gets. Where the filesystem has no locks (an NFS mount without a lock
    manager), it logs a warning and runs unlocked.

    Raises:
        LockedError: another process holds the lock (its `holder` says who).
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "an unknown process"
            raise LockedError(path, holder) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            log.warning("cannot lock %s (%s): going on without the lock", path, e)
            locked = False
        if locked:
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            os.ftruncate(fd, 0)
            os.write(
                fd, f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode()
            )
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


def keras_load_error(path, error: Exception) -> str:
    """Why `keras.saving.load_model(path)` failed, in words: Keras says "File not found" for a
    `.keras` file that exists but is not a whole zip archive (a copy cut short)."""
    import zipfile

    try:
        with open(path, "rb") as f:
            whole = zipfile.is_zipfile(f)
    except OSError as e:  # missing, unreadable: say so, not "cut short"
        return f"{type(e).__name__}: {e}"
    if not whole:
        return "it is not a complete .keras file (a zip archive; a copy or download cut short)"
    return f"{type(error).__name__}: {error}"
