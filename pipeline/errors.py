"""One exception type for every mistake a user can fix.

The CLI turns a ``UserError`` into a single line on stderr and exit code 2, so
bad input never ends in a traceback. Library code raises it with a message that
names the file, key or value and says what would be valid.
"""


class UserError(Exception):
    """A problem with the user's input, config or files (not a bug)."""


# ---- stopping early on a signal (preemption) ----------------------------------------------------------------
# A stop signal (``runtime.stop_signals``, default SIGTERM) asks a running training loop or
# in-process shard runner to stop at the next clean point: the training step in flight
# finishes and its checkpoint is written; the storage shard in flight finishes with its
# record. The stage then raises ``StopRequested`` and the CLI prints its one-line message
# and exits with ``STOP_EXIT_CODE`` (75, EX_TEMPFAIL: "try again"), which is neither a
# success nor a crash: rerun with ``--resume auto`` (train-*) or the same command
# (extract, encode) to continue exactly where it stopped.

STOP_EXIT_CODE = 75
STOP_SIGNAL_NAMES = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


class StopRequested(Exception):
    """A stage stopped cleanly on a stop signal; the message says where and how to continue."""

    exit_code = STOP_EXIT_CODE


class StopSignals:
    """While installed, the named signals only set a flag (``requested``) that the loop polls.

    ``install()`` keeps the previous handlers and ``restore()`` puts them back, so the
    handlers live only while a stage's loop runs (outside the main thread it does
    nothing: Python delivers signals to the main thread only). Idempotent both ways.
    """

    def __init__(self, names=("SIGTERM",)):
        import signal

        self.signums = [int(getattr(signal, n)) for n in names]
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> "StopSignals":
        import signal
        import threading

        if self._previous or threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    @property
    def requested(self) -> int | None:
        """The first stop signal received (its number), or None."""
        return self.received

    @staticmethod
    def name(signum: int) -> str:
        import signal

        return signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
