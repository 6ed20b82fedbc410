"""Kill ``instella data prepare`` with SIGKILL while it writes: the crash-safety tests' shared helper.

The input is a FIFO this process holds open, so the prepare is surely mid-write when it is killed:
the records are written, the helper waits until ``PREFIX.bin.partial`` has bytes, runs the caller's
``midway`` check, then kills.
"""
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def kill_prepare_mid_write(texts: Iterable[str], prefix: str, fifo: str, extra_args=(),
                           midway: Optional[Callable[[], None]] = None, timeout: float = 120) -> int:
    """Run the prepare onto ``prefix`` reading ``texts`` from the FIFO ``fifo``; its return code (-9)."""
    os.mkfifo(fifo)
    instella = os.path.join(os.path.dirname(sys.executable), "instella")  # the installed command
    cmd = [instella, "data", "prepare", fifo, "--output-prefix", prefix, "--no-progress", *extra_args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stderr=subprocess.PIPE)
    deadline, fd, partial = time.time() + timeout, None, prefix + ".bin.partial"

    def alive():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, f"no partial output within {timeout}s"

    try:
        while fd is None:  # opening a FIFO's write end fails until the reader has it open
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                alive()
                time.sleep(0.05)
        os.set_blocking(fd, True)
        os.write(fd, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
        while not (os.path.exists(partial) and os.path.getsize(partial) > 0):
            alive()
            time.sleep(0.02)
        alive()  # still waiting for the rest of the input
        if midway is not None:
            midway()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if fd is not None:
            os.close(fd)
        proc.stderr.close()
    return proc.returncode
