"""Run spacetime commands as Ray jobs on a cluster, and watch them.

    spacetime submit --wait -- spacetime retrain ...     # everything after `--` runs on the cluster
    spacetime jobs status|logs|stop|list ...

The cluster is the one `ray up ray_cluster.yaml` starts (or any Ray cluster whose head runs the
dashboard's job server, `ray[default]`); `--address` is that job server's HTTP address, e.g. the
http://127.0.0.1:8265 that `ray dashboard ray_cluster.yaml` forwards. `LocalHead` starts such a
head on this machine, for tests and for trying a job before paying for a cluster.

Ray's job SDK is imported where it is used: the CLI registers these commands at start-up, and
`spacetime --help` or `spacetime curate` should not pay ~0.9 s for an HTTP client they never use.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from pipeline.sources import VIDEO_EXTS

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's own, in its order of precedence
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _any_case(ext: str) -> str:
    """".mov" -> "*.[mM][oO][vV]": exclude patterns are case-sensitive, and cameras write IMG_0001.MOV."""
    return "*" + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in ext)


# What never travels with a job. Ray also honours the working dir's .gitignore. Footage, tables
# and checkpoints belong on storage every node reads (s3://, a shared mount), not in the code
# upload, which Ray caps at its gRPC message size (~500 MiB). Secrets (.env files) stay here.
# Ray matches these gitignore-style against each path relative to the working dir: a name without
# a slash matches at any depth, and no trailing "/" (Ray tests a directory's path without one).
# ray_cluster.yaml's rsync_exclude holds the same patterns, for the copy `ray up` syncs to each node.
EXCLUDES = [
    ".git", ".venv", "demo_out", "gpu_out", "out", "runs", "ray_results", "build", "**/__pycache__",
    "*.egg-info", ".pytest_cache", ".env*",
    *sorted(_any_case(ext) for ext in VIDEO_EXTS),  # every extension `curate` takes as footage
    "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.parquet", "*.npz",
]

FAILED_STATES = ("FAILED", "STOPPED")  # JobStatus is a str enum: its members compare equal to these


class JobFailed(RuntimeError):
    """A waited-for job ended FAILED or STOPPED; `logs_tail` holds its last log lines."""

    def __init__(self, job_id: str, status: JobStatus, message: str, logs_tail: str):
        super().__init__(f"job {job_id} {status.value}: {message}")
        self.job_id, self.status, self.message, self.logs_tail = job_id, status, message, logs_tail


def code_version(root: Path = PROJECT_ROOT) -> Optional[str]:
    """The submitted tree's commit (short hash, "-dirty" if tracked files changed), or None.

    The job's copy of the code has no .git (it is excluded), so the submitter records the version
    and the job reads it from the SPACETIME_CODE_VERSION environment variable.
    """
    def git(*args: str) -> Optional[str]:
        try:  # --no-optional-locks: only read the repository, never refresh its index
            out = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    return commit + "-dirty" if git("status", "--porcelain", "--untracked-files=no") else commit


def runtime_env(working_dir: Path = PROJECT_ROOT) -> dict:
    """The runtime_env that carries the project to the cluster.

    `working_dir` alone: Ray zips the tree, unpacks it on the node that runs the driver (and on
    every worker its tasks use), makes it the cwd and puts it first on PYTHONPATH, so `pipeline`,
    `captioner`, `generator` and `spacetime` import from the submitted code, ahead of the copy
    ray_cluster.yaml installed. `py_modules` would add nothing (the packages are top-level dirs of
    the working dir). No `pip`: the dependencies (torch, ray, open_clip, ...) are installed once per
    node by ray_cluster.yaml's setup_commands; a pip runtime_env would build a fresh virtualenv
    with torch on every node for every new requirement set (minutes and gigabytes per job).
    """
    env_vars = {"PYTHONUNBUFFERED": "1"}  # so the job's prints reach its logs as they happen
    version = code_version(working_dir)
    if version:
        env_vars["SPACETIME_CODE_VERSION"] = version
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env_vars}


def job_client(address: str) -> JobSubmissionClient:
    """A Ray JobSubmissionClient talking to exactly `address` (the job server's http://host:port)."""
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is
    # given, and ray.init() sets RAY_ADDRESS in its own process: an explicit address would be
    # silently swapped for whatever cluster this process last joined. Hide both while it resolves.
    from ray.job_submission import JobSubmissionClient

    saved = {k: os.environ.pop(k) for k in ADDRESS_ENV_VARS if k in os.environ}
    try:
        return JobSubmissionClient(address)
    finally:
        os.environ.update(saved)


def _cli_client(address: str) -> JobSubmissionClient:
    """The client for a CLI command: an unreachable cluster is a short error, exit status 2.

    A cluster with Ray's token authentication needs RAY_AUTH_MODE=token and the cluster's token
    (RAY_AUTH_TOKEN, or ~/.ray/auth_token) in this environment; the client sends it.
    """
    from ray.exceptions import AuthenticationError, RpcError

    try:
        return job_client(address)
    except AuthenticationError as e:
        _echo_err(f"the Ray job server at {address} refused us: {e}")
        raise typer.Exit(2)
    # Nothing listening (ConnectionError), a malformed address (ValueError, requests' InvalidURL, an
    # OSError), something other than a Ray job server answering (RuntimeError), or no GCS at an
    # address without http://, which Ray takes for a GCS address (RpcError).
    except (OSError, ValueError, RuntimeError, RpcError) as e:
        hint = "" if "://" in address else " (an address without http:// is taken as a Ray GCS address)"
        _echo_err(f"cannot reach the Ray job server at {address}: {' '.join(str(e).split())}{hint}")
        raise typer.Exit(2)


@contextmanager
def _refused_requests():
    """A request the job server refuses (an unknown job id, a --job-id already taken) is one error
    line, exit status 2: Ray's SDK raises it as a RuntimeError("Request failed with status code
    404: Job ... does not exist."), some with the server's traceback inside, whose last line says why."""
    try:
        yield
    except typer.Exit:  # typer's Exit is a RuntimeError too: ours, already said
        raise
    except RuntimeError as e:
        if not str(e).startswith("Request failed with status code"):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip(" .")]
        _echo_err(f"error: {lines[-1]}")
        raise typer.Exit(2)


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def _echo_err(line: str) -> None:
    typer.echo(line, err=True)


def _from_last_line(text: str) -> str:
    """The end of `text` from the line break before its last line on: its _tail(., 1) is the whole
    text's, and whatever is appended to it next has the same last line as if appended to the whole."""
    stripped = text.rstrip("\n")
    lines = stripped.splitlines(keepends=True)
    start = len(stripped) - len(lines[-1]) if lines else 0
    return text[max(start - 1, 0):]


class _LogTail:
    """A job's log followed in a daemon thread over Ray's tail websocket (`tail_job_logs`), keeping
    only its end from the latest line on (`end`): each byte of the log crosses the network once.
    The stream ends by itself shortly after the job does; `error` is set if it broke."""

    def __init__(self, client: JobSubmissionClient, job_id: str):
        self.end, self.error = "", None
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._follow(client, job_id))
        self._thread = threading.Thread(target=self._run, name=f"tail-{job_id}", daemon=True)
        self._thread.start()

    async def _follow(self, client: JobSubmissionClient, job_id: str) -> None:
        async for chunk in client.tail_job_logs(job_id):
            self.end = _from_last_line(self.end + chunk)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - e.g. a proxy that refuses websockets: wait_for_job reads the whole log
            self.error = e
        finally:
            self._loop.close()

    def wait(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the stream to end (it ends once an ended job's log is all sent)."""
        self._thread.join(timeout_s)

    def close(self) -> None:
        if self._thread.is_alive():
            with suppress(RuntimeError):  # the loop closed in between: the stream had ended
                self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(5)


def wait_for_job(address: str, job_id: str, poll_s: float = 2.0,
                 timeout_s: Optional[float] = None,
                 progress: Optional[Callable[[str], None]] = _echo_err) -> JobStatus:
    """Poll a job until it is SUCCEEDED, FAILED or STOPPED, and return that status.

    Each poll hands `progress` one line: status, elapsed time and the job's latest log line.
    On a terminal it is redrawn in place; otherwise a line is printed whenever it changes.
    Raises TimeoutError after `timeout_s` seconds (the job keeps running).
    The log is streamed once (fetching it whole every poll moved O(n^2) bytes over a long job).
    """
    client = job_client(address)
    start = time.monotonic()
    redraw = progress is _echo_err and sys.stderr.isatty()
    shown = None  # (status, last log line) last printed, when not redrawing
    tail = _LogTail(client, job_id) if progress is not None else None
    try:
        while True:
            status = client.get_job_status(job_id)
            elapsed = time.monotonic() - start
            if tail is not None:
                if status.is_terminal():  # the job's last lines may still be on their way
                    tail.wait(5)
                # a broken stream: the whole log, as before streaming
                last = _tail(client.get_job_logs(job_id) if tail.error else tail.end, 1)[:100]
                line = f"[{job_id}] {status.value:<9} {int(elapsed) // 60}:{int(elapsed) % 60:02d}  {last}"
                if redraw:
                    sys.stderr.write("\r\033[K" + line)
                    sys.stderr.flush()
                elif (status, last) != shown:  # a new line only when more than the clock moved
                    progress(line)
                    shown = (status, last)
            if status.is_terminal():
                if redraw:
                    sys.stderr.write("\n")
                return status
            if timeout_s is not None and elapsed > timeout_s:
                raise TimeoutError(f"job {job_id} still {status.value} after {timeout_s:.0f} s")
            time.sleep(poll_s)
    finally:
        if tail is not None:
            tail.close()


def submit(entrypoint: list[str], address: str = DEFAULT_ADDRESS, wait: bool = False,
           working_dir: Path = PROJECT_ROOT, submission_id: Optional[str] = None,
           num_cpus: float = 0, num_gpus: float = 0, poll_s: float = 2.0,
           tail_lines: int = 40,
           progress: Optional[Callable[[str], None]] = _echo_err) -> str:
    """Submit `entrypoint` (argv words, e.g. ["spacetime", "retrain", ...]) as a Ray job; return its id.

    The job runs `shlex.join(entrypoint)` in a shell on the cluster, in a copy of `working_dir`
    (see `runtime_env`). `num_cpus`/`num_gpus` are reserved for the driver process alone (it
    orchestrates; its Ray Data / Train work asks for its own resources). With `wait`, polls until
    the job ends and raises JobFailed (with its last `tail_lines` log lines) if it FAILED or was
    STOPPED.
    """
    if not entrypoint:
        raise ValueError("empty entrypoint: give the command to run, e.g. -- spacetime retrain")
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise ValueError(f"working_dir {working_dir} is not a directory")
    if working_dir == PROJECT_ROOT and not (working_dir / "pyproject.toml").is_file():
        # spacetime installed into site-packages: shipping its parent would ship every package.
        raise ValueError(f"{working_dir} is not a spacetime checkout; pass the project directory")
    client = job_client(address)
    job_id = client.submit_job(
        entrypoint=shlex.join(entrypoint),
        submission_id=submission_id,
        runtime_env=runtime_env(working_dir),
        metadata={"submitted_by": "spacetime"},
        entrypoint_num_cpus=num_cpus,
        entrypoint_num_gpus=num_gpus,
    )
    if wait:
        status = wait_for_job(address, job_id, poll_s=poll_s, progress=progress)
        if status in FAILED_STATES:
            info = client.get_job_info(job_id)
            raise JobFailed(job_id, status, info.message or "",
                            _tail(client.get_job_logs(job_id), tail_lines))
    return job_id


# ---- CLI ---------------------------------------------------------------------------------------

Address = Annotated[str, typer.Option(
    "--address", envvar=list(ADDRESS_ENV_VARS),
    help="Ray job server (dashboard) HTTP address, e.g. via `ray dashboard ray_cluster.yaml`.")]
JobId = Annotated[str, typer.Argument(help="The job's submission id (raysubmit_...).")]

# Register submit_command with these: option parsing stops at the entrypoint's first word, so
# `spacetime submit --wait spacetime retrain --steps 5` works without `--` too.
SUBMIT_CONTEXT_SETTINGS = {"allow_interspersed_args": False}

jobs_app = typer.Typer(help="Watch and control spacetime jobs on a Ray cluster.", no_args_is_help=True)


def submit_command(
    entrypoint: Annotated[list[str], typer.Argument(
        help="The command to run on the cluster; put it after `--`.", show_default=False)],
    address: Address = DEFAULT_ADDRESS,
    wait: Annotated[bool, typer.Option("--wait", help="Poll until the job ends; exit 1 unless it SUCCEEDED.")] = False,
    working_dir: Annotated[Path, typer.Option(help="Directory shipped with the job (the project root).")] = PROJECT_ROOT,
    submission_id: Annotated[Optional[str], typer.Option("--job-id", help="Choose the job's id.")] = None,
    num_gpus: Annotated[float, typer.Option(help="GPUs reserved for the driver process itself.")] = 0,
    poll: Annotated[float, typer.Option(help="Seconds between status polls with --wait.")] = 2.0,
) -> None:
    """Submit a command as a Ray job: `spacetime submit --wait -- spacetime retrain ...`.

    Prints the job id on stdout. With --wait, prints a progress line on stderr and exits 1 if the
    job FAILED or was STOPPED (after printing its last log lines). Ctrl-C detaches; the job goes on.
    """
    _cli_client(address)  # fail fast, and in one line, on an unreachable cluster
    try:
        with _refused_requests():
            job_id = submit(entrypoint, address=address, wait=False, working_dir=working_dir,
                            submission_id=submission_id, num_gpus=num_gpus)
    except ValueError as e:
        raise typer.BadParameter(str(e))
    typer.echo(job_id)
    if not wait:
        _echo_err(f"follow it with: spacetime jobs logs {job_id} --follow --address {address}")
        return
    try:
        status = wait_for_job(address, job_id, poll_s=poll)
    except KeyboardInterrupt:
        _echo_err(f"\ndetached; {job_id} keeps running (spacetime jobs stop {job_id} to end it)")
        raise typer.Exit(130)
    if status in FAILED_STATES:
        client = _cli_client(address)
        _echo_err(_tail(client.get_job_logs(job_id), 40))
        _echo_err(f"job {job_id} {status.value}: {client.get_job_info(job_id).message or ''}")
        raise typer.Exit(1)
    _echo_err(f"job {job_id} {status.value}")


def _ms_to_time(ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


@jobs_app.command("status")
def status_command(job_id: JobId, address: Address = DEFAULT_ADDRESS) -> None:
    """Print a job's status, message, entrypoint and start/end times."""
    with _refused_requests():
        info: JobDetails = _cli_client(address).get_job_info(job_id)
    typer.echo(f"{job_id}: {info.status.value}")
    if info.message:
        typer.echo(f"  message:    {info.message}")
    typer.echo(f"  entrypoint: {info.entrypoint}")
    typer.echo(f"  started:    {_ms_to_time(info.start_time)}")
    typer.echo(f"  ended:      {_ms_to_time(info.end_time)}")


@jobs_app.command("logs")
def logs_command(job_id: JobId, address: Address = DEFAULT_ADDRESS,
                 follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False) -> None:
    """Print a job's logs (driver stdout and stderr); --follow streams them until the job ends."""
    client = _cli_client(address)
    if not follow:
        with _refused_requests():
            typer.echo(client.get_job_logs(job_id), nl=False)
        return

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            typer.echo(chunk, nl=False)

    with _refused_requests():
        client.get_job_info(job_id)  # an unknown id: refused here, not as a websocket handshake error
        asyncio.run(stream())


@jobs_app.command("stop")
def stop_command(job_id: JobId, address: Address = DEFAULT_ADDRESS) -> None:
    """Ask the cluster to stop a job (SIGTERM to its driver, then SIGKILL)."""
    with _refused_requests():
        stopped = _cli_client(address).stop_job(job_id)
    if stopped:
        typer.echo(f"stopping {job_id}")
    else:
        typer.echo(f"{job_id} had already ended")


@jobs_app.command("list")
def list_command(address: Address = DEFAULT_ADDRESS) -> None:
    """List the cluster's jobs, oldest first: id, status, start time, entrypoint."""
    jobs = sorted(_cli_client(address).list_jobs(), key=lambda j: j.start_time or 0)
    for job in jobs:
        entry = job.entrypoint if len(job.entrypoint) <= 60 else job.entrypoint[:57] + "..."
        typer.echo(f"{job.submission_id or job.job_id}  {job.status.value:<9}  "
                   f"{_ms_to_time(job.start_time)}  {entry}")


# ---- a head on this machine --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) pids in session `sid`, i.e. everything one `ray start` left running."""
    found = []
    if Path("/proc").is_dir():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # exited meanwhile
                continue
            # Fields after "(comm)": state, ppid, pgrp, session, ...; comm may contain spaces.
            state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
            if int(session) == sid and state not in ("Z", "X"):
                found.append(int(entry))
        return found
    out = subprocess.run(["ps", "-A", "-o", "pid=,stat="], capture_output=True, text=True)
    for pid, state in (line.split(None, 1) for line in out.stdout.splitlines() if line.strip()):
        try:
            if os.getsid(int(pid)) == sid and not state.startswith("Z"):
                found.append(int(pid))
        except OSError:
            pass
    return found


class LocalHead:
    """A one-node Ray cluster on this machine, with the dashboard's job server, isolated for tests.

    Everything is private to this head: a fresh --temp-dir (so no other `ray.init()` on the machine
    finds it) and free ports for every service (so it runs beside other local clusters). Token
    authentication is off (RAY_AUTH_MODE=disabled): otherwise Ray turns it on whenever some earlier
    `ray.init()` left a ~/.ray/auth_token, and every service listens on 127.0.0.1 only. `ray stop`
    would kill every Ray process of the user, so `stop()` instead ends only the processes in the
    session `ray start` ran in (started with start_new_session, so that session is this head's).

        with LocalHead(num_cpus=1) as head:
            submit(["python", "-c", "print(1)"], address=head.address, wait=True)
    """

    def __init__(self, num_cpus: int = 1, ray_bin: Optional[str] = None, start_timeout_s: float = 60):
        self.num_cpus = num_cpus
        # The ray next to this interpreter: the same install as the client that will talk to it.
        self.ray_bin = ray_bin or str(Path(sys.executable).parent / "ray")
        self.start_timeout_s = start_timeout_s
        self.temp_dir: Optional[Path] = None
        self.address: Optional[str] = None  # http://127.0.0.1:<dashboard port>
        self._sid: Optional[int] = None

    def start(self) -> str:
        """Start the head; return the job server's address once it answers. Takes ~4 s."""
        # Short path: Ray puts unix sockets under it, and those are limited to ~107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
        port = {name: _free_port() for name in (
            "gcs", "dashboard", "client", "node_manager", "object_manager", "agent_http",
            "agent_grpc", "metrics", "runtime_env")}
        cmd = [
            self.ray_bin, "start", "--head", "--node-ip-address=127.0.0.1",
            f"--port={port['gcs']}", f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--disable-usage-stats",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={port['dashboard']}",
            f"--ray-client-server-port={port['client']}",
            f"--node-manager-port={port['node_manager']}",
            f"--object-manager-port={port['object_manager']}",
            f"--dashboard-agent-listen-port={port['agent_http']}",
            f"--dashboard-agent-grpc-port={port['agent_grpc']}",
            f"--metrics-export-port={port['metrics']}",
            f"--runtime-env-agent-port={port['runtime_env']}",
        ]
        env = {k: v for k, v in os.environ.items()
               if k not in ADDRESS_ENV_VARS + ("RAY_AUTH_TOKEN",)}
        env["RAY_AUTH_MODE"] = "disabled"
        # Job entrypoints run in a shell with the head's PATH: put this interpreter's bin first.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._sid = proc.pid
        try:
            out, _ = proc.communicate(timeout=self.start_timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"ray start did not return within {self.start_timeout_s:.0f} s")
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out}")
        self.address = f"http://127.0.0.1:{port['dashboard']}"
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.address + "/api/version", timeout=2) as r:
                    if r.status == 200:
                        return self.address
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"job server at {self.address} did not answer; ray start said:\n{out}")
            time.sleep(0.5)

    def pids(self) -> list[int]:
        """Live pids of this head's processes (GCS, raylet, dashboard, workers); [] once stopped."""
        return _session_pids(self._sid) if self._sid is not None else []

    def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM this head's processes, SIGKILL what is left after `grace_s`, delete its temp dir.

        The GCS and the log monitor can sit on SIGTERM for many seconds; a throwaway head need not wait.
        """
        if self._sid is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = _session_pids(self._sid)
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
                deadline = time.monotonic() + grace_s
                while pids and time.monotonic() < deadline:
                    time.sleep(0.2)
                    pids = _session_pids(self._sid)
                if not pids:
                    break
            self._sid = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> "LocalHead":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
