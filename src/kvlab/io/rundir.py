"""A run's output directory (``train``, ``finetune``, ``shrink``, ``study``) for the run's lifetime.

:class:`RunDirectory` applies the output policy of :mod:`kvlab.io.atomic` to directories that a run
fills over time, and adds two things:

- a record, ``run.json``: the run's kind and the settings that give it its meaning. A fresh run
  into a directory that holds a run is refused unless ``overwrite`` (which then deletes only what
  that kind of run writes); ``resume`` refuses settings that differ from the record's, naming the
  fields; a directory with files kvlab did not write is refused unless ``overwrite``;
- a lock, ``.kvlab-lock``, created exclusively and held until the run ends, so that two runs never
  write into one directory. It names the process (PID, host, process start time); a lock whose
  process is gone (killed, crashed) on this host is stale and is taken over with a note.

A directory the run created is removed again if the run fails before writing anything into it.
Under torchrun only rank 0 takes the lock and writes the record.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from kvlab.errors import ConfigError, KvlabError
from kvlab.io.atomic import (
    KIND_NAMES,
    OutputExistsError,
    check_path_usable,
    output_kind,
    remove_path,
    write_json,
    written_by_kvlab,
)

RECORD = "run.json"
LOCK = ".kvlab-lock"


class RunLockedError(KvlabError):
    """Another live process holds the run directory's lock (exit 1)."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True                          # another machine's process: assume it runs
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = holder.get("started")
    return started is None or _process_start(pid) in (None, started)


# Files kvlab's runs write inside their directories, beside the outputs that list their own files
# (checkpoints, exports, adapters): a run's metrics, record and summaries (a study's runs/<run>/,
# a shrink's work/<stage>/).
NESTED_RUN_FILES = {"metrics.jsonl", RECORD, LOCK, "summary.json", "results.json", "report.md"}


def _kvlab_temporary(name: str) -> bool:
    """kvlab's own temporary names: a save or export under way, an old output being replaced, a
    checkpoint being pruned (a kill may leave them)."""
    return name.startswith(".") and any(tag in name for tag in (".tmp-", ".old-", ".discard-"))


def foreign_files(root: Path, names: tuple[str, ...], top_level_ours: bool) -> list[str]:
    """What kvlab did not write under the entries ``names`` of ``root`` (paths relative to it):
    files a marked output does not list, files of unmarked directories other than
    :data:`NESTED_RUN_FILES`, links; top-level files count as kvlab's only if ``top_level_ours``
    (the directory holds a run record of this kind)."""
    found: list[str] = []

    def walk(d: Path) -> None:
        if output_kind(d) is not None:
            mine = written_by_kvlab(d)
            found.extend(str(p.relative_to(root)) for p in sorted(d.iterdir()) if p.name not in mine)
            return
        for p in sorted(d.iterdir()):
            if _kvlab_temporary(p.name):
                continue
            if p.is_dir() and not p.is_symlink():
                walk(p)
            elif p.is_symlink() or p.name not in NESTED_RUN_FILES:
                found.append(str(p.relative_to(root)))

    for name in names:
        target = root / name
        if target.is_dir() and not target.is_symlink():
            walk(target)
        elif (target.exists() or target.is_symlink()) and (target.is_symlink() or not top_level_ours):
            found.append(name)
    return found


def _differences(saved: dict, now: dict, free: tuple[str, ...]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in free:
            continue
        if saved.get(key) != now.get(key):
            out.append(f"{key} {saved.get(key)!r} -> {now.get(key)!r}")
    return out


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


class RunDirectory:
    """``with RunDirectory(path, kind, settings, entries=..., resume=..., overwrite=...) as run:``

    ``settings``: JSON-able values that give the run its meaning (compared on resume, except the
    names in ``free``, e.g. how often to log). ``entries``: the names this kind of run writes in
    the directory (deleted by ``overwrite``; the record and the lock are added). ``scaffolding``:
    those written at the start — a run that fails with nothing else written leaves no directory."""

    def __init__(self, path: str | Path, kind: str, settings: dict[str, Any], *, entries: tuple[str, ...],
                 resume: bool = False, overwrite: bool = False, free: tuple[str, ...] = (),
                 scaffolding: tuple[str, ...] = (), log=None) -> None:
        self.path, self.kind, self.settings = Path(path), kind, settings
        self.entries = (*entries, RECORD)
        self.resume, self.overwrite, self.free = resume, overwrite, free
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.scaffolding = {RECORD, *scaffolding}    # written at the start: alone, they are not a result
        self.created = False
        self.locked = False

    # ------------------------------------------------------------------ policy
    def record(self) -> dict | None:
        try:
            data = json.loads((self.path / RECORD).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _check(self) -> None:
        path, what = self.path, f"a kvlab {self.kind} run"
        check_path_usable(path, what, replaced_whole=False)
        if path.exists() and not path.is_dir():
            raise OutputExistsError(f"{path} exists and is a file; {what} needs a directory: choose another path")
        present = sorted(p.name for p in path.iterdir() if p.name != LOCK) if path.is_dir() else []
        record = self.record()
        ours = record is not None and record.get("kind") == self.kind
        if present and (self.resume or self.overwrite):
            foreign = foreign_files(path, self.entries, top_level_ours=ours)
            if foreign:
                raise OutputExistsError(
                    f"{path}: {len(foreign)} file{'s' if len(foreign) > 1 else ''} kvlab did not write "
                    f"{'are' if len(foreign) > 1 else 'is'} inside the run's own entries ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}); kvlab never deletes or replaces those, so "
                    f"{'--resume' if self.resume else '--overwrite'} cannot go on: move them out of {path}")
        if self.resume:
            if not present:
                raise ConfigError(f"--resume: {path} holds no {self.kind} run to continue; start one without --resume")
            if record is None:
                raise ConfigError(f"--resume: {path} has no run record ({RECORD}), so kvlab cannot tell whether it "
                                  f"is this {self.kind} run; start a new run in another directory, or pass "
                                  f"--overwrite without --resume to start over")
            if not ours:
                raise ConfigError(f"--resume: {path} holds a kvlab {record.get('kind')} run, not a {self.kind} run")
            changed = _differences(record.get("settings", {}), self.settings, self.free)
            if changed:
                raise ConfigError(f"--resume: the run in {path} was started with other settings ({'; '.join(changed)});"
                                  f" resume with the same settings, or start over with --overwrite")
            return
        if not present:
            return
        if not self.overwrite:
            if ours:
                raise OutputExistsError(f"{path} holds a kvlab {self.kind} run: --resume continues it, --overwrite "
                                        f"starts over (deleting its {', '.join(self.entries[:-1])}), or choose "
                                        f"another directory")
            found = output_kind(path)
            held = (f"a kvlab {record.get('kind')} run" if record else KIND_NAMES.get(found, found) if found else
                    f"{len(present)} entr{'y' if len(present) == 1 else 'ies'} kvlab did not write "
                    f"({', '.join(present[:3])}{', ...' if len(present) > 3 else ''})")
            raise OutputExistsError(f"{path} holds {held}; {what} needs a new or empty directory: choose another "
                                    f"one, or pass --overwrite to write there beside them (kvlab replaces only what "
                                    f"its runs write, {', '.join(self.entries)}, and never a file it did not write)")

    def _clear(self) -> None:
        """``overwrite``: delete what a run of this kind writes; nothing else."""
        for name in self.entries:
            target = self.path / name
            if target.exists() or target.is_symlink():
                remove_path(target)

    # ------------------------------------------------------------------ lock
    def _acquire(self) -> None:
        lock = self.path / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
              "kind": self.kind, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                try:
                    holder = json.loads(lock.read_text())
                except (OSError, ValueError):
                    # Being written this instant, or torn by a crash long ago.
                    age = time.time() - lock.stat().st_mtime if lock.exists() else 0
                    if age < 30:
                        time.sleep(0.2)
                        continue
                    holder = {}
                if isinstance(holder, dict) and _alive(holder):
                    raise self._in_use(holder) from None
                self.log(f"note: {self.path}: taking over the lock of a {holder.get('kind', 'kvlab')} run that "
                         f"ended without releasing it (PID {holder.get('pid')})")
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.locked = True
            return
        raise RunLockedError(f"{self.path}: could not take the run lock {lock}; another run is starting there")

    def _in_use(self, holder: dict) -> RunLockedError:
        return RunLockedError(
            f"{self.path} is in use by another kvlab {holder.get('kind', '')} run (PID {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('since')}); wait for it to end or choose another directory (if "
            f"that process is gone, delete {self.path / LOCK})")

    def _refuse_if_in_use(self) -> None:
        """A live run's directory is refused first: whatever else is true of it, it is changing."""
        try:
            holder = json.loads((self.path / LOCK).read_text())
        except (OSError, ValueError):
            return
        if isinstance(holder, dict) and _alive(holder):
            raise self._in_use(holder)

    def release(self) -> None:
        if self.locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self.locked = False

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> RunDirectory:
        if not _is_main_rank():
            return self         # rank 0 decides (and writes); the others would race with its record
        self._refuse_if_in_use()
        self._check()
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            if self.resume:
                return self
            if self.overwrite:
                self._clear()
            write_json(self.path / RECORD, {"kind": self.kind, "settings": self.settings,
                                            "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
        if exc_type is None or self.resume or not _is_main_rank() or not self.path.is_dir():
            return
        # A new run that failed before producing a result (a checkpoint, a model) leaves the directory
        # as it found it: its own record and scaffolding go, and the directory if the run made it —
        # so that running the command again needs neither --resume (nothing to resume) nor --overwrite.
        left = list(self.path.iterdir())

        def scaffold(p: Path) -> bool:
            return p.name in self.scaffolding and not p.is_symlink() and (
                p.is_file() or (p.is_dir() and not any(p.iterdir())))

        if all(scaffold(p) for p in left):
            for p in left:
                remove_path(p)
            if self.created:
                remove_path(self.path)
