"""Writing outputs safely: atomically, with the process umask, and never over a user's files.

The output policy every writer follows (:func:`write_dir_atomically`):

- a directory output appears under its final name complete, or not at all (it is filled in a
  temporary sibling directory that is renamed into place);
- each output carries a marker, ``.kvlab-output.json``, naming its kind (``kvlab-checkpoint``,
  ``hf-checkpoint``, ``kvlab-adapter``, ``peft-adapter``...) and the files kvlab wrote. A path that
  exists is replaced only when it is an empty directory or an output of the same kind holding
  nothing but those files (kvlab checkpoints and adapters written before the marker existed are
  recognised by their config files), or, with ``overwrite=True`` (``--overwrite``), a kvlab output
  of another kind holding nothing but its files. Anything else — a file, a directory of the
  user's, a user's file put inside an output, a symbolic link, the current directory, the
  command's own input — is refused with :class:`OutputExistsError`, whatever the flags;
- the old output is removed only after the new one is complete, and nothing else is ever deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kvlab.errors import ConfigError

MARKER = ".kvlab-output.json"
KIND_NAMES = {"kvlab-checkpoint": "a kvlab checkpoint", "hf-checkpoint": "a HF checkpoint kvlab exported",
              "kvlab-adapter": "a kvlab adapter", "peft-adapter": "a PEFT adapter kvlab exported",
              "tasks": "a kvlab task set"}


class OutputExistsError(ConfigError):
    """The output path holds something kvlab did not write (exit 2: choose a path or --overwrite)."""


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` and everything under it the permissions that ``mkdir`` and ``open`` would
    under the process umask: ``tempfile`` makes directories 0700 and safetensors writes its files
    0600, whatever the umask says."""
    mask = umask()
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON; a reader (or a kill) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# What kvlab wrote into its outputs before they listed their files in the marker.
LEGACY_FILES = {"config.json", "model.safetensors", "provenance.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "generation_config.json", "trainer_state.pt", "kvlab_adapter.json",
                "adapter.safetensors"}


def _marker(path: Path) -> dict | None:
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def output_kind(path: Path) -> str | None:
    """The kind of kvlab output at ``path`` (a directory), or None for anything else."""
    path = Path(path)
    marker = _marker(path)
    if marker is not None:
        return marker["kind"]
    for name, formats in (("config.json", {"kvlab": "kvlab-checkpoint"}), ("kvlab_adapter.json",
                                                                         {"kvlab-adapter": "kvlab-adapter"})):
        try:  # written before the marker existed: kvlab's own config formats
            fmt = json.loads((path / name).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            continue
        if fmt in formats:
            return formats[fmt]
    return None


def written_by_kvlab(path: Path) -> set[str]:
    """The entries of a kvlab output that kvlab wrote: those its marker lists (older outputs: the
    file names kvlab used), and the marker itself."""
    marker = _marker(path)
    files = marker.get("files") if marker is not None else None
    return {MARKER, *(files if isinstance(files, list) else LEGACY_FILES)}


def _entries(items: list[str]) -> str:
    return (f"{len(items)} entr{'y' if len(items) == 1 else 'ies'} kvlab did not write "
            f"({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")


def check_path_usable(target: Path, what: str, replaced_whole: bool = True) -> None:
    """Refuse an output path kvlab cannot or must not use, whatever it would write there: a
    symbolic link (kvlab writes no output through one), a path under a file, and — for an output
    replaced as a whole (``replaced_whole``; a run directory is filled, not replaced) — the current
    directory or one that contains it (replacing it would pull the directory from under the user)."""
    if target.is_symlink():
        state = "" if target.exists() else " (dangling)"
        raise OutputExistsError(f"{target} is a symbolic link{state}; kvlab does not write {what} through links: give "
                                f"the directory it points to, or a new path")
    for parent in target.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputExistsError(f"{parent} is a file, so {target} cannot be created inside it: choose another "
                                        f"path")
            break
    if replaced_whole and target.exists():
        here, where = Path.cwd().resolve(), target.resolve()
        if where == here or where in here.parents:
            raise OutputExistsError(f"{target} is the current directory or contains it; kvlab writes {what} as a "
                                    f"new directory: give a path inside it, e.g. {Path(target) / 'out'}")


def check_output(target: str | Path, kind: str, *, overwrite: bool = False) -> None:
    """Raise :class:`OutputExistsError` unless ``target`` may receive an output of ``kind``: it does
    not exist, is an empty directory, or is a kvlab output holding only what kvlab wrote — of the
    same kind, or of another kind with ``overwrite``. Nothing else is ever replaced, whatever the
    flags: kvlab never deletes a file it did not write."""
    target = Path(target)
    what = KIND_NAMES.get(kind, kind)
    check_path_usable(target, what)
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputExistsError(f"{target} exists and is a file kvlab did not write; kvlab writes {what} (a directory) "
                                f"and never replaces a user's file: choose another path")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    found = output_kind(target)
    if found is None:
        raise OutputExistsError(f"{target} holds {_entries(entries)}; kvlab writes {what} only into a new or empty "
                                f"directory or over an output of its own, and never deletes a user's files (not with "
                                f"--overwrite either): choose another path")
    foreign = sorted(set(entries) - written_by_kvlab(target))
    if foreign:          # the user put files into kvlab's output: replacing it would delete them
        raise OutputExistsError(f"{target} holds {KIND_NAMES.get(found, found)} and, beside it, {_entries(foreign)}; "
                                f"kvlab never deletes those (not with --overwrite either): move them out, or choose "
                                f"another path")
    if found != kind and not overwrite:
        raise OutputExistsError(f"{target} holds {KIND_NAMES.get(found, found)}; to replace it with {what} pass "
                                f"--overwrite, or choose another path")


def refuse_output_over_input(output: str | Path, inputs: list[str | Path | None], what: str = "the model it reads",
                             holds: bool = True) -> None:
    """Refuse an output path that is an input (``convert M -o M``), lies inside one, or (``holds``)
    holds one: writing it would replace, bury or change what the command reads."""
    out = Path(output).resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        src = Path(given).resolve()
        if out == src or src in out.parents or (holds and out in src.parents):
            relation = "is" if out == src else "lies inside" if src in out.parents else "holds"
            raise OutputExistsError(f"the output {output} {relation} {what} ({given}); kvlab does not write over its "
                                    f"input: choose another path")


def write_dir_atomically(target: str | Path, fill, *, kind: str, overwrite: bool = False) -> Path:
    """Call ``fill(tmpdir)``, mark the directory as an output of ``kind``, then rename it to
    ``target``; an existing target is replaced only as the module docstring says."""
    target = Path(target)
    check_output(target, kind, overwrite=overwrite)
    made = make_parents(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "files": files}) + "\n")
        apply_umask(tmp)
        check_output(target, kind, overwrite=overwrite)     # again: it may have appeared meanwhile
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            remove_path(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        raise
    return target


def make_parents(target: Path) -> list[Path]:
    """Create ``target``'s missing parent directories; return them, innermost first."""
    made, parent = [], target.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(directories: list[Path]) -> None:
    """Undo :func:`make_parents` after a failure: remove those directories that are still empty."""
    for d in directories:
        try:
            d.rmdir()
        except OSError:
            break


def remove_path(path: Path) -> None:
    """Remove a file, a link or a directory tree that kvlab is entitled to remove."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
