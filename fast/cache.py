"""Compiled kernels and schedules kept between runs, in one file beside tinygrad's own cache (its CACHEDB).

tinygrad's CACHEDB keeps only the compiler's output: a new process still turns every kernel of a graph into source
code and splits each graph into kernels (its schedule) again, most of a warm-up. Here tinygrad's in-memory caches
of both are written to disk and read back, keyed as tinygrad keys them, so a cached program is only ever used for
the kernel it was made from. The file is a pickle: it is loaded only when it and its folder belong to this user
and no one else can write them (it runs as code when read)."""
from __future__ import annotations
import importlib.metadata, json, os, pickle, stat, sys
from dataclasses import replace
from pathlib import Path
import tinygrad.codegen, tinygrad.schedule
from tinygrad.helpers import CACHEDB, CACHELEVEL, ContextVar
from tinygrad.uop.ops import CallInfo
from fast.layers import _matmul_nt_grad


def program_cache_path() -> Path | None:
    """One file per tinygrad version; None when caching is off (VLAE_PROGRAM_CACHE=0, or tinygrad's CACHELEVEL=0)."""
    if os.environ.get("VLAE_PROGRAM_CACHE", "1") == "0" or CACHELEVEL.value < 1:
        return None
    return Path(CACHEDB).parent / f"vlae-programs-tinygrad-{importlib.metadata.version('tinygrad')}.pkl"


_saved = {"programs": 0, "schedules": 0, "searched": set(), "other_settings": {},    # what the file held when read
          "stat": None}                 # its (mtime, size) and the settings when this process last read or wrote it


def settings() -> str:
    """The tinygrad settings given in the environment (BEAM, NOOPT, ...): schedules are kept per settings."""
    return json.dumps(sorted((k, v) for k, v in os.environ.items() if k in ContextVar._cache))


_call_repr = CallInfo.__repr__


def _call_repr_by_name(info: CallInfo) -> str:
    """tinygrad keys a graph's schedule by its text, in which a custom gradient appears as its address, different in
    every process, so no schedule kept on disk would be found again: matmul_nt's gradient is named instead. (A
    schedule is made after the gradients are, so it does not depend on the gradient function.)"""
    if info.grad_fxn is _matmul_nt_grad:
        return _call_repr(replace(info, grad_fxn=None)) + " matmul_nt"
    return _call_repr(info)


def name_custom_gradients() -> None:
    # tinygrad 0.14.0: CallInfo.__repr__ is the schedule cache's key text; matmul_nt's gradient named, not its address
    CallInfo.__repr__ = _call_repr_by_name


_untrusted: set = set()          # paths already named on stderr


def trusted(path: Path) -> bool:
    """Whether path (if it exists) and its folder belong to this user and no one else may write them; if not, one
    line on stderr (once per process)."""
    for p in (path.parent, path):
        if not p.exists():
            continue
        st = os.stat(p)
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            if path not in _untrusted:
                _untrusted.add(path)
                print(f"note: ignoring the kernel cache {path}: {p} is not this user's alone (uid {st.st_uid}, "
                      f"{stat.filemode(st.st_mode)}), and the cache runs as code when read", file=sys.stderr)
            return False
    return True


def load_programs() -> None:
    """Fill tinygrad's in-memory caches of compiled kernels and of schedules (those of the current settings) from
    program_cache_path(), if that is trusted. An unreadable file is ignored (and replaced). A file this process
    has read or written already under the same settings, unchanged since, is not read again."""
    if (path := program_cache_path()) is None or not path.exists() or not trusted(path):
        return
    try:
        if (_file_stat(path), settings()) == _saved["stat"]:
            return
        with open(path, "rb") as f:
            stat_ = _file_stat(f.fileno())                      # of the file being read
            saved = pickle.load(f)
        if "programs" not in saved:
            saved = {"programs": saved}                         # the format before search and schedules
        programs, searched = saved["programs"], set(saved.get("searched", []))
        schedules = saved.get("schedules", {})
    except Exception as e:
        print(f"note: ignoring the unreadable kernel cache {path} ({type(e).__name__}); it is rebuilt", file=sys.stderr)
        return
    program_cache, schedule_cache = tinygrad.codegen.to_program_cache, tinygrad.schedule.schedule_cache
    program_cache.update(programs)
    schedule_cache.update(schedules.pop(settings(), {}))
    _saved["programs"], _saved["schedules"] = len(program_cache), len(schedule_cache)
    _saved["searched"], _saved["other_settings"] = _saved["searched"] | searched, schedules
    _saved["stat"] = stat_, settings()


def _file_stat(file: Path | int) -> tuple[int, int]:
    st = os.stat(file)
    return st.st_mtime_ns, st.st_size


def save_programs() -> None:
    """Write tinygrad's kernel and schedule caches to program_cache_path() if they grew or a search replaced kernels
    (atomically; a failure only costs speed). Not into a folder load_programs would not trust."""
    programs, schedules = dict(tinygrad.codegen.to_program_cache), dict(tinygrad.schedule.schedule_cache)
    path, searched = program_cache_path(), set(_saved["searched"])
    grew = len(programs) > _saved["programs"] or len(schedules) > _saved["schedules"]
    if path is None or not (grew or _saved.get("dirty")):
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not trusted(path):
            return
        with open(tmp, "wb") as f:
            pickle.dump({"programs": programs, "searched": sorted(searched),
                         "schedules": {**_saved["other_settings"], settings(): schedules}}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
        _saved["programs"], _saved["schedules"], _saved["dirty"] = len(programs), len(schedules), False
        _saved["stat"] = _file_stat(path), settings()
    except (OSError, pickle.PicklingError):
        tmp.unlink(missing_ok=True)
