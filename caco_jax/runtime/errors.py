"""Expected errors end a run with one line; anything else keeps its traceback.

An *expected* error is one a user can fix from its message alone: a bad config value, a missing,
damaged or unsuitable input, a resume that would change the run, a folder another run is writing.
`run.py` ends such a run with one line on stderr, ``run.py: <message>``, naming the culprit and
what to do, and exit status 2 (`EXIT_STATUS`), without a traceback; ``CACO_JAX_TRACEBACK=1`` in the
environment adds it (`TRACEBACK_ENV`). Anything else is a bug or a fault nobody foresaw and keeps
Python's traceback and exit status 1.

Expected are `UserError` (the base of caco_jax's own error types), `settings.SettingsError`, the
operating system's errors about a path (missing, already there, not a folder, no permission, disk
full), the ValueErrors the readers of the evaluation downloads raise about a download that does
not read (`_DOWNLOAD_READERS`; each names the file) and the few library errors recognised in
`_LIBRARY_ERRORS`. A library error that wraps
another (Orbax, asyncio, TensorStore) is described by its innermost cause (`root_cause`), once.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import traceback

from caco_jax.settings import SettingsError

EXIT_STATUS = 2
TRACEBACK_ENV = "CACO_JAX_TRACEBACK"
# The operating system's errors that are about the user's paths and disks, not about the code.
_PATH_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EEXIST,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EFBIG,
    }
)
_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
# (exception type name, words its message starts with, what to say after it): errors raised by
# libraries about the user's input, in their own words.
_LIBRARY_ERRORS = (
    (
        "AssertionError",
        "Manual directory ",
        "point config.eval.manual_dir at the folder holding the download (see docs/evaluation.md)",
    ),
)
# Modules whose ValueErrors describe a download that does not read (a corrupt zip, a patch without
# its labels, ...), each naming the file: the TFDS builders of the evaluation datasets.
_DOWNLOAD_READERS = ("caco_jax.evaluators.datasets.",)
# Markers of a message that is really about the disk, whatever exception carries it (TensorStore
# reports a full disk as RESOURCE_EXHAUSTED inside a ValueError).
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "File too large")


class UserError(Exception):
    """An error whose message names the culprit and what to do: reported as one line."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception ``error`` was raised from (explicitly, or while handling)."""
    seen = {id(error)}
    while True:
        cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if cause is None or id(cause) in seen:
            return error
        seen.add(id(cause))
        error = cause


def is_expected(error: BaseException) -> bool:
    """True for an error that is reported in one line (see the module docstring)."""
    if isinstance(error, UserError | SettingsError):
        return True
    if isinstance(error, _PATH_ERRORS):
        return True
    if isinstance(error, OSError) and error.errno in _PATH_ERRNOS:
        return True
    if _library_advice(error) is not None:
        return True
    if type(error) is ValueError and _raised_in(error, _DOWNLOAD_READERS):
        return True
    return disk_full(error)


def disk_full(error: BaseException) -> bool:
    """True when ``error`` or one of its causes says the disk (or the file size limit) is full."""
    return any(_says_disk_full(link) for link in _chain(error))


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (whitespace runs, newlines included, become one
    space); a library error is followed by what to do, a disk error by its cause."""
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = " ".join(error.args[0].split())  # str(KeyError) quotes its message
    advice = _library_advice(error)
    if advice is not None:
        return f"{_first_sentence(text)}: {advice}"
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    if not isinstance(error, UserError | SettingsError) and disk_full(error):
        cause = next(link for link in _chain(error) if _says_disk_full(link))
        return f"out of disk space ({_first_line(cause)}); free space, then run again"
    return text or type(error).__name__


def report(error: BaseException, program: str = "run.py") -> int:
    """Writes ``error`` to stderr, one line if it is expected (with its traceback as well when
    `TRACEBACK_ENV` is set), its traceback otherwise; returns the exit status to end with."""
    sys.stdout.flush()
    if isinstance(error, KeyboardInterrupt):
        print(f"{program}: interrupted", file=sys.stderr, flush=True)
        return 130
    expected = is_expected(error)
    if not expected or os.environ.get(TRACEBACK_ENV):
        traceback.print_exception(error, file=sys.stderr)
    if expected:
        print(f"{program}: {one_line(error)}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    return EXIT_STATUS if expected else 1


def silence_exit_noise() -> None:
    """For a process about to end on an error already reported: what background threads and
    half-run coroutines of the failed work (Orbax's save threads, asyncio tasks) would report
    while it ends only repeats it."""
    sys.unraisablehook = threading.excepthook = _ignore


def _ignore(*_) -> None:
    pass


def _raised_in(error: BaseException, module_prefixes) -> bool:
    """Whether ``error`` was raised by a `raise` in a module whose name starts with one of
    ``module_prefixes`` (the innermost frame of its traceback)."""
    traceback_ = error.__traceback__
    if traceback_ is None:
        return False
    while traceback_.tb_next is not None:
        traceback_ = traceback_.tb_next
    module = traceback_.tb_frame.f_globals.get("__name__", "")
    return module.startswith(module_prefixes)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _says_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return any(marker in str(error) for marker in _DISK_FULL)


def _library_advice(error: BaseException) -> str | None:
    for type_name, start, advice in _LIBRARY_ERRORS:
        if type(error).__name__ == type_name and str(error).startswith(start):
            return advice
    return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _first_sentence(text: str) -> str:
    head, dot, _ = text.partition(". ")
    return head if dot else text.rstrip(".")
