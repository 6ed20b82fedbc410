"""A throw-away single-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's
``slurm-wlm``/``munge``, started directly (no systemd) in a private directory and stopped by pid.

Contract:
- ``missing_reason()`` returns None when the binaries are present, else a sentence saying what to
  install (the e2e test skips with it).
- ``SlurmCluster(root).start()`` writes a munge key, a minimal ``slurm.conf`` (``proctrack/linuxproc``,
  ``task/none``, no accounting, one partition ``debug`` holding this host), starts the three daemons in
  the foreground as child processes, waits until the node is idle, and records their pids in
  ``root/pids.json``. ``env()`` gives the variables clients (sbatch, squeue, scontrol) need.
- ``stop()`` sends SIGTERM to exactly those pids (SIGKILL after a grace period). Nothing else on the
  machine is touched: private ports, sockets, state and spool directories.

Command line, for trying the cluster by hand:
    python tests/slurm_cluster.py start DIR     # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop DIR
"""
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name):
    path = shutil.which(name)
    if path:
        return path
    for d in SBIN_DIRS:
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_reason():
    """None when a local cluster can be started here, else why not (and how to fix it)."""
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        return (f"Slurm binaries not found: {', '.join(missing)}; install Debian's slurm-wlm and munge "
                "(`apt-get install -y slurm-wlm munge`, as .ci/run does) to run the real-Slurm tests")
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


class SlurmCluster:
    """One munged + slurmctld + slurmd on this host, all state under ``root``."""

    def __init__(self, root, cpus=None, partition="debug"):
        self.root = Path(root).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs = {}

    # -- configuration -------------------------------------------------------------------------
    def _write_config(self):
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        (r / "plugstack.conf").write_text("")
        user = pwd.getpwuid(os.getuid()).pw_name
        mem = max(256, int(_mem_mb() * 0.8))
        lines = [
            "ClusterName=instella-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=10",
            "MinJobAge=3600",
            "InactiveLimit=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def env(self):
        """Environment for Slurm clients talking to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                env.pop(var)
        return env

    # -- lifecycle -----------------------------------------------------------------------------
    def _spawn(self, name, argv):
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)
        log.close()

    def start(self, timeout=60):
        """Start the daemons and wait until the node accepts jobs; raises with the logs on failure."""
        reason = missing_reason()
        if reason:
            raise RuntimeError(reason)
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={m / 'munge.socket'}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}", f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait_for(lambda: (m / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._save_pids()
        self._wait_for(self._node_idle, timeout, f"node {self.node} to become idle")
        return self

    def _save_pids(self):
        pids = {name: p.pid for name, p in self.procs.items()}
        tmp = self.root / "pids.json.tmp"
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, self.root / "pids.json")

    def _node_idle(self):
        out = subprocess.run([_which("sinfo") or "sinfo", "-h", "-N", "-o", "%T"], env=self.env(),
                             capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated")

    def _wait_for(self, predicate, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        logs = self.logs()
        self.stop()
        raise RuntimeError(f"Slurm test cluster: timed out waiting for {what}; daemons exited: "
                           f"{[n for n, p in self.procs.items() if p.poll() is not None]}\n{logs}")

    def logs(self, tail=40):
        """The last lines of every daemon log, for failure messages."""
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"== {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self, grace=10):
        """SIGTERM the daemons this object started (by pid), SIGKILL whatever outlives the grace period."""
        stop_pids(self.root, grace, procs=self.procs)
        self.procs = {}

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- jobs ----------------------------------------------------------------------------------
    def job_state(self, job_id):
        """{'JobState': ..., 'ExitCode': ...} per job (array tasks listed individually)."""
        out = subprocess.run([_which("scontrol"), "-o", "show", "job", str(job_id)], env=self.env(),
                             capture_output=True, text=True)
        states = []
        for line in out.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            states.append(fields)
        return states

    def wait_jobs(self, job_ids, timeout):
        """Block until every job (and array task) is in a final state; returns {JobId: fields}."""
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                 "BOOT_FAIL", "DEADLINE")
        deadline = time.time() + timeout
        while True:
            states = {}
            for jid in job_ids:
                for f in self.job_state(jid):
                    states[f.get("JobId", str(jid)) + ("_" + f["ArrayTaskId"] if "ArrayTaskId" in f else "")] = f
            if states and all(f.get("JobState") in final for f in states.values()):
                return states
            if time.time() > deadline:
                raise TimeoutError(f"jobs {job_ids} not finished after {timeout}s: "
                                   f"{ {k: v.get('JobState') for k, v in states.items()} }")
            time.sleep(1)


def stop_pids(root, grace=10, procs=None):
    """Stop the daemons recorded in ``root/pids.json`` (or the given Popen objects) by pid."""
    root = Path(root)
    if procs:
        pids = {n: p.pid for n, p in procs.items()}
    else:
        f = root / "pids.json"
        pids = json.loads(f.read_text()) if f.exists() else {}
    order = [n for n in ("slurmd", "slurmctld", "munged") if n in pids]
    for name in order:
        try:
            os.kill(pids[name], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for name in order:
        p = procs.get(name) if procs else None
        while time.time() < deadline:
            if p is not None:
                if p.poll() is not None:
                    break
            elif not _alive(pids[name]):
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(pids[name], signal.SIGKILL)
            except ProcessLookupError:
                pass
            if p is not None:
                p.wait()
    if (root / "pids.json").exists():
        (root / "pids.json").unlink()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: python tests/slurm_cluster.py start|stop DIR")
    if sys.argv[1] == "start":
        c = SlurmCluster(sys.argv[2]).start()
        print(f"export SLURM_CONF={c.conf}")
        # The daemons run in their own sessions; leave them running for the caller.
        os._exit(0)
    stop_pids(sys.argv[2])
