"""Files in and out: atomic writes with the user's umask, output paths checked before any work
(and never over a user's file of another kind), and size-capped, alias-free YAML reading."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from moaplan.errors import MoaplanError, one_line

# What a moaplan YAML file (plan or profile metadata) may hold.  The largest real plan (128
# layers x 64 KV heads, with per-layer figures) is well under 1 MiB; the caps stop a huge or
# hostile file before the pure-Python parser spends minutes or gigabytes on it.
MAX_YAML_BYTES = 8 * 2**20
MAX_YAML_NODES = 1_000_000
MAX_YAML_DEPTH = 64


def _umask() -> int:
    """The process umask, read without changing it where /proc says it (os.umask can only
    read it by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The file gets the mode a plain ``open`` would give it (the user's umask; an existing
    file keeps its mode), not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_head(path: Path, size: int = 4096) -> bytes:
    """The first ``size`` bytes of ``path`` (what output checks recognise a file's kind by)."""
    with path.open("rb") as f:
        return f.read(size)


def check_output(path: str | os.PathLike, what: str,
                 same_kind: Callable[[Path], bool] | None = None) -> Path:
    """Fail now, before any work, unless ``path`` can be written as ``what``: it must not be
    a directory, its nearest existing parent must be a writable directory, and an existing,
    non-empty file there must be of the same kind (``same_kind(path)``), so that no command
    ever overwrites a user's file of another kind."""
    text = os.fspath(path)
    path = Path(text)
    if text.endswith(os.sep) or path.is_dir():
        raise MoaplanError(f"{what} {text} is a directory; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MoaplanError(f"cannot write {what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoaplanError(f"cannot write {what} {path}: {parent} is not writable")
    if path.exists():
        if not path.is_file():
            raise MoaplanError(f"{what} {path} exists and is not a regular file")
        if path.stat().st_size and same_kind is not None and not _is_kind(path, same_kind):
            raise MoaplanError(f"{path} exists and is not a {what}; moaplan will not overwrite "
                               "it: move it away or choose another name")
    return path


def _is_kind(path: Path, same_kind: Callable[[Path], bool]) -> bool:
    try:
        return same_kind(path)
    except OSError:
        return False


def read_text(path: str | os.PathLike, what: str, max_bytes: int,
              error: type[MoaplanError] = MoaplanError) -> str:
    """The UTF-8 text of ``path``, refusing a missing, unreadable, binary or oversized file
    with one line."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise error(f"cannot read {what} {path}: not a file")
        if size > max_bytes:
            raise error(f"cannot read {what} {path}: it is {size / 2**20:.1f} MiB, moaplan "
                        f"reads at most {max_bytes / 2**20:.2f} MiB here")
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"cannot read {what} {path}: it does not exist") from None
    except UnicodeDecodeError as err:
        raise error(f"cannot read {what} {path}: not UTF-8 text (byte {err.start}: "
                    f"{err.reason})") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}") from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without what only a hostile or broken file needs: aliases (an alias
    bomb expands to gigabytes), duplicate keys (the later silently won), nesting deeper than
    :data:`MAX_YAML_DEPTH` (Python's recursion limit) or more than :data:`MAX_YAML_NODES`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", mark)
        self._nodes += 1
        self._depth += 1
        if self._nodes > MAX_YAML_NODES or self._depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_YAML_NODES} values or nested deeper than "
                            f"{MAX_YAML_DEPTH}", mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        mapping = super().construct_mapping(node, deep=deep)
        if len(mapping) != len(node.value):
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return mapping


class _NoAliasDumper(yaml.SafeDumper):
    """``yaml.safe_dump`` that writes a value used twice out twice: :func:`load_yaml` refuses
    aliases, so moaplan must never write one."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any, **options: Any) -> str:
    """YAML text of ``data`` that :func:`load_yaml` reads back (no aliases)."""
    return yaml.dump(data, Dumper=_NoAliasDumper, **options)


def load_yaml(path: str | os.PathLike, what: str,
              error: type[MoaplanError] = MoaplanError) -> Any:
    """Parse a moaplan YAML file (see :class:`_StrictLoader` and :data:`MAX_YAML_BYTES`)."""
    text = read_text(path, what, MAX_YAML_BYTES, error)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or err
        raise error(f"{path}: not valid YAML{line}: {one_line(problem)}") from None
