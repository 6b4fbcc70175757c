"""A one-node SLURM cluster on localhost, for tests: munged + slurmctld + slurmd, all state in one directory.

    reason = ensure_slurm_installed()          # None, or why SLURM cannot be had here (then skip)
    cluster = LocalSlurm(tmp_dir).start()      # own munge key and socket, free ports, SLURM_CONF in cluster.env
    job_id = cluster.sbatch([...])
    states = cluster.wait(job_id, timeout=600) # {"123_0": "COMPLETED", ...}
    cluster.stop()                             # stops only the daemons this object started

Debian's packages (``slurmctld slurmd slurm-client munge``, i.e. the parts of ``slurm-wlm``) are installed with
apt-get when a binary is missing and we are root. The cluster uses ``proctrack/linuxproc`` and ``task/none`` (no
cgroups, so it runs inside containers), no accounting database (job states come from ``scontrol``, kept for
``MinJobAge``), and ``SlurmUser=root``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "squeue", "scontrol", "sinfo")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
FINISHED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_slurm_installed(timeout: float = 900) -> str | None:
    """Install SLURM + munge with apt-get where missing. Returns None when usable, else the reason it is not."""
    if not missing_binaries():
        return None
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"missing {missing_binaries()} and not root, so apt-get cannot install {' '.join(APT_PACKAGES)}"
    if shutil.which("apt-get") is None:
        return f"missing {missing_binaries()} and no apt-get on this system"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t0 = time.time()
    wait_lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt/dpkg run (e.g. a second test session) finishes first
    for cmd in (
        ["apt-get", *wait_lock, "update", "-qq"],
        ["apt-get", *wait_lock, "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
    ):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out after {timeout:.0f} s"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}"
    print(f"[slurm_cluster] installed {' '.join(APT_PACKAGES)} with apt-get in {time.time() - t0:.1f} s")
    return None if not missing_binaries() else f"still missing {missing_binaries()} after apt-get install"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """munged + slurmctld + slurmd on this machine; configuration, state, logs and munge key under ``root``."""

    def __init__(self, root: str | Path, cluster_name: str = "litrlhf", cpus: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.cluster_name = cluster_name
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or max(2, os.cpu_count() or 1)  # the templates ask for 2 CPUs a task (config_overrides)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: dict[str, subprocess.Popen] = {}

    # -- configuration -------------------------------------------------------------------------------------------
    def slurm_conf(self, ctld_port: int, slurmd_port: int) -> str:
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        r = self.root
        return "\n".join(
            [
                f"ClusterName={self.cluster_name}",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={ctld_port}",
                f"SlurmdPort={slurmd_port}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={self.munge_socket},cred_expire=10",  # a requeue waits cred_expire (default 120 s)
                f"StateSaveLocation={r}/state",
                f"SlurmdSpoolDir={r}/spool",
                f"SlurmctldPidFile={r}/slurmctld.pid",
                f"SlurmdPidFile={r}/slurmd.pid",
                f"SlurmctldLogFile={r}/log/slurmctld.log",
                f"SlurmdLogFile={r}/log/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "SwitchType=switch/none",
                "MpiDefault=none",
                "MailProg=/bin/true",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SlurmdParameters=config_overrides",
                "ReturnToService=2",
                "MinJobAge=3600",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=60",
                "SchedulerParameters=sched_interval=1",
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={int(mem_mb * 0.9)}"
                " State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> LocalSlurm:
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(self.slurm_conf(free_port(), free_port()))
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                _sbin("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
        )
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(
            lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout, "slurmctld (scontrol ping)"
        )
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait_for(lambda: self.node_state() in ("idle", "mixed", "allocated"), timeout, "node idle (sinfo)")
        return self

    def stop(self) -> None:
        """Cancel this cluster's jobs, then terminate the daemons started by :meth:`start` (by their process ids)."""
        if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *sorted(set(jobs))], check=False)
                deadline = time.time() + 30
                while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self._procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, preexec_fn=_die_with_parent
        )

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 20) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + sorted((self.root / "munge").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # -- client commands -----------------------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, env=kw.pop("env", self.env), capture_output=True, text=True, check=check, timeout=60, **kw
        )

    def node_state(self) -> str:
        proc = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return proc.stdout.strip().rstrip("*~#") if proc.returncode == 0 else ""

    def job_states(self, job_id: str) -> dict[str, str]:
        """``{"<array job>_<task>" or "<job>": state}`` for every task of ``job_id`` (from ``scontrol show job``)."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        states = {}
        for line in proc.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "ArrayTaskId" in fields and fields.get("ArrayJobId"):
                for task in _expand(fields["ArrayTaskId"]):
                    states[f"{fields['ArrayJobId']}_{task}"] = fields["JobState"]
            elif "JobId" in fields:
                states[fields["JobId"]] = fields["JobState"]
        return states

    def wait(self, job_id: str, timeout: float = 900, poll: float = 2.0, on_change=print) -> dict[str, str]:
        """Poll until every task of ``job_id`` has finished; returns their final states."""
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            states = self.job_states(job_id)
            if states != last and on_change:
                on_change(
                    f"[slurm] {time.strftime('%H:%M:%S')} " + " ".join(f"{k}:{v}" for k, v in sorted(states.items()))
                )
            last = states
            if states and all(s in FINISHED for s in states.values()):
                return states
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {last}\n{self.logs()}")


def _die_with_parent() -> None:
    """In a daemon's child process before exec: SIGTERM it when the test process dies (even by SIGKILL)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _expand(task_ids: str) -> list[str]:
    """``"0-2%1"`` or ``"1,3"`` or ``"[1-2%1]"`` -> task ids (pending array records list a range)."""
    out = []
    for part in task_ids.strip("[]").split("%")[0].split(","):
        if "-" in part:
            a, b = part.split("-")
            out += [str(i) for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(part)
    return out


if __name__ == "__main__":  # python -m tests.slurm_cluster [DIR]: a cluster to try sbatch by hand; Ctrl-C stops it
    import signal
    import sys
    import tempfile

    reason = ensure_slurm_installed()
    if reason:
        raise SystemExit(f"SLURM cannot be installed here: {reason}")
    cluster = LocalSlurm(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lit_rlhf_slurm_"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with cluster:
        print(
            f"one-node SLURM cluster up (node {cluster.node}); in another shell:\n  export SLURM_CONF={cluster.conf}",
            flush=True,
        )
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
