"""Atomic output: nothing half-written, nothing the user had overwritten without force."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MvquantError


def check_output_path(path: str | os.PathLike, *, force: bool = False, kind: str = "file",
                      need_bytes: int = 0, make_parents: bool = False, reuse: bool = False,
                      inputs: Iterable = (), marker: str | None = None) -> Path:
    """Validate an output path before any work is done, so a long run cannot fail at the end.

    kind: "file" or "dir". make_parents: missing parent directories will be created (only the
    nearest existing one must be writable). reuse: an existing directory is written into (compare's
    cache), not replaced. need_bytes: free space the output needs (e.g. a checkpoint's estimate).
    inputs: what the command reads (model, checkpoint, report): never replaced, --force or not.
    marker: for a directory output, the file mvquant writes last into every output of this kind (with
    a "files" listing): --force replaces only a directory that carries it and holds nothing else.
    """
    path = Path(path)
    check_not_an_input(path, inputs, replacing=not reuse)
    if not reuse and (path.name in ("", ".", "..") or _contains_cwd(path)):
        raise MvquantError(f"--output '{path}' is the current directory or one of its parents: name a new "
                           f"{'directory' if kind == 'dir' else 'file'} instead, e.g. --output "
                           f"{'checkpoints/my-model' if kind == 'dir' else 'out.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if make_parents:
        parent = _nearest_existing(parent)
        if not parent.is_dir():
            raise MvquantError(f"'{parent}' is a file, not a directory: choose another --output")
    elif not parent.is_dir():
        raise MvquantError(f"output directory '{parent}' does not exist: create it first (mkdir -p {parent})")
    if path.exists() and not (force or (reuse and path.is_dir())):
        raise MvquantError(f"'{path}' already exists: choose another --output or pass --force to overwrite it")
    if path.exists() and kind == "file" and path.is_dir():
        raise MvquantError(f"'{path}' is a directory: --output needs a file path")
    if path.exists() and kind == "dir" and not path.is_dir():
        raise MvquantError(f"'{path}' is a file: --output needs a directory path")
    if force and not reuse and kind == "dir" and path.is_dir():
        check_replaceable(path, marker)
    for d in (parent, path) if path.is_dir() else (parent,):
        if not os.access(d, os.W_OK | os.X_OK):
            raise MvquantError(f"cannot write to '{d}' (read-only file system or no permission): choose another "
                               "--output, or fix its permissions")
    if need_bytes > 0:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise MvquantError(f"not enough free space for '{path}': it needs about {_mb(need_bytes)}, "
                               f"'{parent}' has {_mb(free)} free: free some space or choose another --output")
    return path


def check_not_an_input(output: Path, inputs: Iterable, *, replacing: bool = True) -> None:
    """Refuse an output that is one of the command's inputs; when it would replace what is there
    (`replacing`), also a directory holding an input, or an existing file inside an input directory
    (a model's config.json, a checkpoint's files)."""
    out = _resolved(output)
    for given in inputs:
        if given is None or not Path(given).exists():
            continue                                  # a hub id or a built-in alias: nothing on disk
        inp = _resolved(Path(given))
        if out == inp:
            where = "is"
        elif replacing and out in inp.parents:
            where = "contains"
        elif replacing and output.is_file() and inp in out.parents:
            where = "is a file inside"
        else:
            continue
        raise MvquantError(f"--output '{output}' {where} the input '{given}': writing there would destroy it; "
                           "choose another --output")


def output_files(root: str | os.PathLike) -> list[str]:
    """Every file under `root`, as sorted relative POSIX paths: what an output directory holds (its
    marker records this list, so --force can tell mvquant's files from anything a user added)."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def check_replaceable(path: Path, marker: str | None) -> None:
    """--force on an existing directory: only an earlier mvquant output of the same kind (it carries
    `marker`) that holds nothing but the files the marker lists. Otherwise refuse, touching nothing."""
    fix = "choose another --output, or move it away yourself"
    if marker is None or not (path / marker).is_file():
        if not any(path.iterdir()):
            return                                    # an empty directory holds nothing to lose
        raise MvquantError(f"'{path}' exists and was not written by this mvquant command (no {marker or 'marker'}): "
                           f"--force only replaces an earlier output of the same kind; {fix}")
    try:
        listed = json.loads((path / marker).read_text()).get("files")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        listed = None
    if not isinstance(listed, (dict, list)):
        raise MvquantError(f"'{path}/{marker}' does not list the files mvquant wrote (corrupt, or from an older "
                           f"version): --force cannot tell them from yours; {fix}")
    foreign = [f for f in output_files(path) if f not in listed and f != marker]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MvquantError(f"'{path}' holds files mvquant did not write ({shown}): --force replaces only an earlier "
                           f"mvquant output, never other files; {fix}")


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _contains_cwd(path: Path) -> bool:
    """True when `path` is the working directory or one of its ancestors (replacing it would remove it)."""
    try:
        here, target = Path.cwd().resolve(), path.resolve()
    except OSError:
        return False
    return target == here or target in here.parents


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file written by another library (e.g. safetensors' save_file, which writes 0600 through
    its own temporary file) the mode a plain open() would: 0666 minus the user's umask."""
    os.chmod(path, 0o666 & ~_umask())


def _sorted_header(header: bytes) -> bytes:
    """The same safetensors header with its `__metadata__` keys sorted. safetensors keeps metadata in
    a Rust HashMap, so the key order (and the file's hash) changes from run to run; the reordered
    header has the same length, so tensor offsets are untouched."""
    obj = json.loads(header)
    if not isinstance(obj.get("__metadata__"), dict):
        return header
    obj["__metadata__"] = dict(sorted(obj["__metadata__"].items()))
    new = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(new) > len(header) or len(new) != len(header.rstrip(b" ")):
        return header  # not the compact form we expect: leave it alone rather than break the file
    return new + b" " * (len(header) - len(new))


def deterministic_safetensors(data: bytes) -> bytes:
    """Serialized safetensors bytes with sorted metadata (identical inputs -> identical bytes)."""
    n = int.from_bytes(data[:8], "little")
    return data[:8] + _sorted_header(data[8:8 + n]) + data[8 + n:]


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, then sorted metadata (byte-identical files for identical tensors) and
    the user's usual file mode (save_file writes 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        new = _sorted_header(header)
        if new != header:
            f.seek(8)
            f.write(new)
    apply_umask(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the user's usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, force: bool = False, inputs: Iterable = (),
                     marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on failure it is removed.

    The old directory (with --force: only an earlier output of this kind, see check_output_path) is
    only removed once the new one is complete.
    """
    path = Path(path)
    check_output_path(path, force=force, kind="dir", inputs=inputs, marker=marker)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, path)


def atomic_write_files(files: dict) -> None:
    """Several files as one output ({path: bytes}): all are written to temporary siblings first and
    renamed only once every one is complete, so a failure (a full disk) leaves none of them."""
    tmps = {}
    try:
        for path, data in files.items():
            path = Path(path)
            fd, tmps[path] = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
