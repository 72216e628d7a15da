"""Really kill -9 a process before its N-th file-system step, for every N.

:mod:`fs_crash` cuts an operation inside the test process. This helper does
it to a real process: a *zygote* imports virtkit once, then for each run forks
a child that executes the operation with the ``os`` calls that change the file
system wrapped (a creating or truncating ``open``, ``write``/``pwrite``,
``fsync``/``fdatasync``, ``ftruncate``, ``rename``/``replace``, ``unlink``,
``mkdir``...); before call number ``crash_at`` the child sends itself
``SIGKILL``. Nothing of the child runs after that: no ``finally``, no
``atexit``; the kernel closes its files and drops its locks. A fork costs
milliseconds, so every step of an operation can be cut in the default run.

    with KillAtStep(tmp_path / "zygote.log") as kill:
        total = kill.run(CODE, 0, folder=str(folder)).steps     # a clean run counts
        for n in range(1, total + 1):
            reset()
            assert kill.run(CODE, n, folder=str(folder)).killed
            check_old_or_new()
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs

ZYGOTE = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import virtkit

    STEPS = (
        "write", "pwrite", "writev", "fsync", "fdatasync", "ftruncate", "truncate",
        "posix_fallocate", "replace", "rename", "unlink", "mkdir", "rmdir", "link", "symlink",
        "chmod", "fchmod", "utime", "copy_file_range", "sendfile",
    )
    CHANGES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC

    def child(code, crash_at, values):
        steps = 0
        def step():
            nonlocal steps
            steps += 1
            if steps == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
        def wrap(real):
            def wrapper(*args, **kwargs):
                step()
                return real(*args, **kwargs)
            return wrapper
        saved = {name: getattr(os, name) for name in (*STEPS, "open") if hasattr(os, name)}
        def opener(path, flags, *args, **kwargs):
            if flags & CHANGES:  # an open that may create or truncate is a step; a read is not
                step()
            return saved["open"](path, flags, *args, **kwargs)
        for name in STEPS:
            if name in saved:
                setattr(os, name, wrap(saved[name]))
        os.open = opener
        try:
            exec(code, {"virtkit": virtkit, **values})
        finally:
            for name, real in saved.items():
                setattr(os, name, real)
        return steps

    for line in sys.stdin:
        code, crash_at, values = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            report = os.fdopen(w, "w")
            try:
                report.write(json.dumps({"steps": child(code, crash_at, values)}))
                status = 0
            except BaseException as exc:  # reported; the parent asserts on it
                report.write(json.dumps({"error": repr(exc)}))
                status = 1
            report.flush()
            os._exit(status)
        os.close(w)
        deadline = time.monotonic() + 120
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                status = os.waitpid(pid, 0)[1]
                break
            time.sleep(0.001)
        with os.fdopen(r) as fh:
            said = fh.read()
        print(json.dumps({
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
            "said": json.loads(said) if said else {},
        }), flush=True)
    """
)


@attrs.frozen
class Outcome:
    """What became of one child: killed by SIGKILL, or finished (steps counted) or failed."""

    signal: int
    steps: int | None
    error: str | None

    @property
    def killed(self) -> bool:
        """The child died of SIGKILL (9)."""
        return self.signal == 9


class KillAtStep:
    """The zygote; ``run(code, crash_at, **values)`` forks one child and reports its fate."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("w")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def run(self, code: str, crash_at: int, **values: Any) -> Outcome:
        """Run ``code`` (globals: ``virtkit`` and ``values``) in a child killed before step
        ``crash_at`` (0: never)."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps([code, crash_at, values]) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        assert line, "the zygote died"
        reply = json.loads(line)
        said = reply["said"]
        return Outcome(reply["signal"], said.get("steps"), said.get("error"))

    def close(self) -> None:
        """Stop the zygote."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()

    def __enter__(self) -> KillAtStep:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
