"""A stopped run keeps its work: SIGTERM and Ctrl-C end a run at an iteration boundary.

`ray job stop`, Kubernetes (pod deletion, KubeRay preemption, spot nodes: SIGTERM, then SIGKILL
after terminationGracePeriodSeconds, 30 s by default) and Slurm (SIGTERM, then SIGKILL after
KillWait, 30 s by default) all warn the driver before they kill it. On the first SIGTERM or SIGINT
the run finishes the iteration in flight if it ends within `ray.stop_grace_s`, else abandons it
(the learner's state as of the last finished iteration is kept, `Learner.state(iteration=...)`);
then it writes a checkpoint, prints the command that resumes it and exits with 128 + the signal's
number (143 for SIGTERM, 130 for Ctrl-C). A second signal abandons the iteration at once.

The abandon is a KeyboardInterrupt raised in the driver's main thread: Ray's blocking `get`
returns on it (another exception type would wait out its timeout), and it is raised only while
the driver is inside an iteration, never while it writes metrics or a checkpoint.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """Raised by the driver after a stop request was honoured (checkpoint written); the CLI
    prints `message` and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """Catches SIGTERM/SIGINT for the lifetime of a `with` block (main thread only; elsewhere it
    installs nothing and a signal keeps its old meaning)."""

    def __init__(self, grace_s: float, what: str = "the iteration in flight", log=None):
        self.grace_s, self.what = float(grace_s), what
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.signum: int | None = None
        self.abandoned = False
        self._inside = False  # the driver is inside an iteration: a KeyboardInterrupt may abandon it
        self._due = False  # the grace time ran out (or a second signal came) outside an iteration
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGTERM)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (*SIGNALS, signal.SIGALRM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def disarm(self) -> None:
        """No grace timer from here on (the iteration is over; what follows must not be cut)."""
        if self._old:
            signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """The span in which a stop may abandon the work in flight (at once, if the grace time
        ran out or a second signal came while the driver was outside one)."""
        if self._due:
            self.abandoned = True
            raise KeyboardInterrupt
        self._inside = True
        try:
            yield
        except KeyboardInterrupt:
            self.abandoned = True
            if self.signum is None:  # a Ctrl-C that reached us before our handler was installed
                self.signum = signal.SIGINT
            raise
        finally:
            self._inside = False

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGALRM:
            self.log(f"metarl: {self.grace_s:g}s of grace are over: abandoning {self.what}")
            self._abandon()
            return
        if self.signum is None:
            self.signum = signum
            if self.grace_s <= 0:
                self.log(f"metarl: {self.signal_name} received: abandoning {self.what} (ray.stop_grace_s = 0)")
                self._abandon()
                return
            self.log(f"metarl: {self.signal_name} received: finishing {self.what} (at most "
                     f"{self.grace_s:g}s, ray.stop_grace_s), then writing a checkpoint; send it again to stop now")
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)
            return
        self.log(f"metarl: second {signal.Signals(signum).name}: abandoning {self.what}")
        self._abandon()

    def _abandon(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if self._inside:
            self._inside = False
            raise KeyboardInterrupt
        self._due = True


def resume_command(out: str, argv: list[str] | None = None) -> str:
    """The command line that continues this run: the user's own arguments, with --resume and
    --out pointing at `out` (an existing --out/--resume is replaced, never doubled)."""
    args = list(sys.argv[1:] if argv is None else argv)
    keep: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--resume":
            i += 1
            continue
        if a == "--out":
            i += 2
            continue
        if a.startswith("--out="):
            i += 1
            continue
        keep.append(a)
        i += 1
    return "metarl " + " ".join(shlex.quote(a) for a in [*keep, "--resume", "--out", str(out)])
