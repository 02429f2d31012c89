"""A real single-node Slurm cluster on localhost, with fake GPUs, for tests and by hand.

Used by ``tests/slurm/conftest.py`` (pytest fixture ``slurm_cluster``) and from the shell::

    python tests/slurm/localslurm.py up      # install if missing, start, wait ready; prints env
    python tests/slurm/localslurm.py status
    python tests/slurm/localslurm.py down    # stop the daemons ``up`` started

``up`` installs ``slurm-wlm`` and ``munge`` with apt when they are missing (needs root), writes
``slurm.conf``/``gres.conf`` into a private folder (``$CXRF_SLURM_DIR``, default
``/tmp/cxrfoundry-slurm``) and links them from ``/etc/slurm``: the config must be at the default
place because the Snakemake job step drops ``SLURM_CONF`` (with every ``SLURM_*`` variable)
before its inner ``srun``. An existing ``/etc/slurm/slurm.conf`` that is not such a link (a real
site's) is never replaced: ``up`` refuses instead. Fake GPUs are character devices made with
``mknod`` (Slurm's GRES plugin ignores plain files and bare ``Count=``); jobs that ask for
``--gpus`` get ``CUDA_VISIBLE_DEVICES`` like on a real GPU node.

Accounting: where ``mariadb-server`` and ``slurmdbd`` can be installed, the cluster also runs a
private MariaDB (its own data folder, TCP on 127.0.0.1 only) and ``slurmdbd``, so ``sacct``
works as on a site with accounting, and both status commands (``squeue`` and ``sacct``) can be
tested. Where they cannot, the cluster runs without accounting (``accounting`` is then False)
and only ``squeue`` works; ``MinJobAge`` is long enough for it either way.

Only daemons this module started are ever stopped, by their recorded process ids; a munged
that was already running (e.g. a system service) is reused and left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("localslurm")

DEFAULT_DIR = Path(os.environ.get("CXRF_SLURM_DIR", "/tmp/cxrfoundry-slurm"))
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")
SYSTEM_CONF_DIR = Path("/etc/slurm")
#: The accounting database: a private MariaDB on loopback (ports away from a system MySQL's).
DB_PORT = 3397
DBD_PORT = 6819
DB_USER, DB_PASS, DB_NAME = "slurm", "cxrfoundry-test", "slurm_acct_db"
#: Partitions of the test cluster: ``cpu`` is the default, ``gpu`` has the same node.
PARTITIONS = ("cpu", "gpu")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (the message says why)."""


def _run(cmd: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child not yet reaped) counts as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _apt_install(packages: list[str]) -> str | None:
    """``apt-get install -y packages`` (refreshing the package lists first if that fails);
    ``None`` on success, else the error text."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", *packages]
    proc = _run(install, timeout=600, env=env)
    if proc.returncode != 0:  # missing or stale package lists
        _run(["apt-get", "update"], timeout=600, env=env)
        proc = _run(install, timeout=600, env=env)
    return None if proc.returncode == 0 else f"{' '.join(install)}: {proc.stderr.strip()[-2000:]}"


def _can_apt(allow_apt: bool) -> bool:
    return os.geteuid() == 0 and allow_apt and shutil.which("apt-get") is not None


def ensure_installed(allow_apt: bool = True) -> None:
    """Install slurm-wlm and munge with apt if their daemons are missing."""
    needed = ["slurmctld", "slurmd", "munged", "sbatch", "squeue"]
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in needed):
        return
    if not _can_apt(allow_apt):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and apt-get cannot run here")
    log.info("installing slurm-wlm and munge with apt-get")
    error = _apt_install(["slurm-wlm", "munge"])
    if error:
        raise SlurmUnavailable(f"failed: {error}")


def ensure_accounting_installed(allow_apt: bool = True) -> bool:
    """Install mariadb-server and slurmdbd with apt if missing; False where that fails."""
    needed = ["/usr/sbin/slurmdbd", "/usr/sbin/mariadbd", "/usr/bin/mariadb-install-db"]
    if all(Path(b).exists() for b in needed):
        return True
    if not _can_apt(allow_apt):
        return False
    log.info("installing mariadb-server and slurmdbd with apt-get (accounting)")
    error = _apt_install(["mariadb-server", "slurmdbd"])
    if error:
        log.warning("no accounting: %s", error)
        return False
    return all(Path(b).exists() for b in needed)


def _node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory MB) as slurmd sees them."""
    proc = _run(["slurmd", "-C"])
    cpus = re.search(r"\bCPUs=(\d+)", proc.stdout)
    mem = re.search(r"\bRealMemory=(\d+)", proc.stdout)
    if proc.returncode != 0 or not cpus or not mem:
        raise SlurmUnavailable(f"slurmd -C failed: {proc.stdout} {proc.stderr}")
    return int(cpus.group(1)), int(mem.group(1))


@dataclass
class LocalSlurm:
    """A single-node Slurm cluster whose files live under ``root``."""

    root: Path = DEFAULT_DIR
    gpus: int = 2
    virtual_cpus: int = 32
    virtual_mem_mb: int = 256_000
    #: Run MariaDB + slurmdbd (sacct works); set to False by ``up`` where they cannot run.
    accounting: bool = True
    started: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment additions clients (sbatch, squeue, snakemake) need."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def state_file(self) -> Path:
        return self.root / "started.json"

    # ----------------------------------------------------------------- configuration
    def write_config(self) -> None:
        """Write slurm.conf, gres.conf and the fake GPU device nodes."""
        host = socket.gethostname().split(".")[0]
        cpus, mem = _node_hardware()
        etc, dev = self.root / "etc", self.root / "dev"
        for sub in ("etc", "dev", "spool/ctld", "spool/d", "log", "run", "db"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            node = dev / f"gpu{i}"
            if not node.exists():
                # Same major/minor as /dev/null: harmless to open, and a char device as GRES wants.
                proc = _run(["mknod", str(node), "c", "1", "3"])
                if proc.returncode != 0:
                    raise SlurmUnavailable(f"mknod {node} failed: {proc.stderr.strip()}")
        gres_files = f"{dev}/gpu[0-{self.gpus - 1}]" if self.gpus > 1 else f"{dev}/gpu0"
        # The node is declared as big as a modest cluster node (SlurmdParameters=config_overrides
        # lets slurmd accept more than it has), so the real profile's requests (8 CPUs per GPU,
        # 64 GB) are schedulable unchanged. Nothing enforces the limits (no cgroups), and
        # Snakemake's --jobs caps how many jobs actually share the real cores.
        cpus = max(cpus, self.virtual_cpus)
        real_mem = max(mem, self.virtual_mem_mb)
        conf = f"""# Written by tests/slurm/localslurm.py: a single-node test cluster.
ClusterName=cxrfoundry
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation={self.root}/spool/ctld
SlurmdSpoolDir={self.root}/spool/d
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
{self._accounting_conf()}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue status checks need finished jobs visible for >= 3x the status interval.
MinJobAge=300
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MessageTimeout=20
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MpiDefault=none
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_mem} \
Gres=gpu:fake:{self.gpus} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={host} Default=NO MaxTime=INFINITE State=UP
"""
        (etc / "slurm.conf").write_text(conf)
        (etc / "gres.conf").write_text(f"Name=gpu Type=fake File={gres_files}\n")
        if self.accounting:
            dbd = etc / "slurmdbd.conf"
            dbd.write_text(f"""# Written by tests/slurm/localslurm.py: test cluster accounting.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={DBD_PORT}
SlurmUser=root
PidFile={self.root}/run/slurmdbd.pid
LogFile={self.root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={DB_PORT}
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
""")
            dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it holds a password)
        self._link_system_conf()

    def _accounting_conf(self) -> str:
        if not self.accounting:
            return "AccountingStorageType=accounting_storage/none"
        return (
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            "AccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={DBD_PORT}"
        )

    def _link_system_conf(self) -> None:
        SYSTEM_CONF_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("slurm.conf", "gres.conf"):
            link, target = SYSTEM_CONF_DIR / name, self.root / "etc" / name
            if link.is_symlink() and link.resolve() == target.resolve():
                continue
            if link.exists() or link.is_symlink():
                raise SlurmUnavailable(
                    f"{link} exists and is not this test cluster's; refusing to replace a site "
                    "configuration (run the tests on a machine without Slurm configured)"
                )
            link.symlink_to(target)

    def _unlink_system_conf(self) -> None:
        for name in ("slurm.conf", "gres.conf"):
            link = SYSTEM_CONF_DIR / name
            if link.is_symlink() and Path(os.readlink(link)).parent == self.root / "etc":
                link.unlink()

    # ----------------------------------------------------------------- daemons
    def _munge_works(self) -> bool:
        if not MUNGE_SOCKET.exists() or not shutil.which("munge"):
            return False
        with contextlib.suppress(subprocess.TimeoutExpired):
            cred = _run(["munge", "-n"], timeout=10)
            if cred.returncode == 0:
                return _run(["unmunge"], input=cred.stdout, timeout=10).returncode == 0
        return False

    def _start_munge(self) -> None:
        if self._munge_works():
            log.info("munged already running; reusing it")
            return
        import pwd

        pw = pwd.getpwnam("munge")
        run_dir = MUNGE_SOCKET.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        os.chown(run_dir, pw.pw_uid, pw.pw_gid)
        run_dir.chmod(0o755)
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(128))
            os.chown(MUNGE_KEY, pw.pw_uid, pw.pw_gid)
            MUNGE_KEY.chmod(0o400)
        log_file = self.root / "log" / "munged.log"
        proc = subprocess.Popen(
            ["/usr/sbin/munged", "--foreground", "--force", f"--log-file={log_file}"],
            user=pw.pw_uid,
            group=pw.pw_gid,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "log" / "munged.stderr", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        self.started["munged"] = proc.pid
        self._save()
        self._wait(self._munge_works, 15, "munged", log_file)

    def _db_works(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", DB_PORT), 1):
            return True
        return False

    def _start_database(self) -> None:
        """A private MariaDB for slurmdbd: own data folder and socket, loopback TCP only."""
        db, run = self.root / "db", self.root / "run"
        if not (db / "mysql").is_dir():
            proc = _run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={db}", "--user=root",
                 "--skip-test-db", "--auth-root-authentication-method=socket"],
                timeout=120,
            )  # fmt: skip
            if proc.returncode != 0:
                raise SlurmUnavailable(f"mariadb-install-db failed: {proc.stderr[-1000:]}")
        init = self.root / "etc" / "db-init.sql"
        init.write_text(
            "".join(
                f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{host}' IDENTIFIED BY '{DB_PASS}';\n"
                f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'{host}';\n"
                for host in ("127.0.0.1", "localhost")
            )
        )
        init.chmod(0o600)
        self._start(
            "mariadbd",
            ["--no-defaults", f"--datadir={db}", f"--socket={run}/mysqld.sock",
             f"--port={DB_PORT}", "--bind-address=127.0.0.1", "--user=root",
             f"--init-file={init}", f"--pid-file={run}/mariadbd.pid",
             f"--log-error={self.root}/log/mariadbd.log", "--skip-log-bin",
             "--innodb-buffer-pool-size=64M"],
        )  # fmt: skip
        self._wait(self._db_works, 60, "mariadbd", self.root / "log" / "mariadbd.log")

    def _dbd_works(self) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self._client("sacctmgr", "-n", "list", "cluster", timeout=5).returncode == 0
        return False

    def _start_accounting(self) -> None:
        if "mariadbd" not in self.started:
            self._start_database()
        if "slurmdbd" not in self.started:
            self._start("slurmdbd", ["-D"])
        self._wait(self._dbd_works, 60, "slurmdbd", self.root / "log" / "slurmdbd.log")
        # slurmctld registers its cluster on start too, but only once slurmdbd knows it.
        listed = self._client("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster")
        if "cxrfoundry" not in listed.stdout.split():
            add = self._client("sacctmgr", "-i", "add", "cluster", "cxrfoundry", timeout=30)
            if add.returncode != 0:
                raise SlurmUnavailable(f"sacctmgr add cluster failed: {add.stderr or add.stdout}")

    def _start(self, name: str, args: list[str]) -> None:
        log_path = self.root / "log" / f"{name}.stderr"
        proc = subprocess.Popen(
            [f"/usr/sbin/{name}", *args],
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(log_path, "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        self.started[name] = proc.pid
        self._save()
        time.sleep(0.2)
        if proc.poll() is not None:
            raise SlurmUnavailable(
                f"{name} exited at once (rc {proc.returncode}); see {log_path} and "
                f"{self.root}/log/{name}.log:\n{self._tail(log_path)}"
            )

    def _tail(self, path: Path, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return path.read_text(errors="replace")[-n:]
        return ""

    def _wait(self, check, timeout: float, what: str, log_path: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.25)
        raise SlurmUnavailable(f"{what} not ready after {timeout:.0f} s:\n{self._tail(log_path)}")

    def _client(self, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return _run(list(args), timeout=timeout, env={**os.environ, **self.env})

    def node_state(self) -> str:
        """The node's state as sinfo reports it ('' when slurmctld does not answer)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc = self._client("sinfo", "-h", "-N", "-o", "%T", timeout=5)
            if proc.returncode == 0:
                return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
        return ""

    def ready(self) -> bool:
        """True when the node is idle or busy and takes jobs."""
        return self.node_state().rstrip("*") in {"idle", "mixed", "allocated", "completing"}

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.started))

    def _load(self) -> dict[str, int]:
        with contextlib.suppress(OSError, ValueError):
            return {k: int(v) for k, v in json.loads(self.state_file.read_text()).items()}
        return {}

    def up(self, timeout: float = 60, allow_apt: bool = True) -> bool:
        """Start the cluster (installing it if needed); return False if it was already up."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd/munged needs root")
        ensure_installed(allow_apt)
        if self.accounting and not ensure_accounting_installed(allow_apt):
            log.warning("mariadb-server/slurmdbd unavailable: cluster without accounting")
            self.accounting = False
        previous = {k: v for k, v in self._load().items() if _alive(v)}
        if self.conf.exists() and {"slurmctld", "slurmd"} <= previous.keys() and self.ready():
            log.info("cluster in %s already up; reusing it", self.root)
            self.accounting = "slurmdbd" in previous
            self.started = {}
            return False
        self.started = previous
        try:
            self.write_config()
            self._start_munge()
            if self.accounting:
                self._start_accounting()
            if "slurmctld" not in self.started:
                # -c: ignore saved state, -i: ignore errors reading it; -D: stay in foreground
                # so the recorded pid is the daemon's.
                self._start("slurmctld", ["-D", "-c", "-i"])
            if "slurmd" not in self.started:
                self._start("slurmd", ["-D"])
            self._wait(self.ready, timeout, "slurm node", self.root / "log" / "slurmctld.log")
        except BaseException:
            self.down()
            raise
        return True

    def down(self, grace: float = 10) -> None:
        """Cancel jobs, then stop the daemons this cluster started (recorded pids only)."""
        pids = {**self._load(), **self.started}
        if "slurmctld" in pids and _alive(pids["slurmctld"]):
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self._client("scancel", "--full", "--user", str(os.getuid()), timeout=10)
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline:
                    q = self._client("squeue", "-h", "-t", "RUNNING,COMPLETING", timeout=5)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.5)
        # slurmd first so it does not spin reconnecting, munged last (slurm needs it to talk).
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            pid = pids.get(name)
            if not pid or not _alive(pid):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _alive(pid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.1)
            if _alive(pid):
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.started = {}
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self._unlink_system_conf()


@contextlib.contextmanager
def cluster(root: Path = DEFAULT_DIR, gpus: int = 2, timeout: float = 60) -> Iterator[LocalSlurm]:
    """Bring the cluster up for the duration of the block; stop only what this call started."""
    slurm = LocalSlurm(root=root, gpus=gpus)
    began = slurm.up(timeout=timeout)
    try:
        yield slurm
    finally:
        if began:
            slurm.down()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``up``, ``down`` or ``status``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="cluster state folder")
    parser.add_argument("--gpus", type=int, default=2, help="number of fake GPUs")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    slurm = LocalSlurm(root=args.dir, gpus=args.gpus)
    if args.action == "up":
        t0 = time.monotonic()
        try:
            slurm.up(timeout=args.timeout)
        except SlurmUnavailable as exc:
            print(f"slurm unavailable: {exc}", file=sys.stderr)
            return 2
        print(f"# cluster ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        print(f"export SLURM_CONF={slurm.conf}")
        return 0
    if args.action == "down":
        slurm.down()
        return 0
    state = slurm.node_state() if slurm.conf.exists() else ""
    print(f"node: {state or 'down'}; daemons: {slurm._load()}")
    return 0 if state else 1


if __name__ == "__main__":
    sys.exit(main())
