"""Save-and-exit on a signal (``--exit-signal-handler``): Slurm's ``--signal=USR1@T`` warning, SIGTERM."""
import signal


class ExitSignalHandler:
    """Records SIGUSR1/SIGTERM; the loop checks it each iteration, saves and exits cleanly."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received = False
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        self.received = True

    def signals_received(self) -> bool:
        return self.received

    def release(self):
        for s, h in self.previous.items():
            signal.signal(s, h)
