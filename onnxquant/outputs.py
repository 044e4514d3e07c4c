"""How commands write files: never onto an input, all outputs of a command or none, with ordinary modes.

Every output is first written to a temp file beside its target, named `.NAME.<host>-<pid>.<random>.tmp`
(a folder of that name for a model with external data). Inside `staged_outputs()` the temps of one command
are kept until the command has produced everything, then renamed onto their targets together; a failure or
an interrupt before that removes them, so a report never lacks its model or a model its table. SIGINT and
SIGTERM are held back while the renames run, and a rename that fails puts back what the earlier ones
replaced (from hard-linked backups), so the targets end all old or all new.

A process killed with SIGKILL cannot remove its temps; the next write beside the same target removes those
whose process is gone (same host, dead pid) or that are older than a day (any host, pid reused).

An output gets the mode a plain `open()` would give it: an existing file keeps its mode, a new one gets
0666 & ~umask (mkstemp's 0600 is not kept).

`guard_outputs` refuses, before any work, an output that is (by path, symlink or hard link) a file the
command reads, or another output of the same command.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib.machinery import PathFinder
from pathlib import Path

import onnx

from onnxquant.errors import BadPathError

log = logging.getLogger(__name__)

STALE_AGE_S = 24 * 3600  # a temp older than this is stale whatever its pid says (pids are reused)
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ------------------------------------------------------------------------------------------------ temp names


def host_tag() -> str:
    """Six hex digits naming this host, so a pid in a temp's name is only trusted on the host that wrote it
    (containers sharing a folder have their own pid spaces)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def temp_prefix(target_name: str) -> str:
    return f".{target_name}.{host_tag()}-{os.getpid()}."


def temp_pattern(target_name: str) -> re.Pattern[str]:
    """Our temps (files, folders and backups) for `target_name`, and nothing a user would name."""
    name = re.escape(target_name)
    return re.compile(rf"\.{name}\.(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)\.[a-z0-9_]{{8}}\.tmp")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_stale(entry: os.DirEntry, match: re.Match[str], now: float) -> bool:
    try:
        age = now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    if age > STALE_AGE_S:
        return True
    pid = int(match["pid"])
    return match["host"] == host_tag() and pid != os.getpid() and not pid_alive(pid)


def remove_stale_temps(target: Path) -> int:
    """Remove temps a killed run left beside `target`; returns how many were removed."""
    pattern, now, removed = temp_pattern(target.name), time.time(), 0
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match is None or not is_stale(entry, match, now):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
                log.info("removed stale temp %s", entry.path)
    return removed


# ------------------------------------------------------------------------------------------------ modes


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (changing it races other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(target: Path) -> int:
    """What open(target, "w") would leave: an existing file's mode, else 0666 & ~umask."""
    try:
        st = os.stat(target)
    except OSError:
        return 0o666 & ~current_umask()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o666 & ~current_umask()


# ------------------------------------------------------------------------------------------------ targets


def check_writable(out: Path) -> None:
    """An output path that can be written: not a directory, in a folder that exists and is writable."""
    if out.is_dir():
        raise BadPathError(f"{out}: is a directory; accepted: a file path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise BadPathError(f"{out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BadPathError(f"{out}: directory {parent} is not writable")


def real_target(path: str | os.PathLike) -> Path:
    """Where a write to `path` lands: through symlinks, as open() would write."""
    path = Path(path)
    check_writable(path)
    return Path(os.path.realpath(path))


def new_temp(target: Path) -> Path:
    remove_stale_temps(target)
    try:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise BadPathError(f"{target}: cannot write ({exc.strerror})") from exc
    os.close(fd)
    return Path(name)


def new_temp_dir(target: Path) -> Path:
    remove_stale_temps(target)
    try:
        return Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise BadPathError(f"{target}: cannot write ({exc.strerror})") from exc


def hard_link_backup(target: Path) -> Path | None:
    """A second name for the file at `target`, so a failed commit can put it back; None when there is no
    file or the filesystem has no hard links."""
    if not target.is_file():
        return None
    for _ in range(8):
        backup = target.with_name(f"{temp_prefix(target.name)}{secrets.token_hex(4)}.tmp")
        try:
            os.link(target, backup)
            return backup
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


# ------------------------------------------------------------------------------------------------ signals


def _before_rename(target: Path) -> None:
    """Called before each rename of a commit; tests replace it to interrupt a commit at a known point."""


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers they would have met.
    Only the main thread can set handlers; elsewhere the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in HELD_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            deliver(signum, previous[signum])


def deliver(signum: int, handler) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler != signal.SIG_IGN:
        os.kill(os.getpid(), signum)


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class OutputBatch:
    """Temps waiting to be renamed onto their targets together."""

    renames: list[tuple[Path, Path]] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def add(self, tmp: Path, target: Path) -> None:
        for _, other in self.renames:
            if other == target:
                raise BadPathError(f"{target}: written twice by one command; accepted: one path per output")
        self.renames.append((tmp, target))

    def discard(self) -> None:
        for tmp, _ in self.renames:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.renames, self.folders = [], []

    def commit(self) -> None:
        with held_signals():
            try:
                for tmp, target in self.renames:
                    os.chmod(tmp, output_mode(target))
                self._rename_all()
            finally:
                self.discard()

    def _rename_all(self) -> None:
        backups = [(target.is_file(), hard_link_backup(target)) for _, target in self.renames]
        done: list[tuple[Path, bool, Path | None]] = []
        try:
            for (tmp, target), (existed, backup) in zip(self.renames, backups):
                _before_rename(target)
                os.replace(tmp, target)
                done.append((target, existed, backup))
        except OSError as exc:
            put_back(done)
            failed = self.renames[len(done)][1]
            raise BadPathError(f"{failed}: cannot write ({exc.strerror}); no output was written") from exc
        finally:
            for _, backup in backups:
                if backup is not None:
                    with contextlib.suppress(OSError):
                        backup.unlink()


def put_back(done: list[tuple[Path, bool, Path | None]]) -> None:
    """Undo renames already made: the old file back from its backup, or no file where there was none (an old
    file without a backup, on a filesystem without hard links, keeps the new content)."""
    for target, existed, backup in reversed(done):
        with contextlib.suppress(OSError):
            if backup is not None:
                os.replace(backup, target)
            elif not existed:
                target.unlink()


_batch: ContextVar[OutputBatch | None] = ContextVar("onnxquant_output_batch", default=None)


@contextlib.contextmanager
def staged_outputs() -> Iterator[OutputBatch]:
    """Every file written through `atomic_write`/`staged_folder` in the block appears at the end, together;
    an exception (or interrupt) in the block leaves none of them. Nested blocks join the outer one."""
    outer = _batch.get()
    if outer is not None:
        yield outer
        return
    batch = OutputBatch()
    token = _batch.set(batch)
    try:
        yield batch
    except BaseException:
        batch.discard()
        raise
    finally:
        _batch.reset(token)
    batch.commit()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path to write; on success it replaces `path` (at the end of the enclosing `staged_outputs`,
    or at once outside one), on failure it is removed."""
    target = real_target(path)
    with staged_outputs() as batch:
        tmp = new_temp(target)
        try:
            yield tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        batch.add(tmp, target)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    """A temp folder beside `path` and the target's real path; every file written into the folder replaces
    its namesake beside the target (a model and its external data file, committed together)."""
    target = real_target(path)
    with staged_outputs() as batch:
        folder = new_temp_dir(target)
        batch.folders.append(folder)
        yield folder, target
        for tmp in sorted(folder.iterdir()):
            batch.add(tmp, target.with_name(tmp.name))


# ------------------------------------------------------------------------------------------------ the guard


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file a path reaches, through symlinks; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def files_of(path: Path) -> Iterator[Path]:
    """A file itself, or every file under a folder (a data directory is read file by file)."""
    if not path.is_dir():
        yield path
        return
    for root, _dirs, names in os.walk(path):
        for name in names:
            yield Path(root) / name


def external_data_files(model_path: Path) -> list[Path]:
    """The external-data files a model names (read without its tensors); none when it does not parse."""
    if not model_path.is_file():
        return []
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001  (load_model reports an unreadable model; the guard has nothing to add)
        return []
    found = [
        model_path.parent / entry.value
        for tensor in graph_tensors(model.graph)
        for entry in tensor.external_data
        if entry.key == "location" and entry.value
    ]
    return list(dict.fromkeys(found))


def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of a graph and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from graph_tensors(sub)


def reader_files(spec: str | None) -> list[Path]:
    """The source file of a `package.module:function` reader, found on sys.path without importing it."""
    if not spec or ":" not in spec:
        return []
    locations = None
    module_spec = None
    for part in spec.partition(":")[0].split("."):
        if not part.isidentifier():
            return []
        try:
            module_spec = PathFinder.find_spec(part, locations)
        except (ImportError, ValueError):
            return []
        if module_spec is None:
            return []
        locations = module_spec.submodule_search_locations
    origin = getattr(module_spec, "origin", None)
    return [Path(origin)] if origin and os.path.isfile(origin) else []


@dataclass(frozen=True)
class Inputs:
    """What a command reads, by the option that names it: files, data folders, and models (whose external
    data files count as inputs too)."""

    paths: Mapping[str, str | os.PathLike | None] = field(default_factory=dict)
    models: Mapping[str, str | os.PathLike | None] = field(default_factory=dict)
    reader: str | None = None

    def files(self) -> Iterator[tuple[str, Path]]:
        for label, path in {**self.paths, **self.models}.items():
            if path is not None:
                for f in files_of(Path(path)):
                    yield label, f
        for label, path in self.models.items():
            if path is not None:
                for f in external_data_files(Path(path)):
                    yield f"{label}'s external data", f
        for f in reader_files(self.reader):
            yield "--calib-reader", f


def guard_outputs(outputs: Mapping[str, str | os.PathLike | None], inputs: Inputs) -> None:
    """Refuse (one line, before any work) an output that is an input of the command or another output."""
    given = {label: Path(p) for label, p in outputs.items() if p is not None}
    for path in given.values():
        check_writable(path)
    refuse_colliding_outputs(given)
    existing = {label: (path, identity(path)) for label, path in given.items() if identity(path) is not None}
    if not existing:
        return  # an output that does not exist yet is no input
    for in_label, in_path in inputs.files():
        in_id = identity(in_path)
        for label, (path, out_id) in existing.items():
            if in_id == out_id:
                same = "" if os.path.abspath(in_path) == os.path.abspath(path) else f" ({in_path})"
                raise BadPathError(
                    f"{path}: output {label} equals the input {in_label}{same}; accepted: a path that is "
                    "not read by this command"
                )


def refuse_colliding_outputs(given: Mapping[str, Path]) -> None:
    seen: dict[object, str] = {}
    for label, path in given.items():
        keys = {os.path.realpath(path)} | ({identity(path)} if identity(path) else set())
        for key in keys:
            if key in seen:
                raise BadPathError(
                    f"{path}: output {label} equals output {seen[key]}; accepted: a different path for "
                    "each output"
                )
        seen.update(dict.fromkeys(keys, label))


def companion(label: str, model_out: str | os.PathLike | None) -> dict[str, Path]:
    """A model output's external data file (written beside it for models over 2 GiB), as an output."""
    if model_out is None:
        return {}
    path = Path(model_out)
    return {f"{label}'s external data": path.with_name(path.name + ".data")}
