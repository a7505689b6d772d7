"""ray_cluster.yaml against Ray's own autoscaler checks, and job submission against a real local head.

The head (spacetime.cluster.LocalHead) runs in its own temp dir, on free ports, in its own process
session, and is torn down by killing that session only: `ray stop` would also kill the Ray clusters
other tests on this machine are running. One head serves the whole module (~4 s to start).
"""
import copy
import functools
import time
import zipfile
from pathlib import Path

import jsonschema
import pytest
import typer
import yaml
from ray.autoscaler._private import resource_demand_scheduler
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.job_submission import JobStatus
from typer.testing import CliRunner

from spacetime.cluster import (EXCLUDES, PROJECT_ROOT, SUBMIT_CONTEXT_SETTINGS, JobFailed, LocalHead,
                               job_client, jobs_app, runtime_env, submit, submit_command, wait_for_job)

YAML_PATH = PROJECT_ROOT / "ray_cluster.yaml"


def load_cluster_yaml() -> dict:
    return yaml.safe_load(YAML_PATH.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does before touching a cloud: fill in defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ---- ray_cluster.yaml --------------------------------------------------------------------------

def test_cluster_yaml_passes_ray_schema():
    config = ray_validate(load_cluster_yaml())
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["cpu-curation"]["resources"]["CPU"] >= 8
    assert "GPU" not in types["cpu-curation"]["resources"]
    gpu = types["gpu-train"]["resources"]
    assert gpu["GPU"] == 1 and gpu["spacetime_gpu"] == 1


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c["available_node_types"]["gpu-train"]["resources"].update(GPU="one"),
     jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="no-such-type"), ValueError),
    (lambda c: c.update(worker_nodes_typo={}), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["cpu-curation"].pop("node_config"),
     jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["cpu-curation"].update(min_workers=50), ValueError),
])
def test_broken_cluster_yaml_fails(break_it, error):
    config = load_cluster_yaml()
    break_it(config)
    with pytest.raises(error):
        ray_validate(config)


def test_autoscaler_routes_work_to_the_right_group():
    """Ray's own bin-packing: CPU stages start curation nodes, GPU stages start GPU nodes."""
    config = ray_validate(load_cluster_yaml())
    scorer = functools.partial(resource_demand_scheduler._default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))

    def nodes_for(demands):
        to_add, unmet = resource_demand_scheduler.get_nodes_for(
            config["available_node_types"], {"head": 1}, "head", config["max_workers"], demands, scorer)
        assert unmet == []
        return dict(to_add)

    assert nodes_for([{"CPU": 1}] * 24) == {"cpu-curation": 2}      # 16 CPUs per curation node
    assert nodes_for([{"CPU": 1, "GPU": 1}]) == {"gpu-train": 1}
    assert nodes_for([{"CPU": 1, "spacetime_gpu": 1}]) == {"gpu-train": 1}


def test_cluster_yaml_installs_this_project():
    config = load_cluster_yaml()
    (remote, local), = config["file_mounts"].items()
    # `ray up` resolves the local side from the cwd; the docs say: run it from the repo root.
    assert (PROJECT_ROOT / local / "pyproject.toml").is_file()
    assert any("pip install" in c and f"-e {remote}" in c for c in config["setup_commands"])
    assert {".venv", ".git", "demo_out"} <= set(config["rsync_exclude"])
    # what `ray up` syncs to each node leaves out what a job's upload does: footage, checkpoints, tables
    assert set(EXCLUDES) <= set(config["rsync_exclude"])


def test_secrets_and_run_outputs_never_travel_with_a_job(tmp_path):
    """Ray's own packaging of a working dir under runtime_env(): code goes, secrets and outputs don't."""
    from ray._private.runtime_env.packaging import create_package

    keep = ["pkg/mod.py", "pyproject.toml", "datasets/demo.yaml"]
    drop = [".env", ".env.local", "runs/captioner/frames.npz", "runs/captioner/frames.npz.1a2b.tmp.npz",
            "pkg/cache.npz", "ray_results/captioner/result.json", "demo_out/run/report.html",
            "gpu_out/log.txt", "pkg/__pycache__/mod.cpython-312.pyc",
            # footage in any extension `curate` reads, in the upper case cameras write
            "footage/IMG_0001.MOV", "footage/00001.MTS", "footage/00002.m2ts", "footage/tape.mxf"]
    src = tmp_path / "project"
    for name in keep + drop:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("x")
    env = runtime_env(src)
    create_package(env["working_dir"], tmp_path / "pkg.zip", include_gitignore=True, excludes=env["excludes"])
    with zipfile.ZipFile(tmp_path / "pkg.zip") as z:
        shipped = {n for n in z.namelist() if not n.endswith("/")}
    assert shipped == set(keep)


# ---- jobs on a real local head -----------------------------------------------------------------

@pytest.fixture(scope="module")
def head():
    local = LocalHead(num_cpus=1)
    local.start()
    try:
        yield local
    finally:
        local.stop()
    assert local.pids() == [] and local.temp_dir is None


@pytest.fixture
def job_dir(tmp_path):
    """A tiny working_dir: the job must import from it and must not receive the excluded parts."""
    (tmp_path / "hello.py").write_text("GREETING = 'hello from job'\n")
    (tmp_path / "demo_out").mkdir()
    (tmp_path / "demo_out" / "big.bin").write_bytes(b"\0" * 1024)
    return tmp_path


def py(code: str) -> list[str]:
    return ["python", "-c", code]


def test_job_succeeds_and_its_logs_hold_its_output(head, job_dir):
    lines = []
    job_id = submit(py("import hello, os; print(hello.GREETING, os.path.exists('demo_out'))"),
                    address=head.address, wait=True, working_dir=job_dir, poll_s=0.5,
                    progress=lines.append)
    client = job_client(head.address)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "hello from job False" in client.get_job_logs(job_id)  # imported; demo_out excluded
    assert lines and lines[-1].startswith(f"[{job_id}] SUCCEEDED")


def test_failing_job_reports_failed_with_its_last_logs(head, job_dir, monkeypatch):
    # ray.init() leaves RAY_ADDRESS in its process; Ray's client would prefer it to ours.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(JobFailed) as failed:
        submit(py("import sys; print('about to fail'); sys.exit(3)"), address=head.address,
               wait=True, working_dir=job_dir, poll_s=0.5, progress=None)
    assert failed.value.status == JobStatus.FAILED
    assert "about to fail" in failed.value.logs_tail
    assert "3" in failed.value.message  # Ray reports the entrypoint's exit code


def test_waiting_on_a_long_job_fetches_its_log_once(head, job_dir, monkeypatch):
    """wait_for_job fetched the whole log at every poll to show its latest line: O(n^2) bytes over a
    long job. The log is streamed once; each progress line still shows the latest line then."""
    from ray.job_submission import JobSubmissionClient
    get_logs, tail_logs, fetched = JobSubmissionClient.get_job_logs, JobSubmissionClient.tail_job_logs, []

    def counted_get(self, job_id):  # Ray's own calls, counted
        logs = get_logs(self, job_id)
        fetched.append(len(logs))
        return logs

    async def counted_tail(self, job_id):
        async for chunk in tail_logs(self, job_id):
            fetched.append(len(chunk))
            yield chunk
    monkeypatch.setattr(JobSubmissionClient, "get_job_logs", counted_get)
    monkeypatch.setattr(JobSubmissionClient, "tail_job_logs", counted_tail)
    code = "import time\nfor i in range(40):\n    print(f'line {i:03d} ' + 'x' * 2000, flush=True)\n    time.sleep(0.1)"
    job_id = submit(py(code), address=head.address, working_dir=job_dir)
    lines = []
    assert wait_for_job(head.address, job_id, poll_s=0.2, progress=lines.append) == JobStatus.SUCCEEDED
    size = len(get_logs(job_client(head.address), job_id))
    assert size > 80_000 and sum(fetched) <= size, (size, fetched)  # every poll fetched it all: ~10x
    assert lines[-1].startswith(f"[{job_id}] SUCCEEDED") and "line 039 xxx" in lines[-1]
    shown = [int(line.split("line ")[1][:3]) for line in lines if "line " in line]
    assert len(shown) >= 2 and shown == sorted(shown), lines  # the server sends new lines about every second


def test_the_project_itself_travels_with_the_job(head):
    """The default working_dir is the repository: the job imports the submitted copy of spacetime."""
    code = ("import os, spacetime.cluster as c; print('FILE', c.__file__); "
            "print('EXCLUDED', [p for p in ('.venv', '.git') if os.path.exists(p)]); "
            "print('VERSION', os.environ.get('SPACETIME_CODE_VERSION'))")
    job_id = submit(py(code), address=head.address, wait=True, poll_s=0.5, progress=None)
    logs = job_client(head.address).get_job_logs(job_id)
    job_file = next(line.split(" ", 1)[1] for line in logs.splitlines() if line.startswith("FILE "))
    assert Path(job_file).name == "cluster.py"
    assert not job_file.startswith(str(PROJECT_ROOT))  # the uploaded copy, not this checkout
    assert "EXCLUDED []" in logs


def cli() -> typer.Typer:
    """The two entry points the way spacetime/cli.py registers them."""
    app = typer.Typer()
    app.command("submit", context_settings=SUBMIT_CONTEXT_SETTINGS)(submit_command)
    app.add_typer(jobs_app, name="jobs")
    return app


def test_cli_submit_wait_exit_status_and_jobs_commands(head, job_dir):
    runner, app, addr = CliRunner(), cli(), ["--address", head.address]

    ok = runner.invoke(app, ["submit", *addr, "--wait", "--poll", "0.5", "--working-dir", str(job_dir),
                             "--", "python", "-c", "import hello; print(hello.GREETING)"])
    assert ok.exit_code == 0, ok.output
    job_id = ok.stdout.strip()
    assert job_id.startswith("raysubmit_")

    # No `--` this time: the entrypoint's own options (-c) still reach the entrypoint.
    bad = runner.invoke(app, ["submit", *addr, "--wait", "--poll", "0.5", "--working-dir", str(job_dir),
                              "python", "-c", "import sys; print('bye'); sys.exit(3)"])
    assert bad.exit_code == 1
    assert "FAILED" in bad.stderr and "bye" in bad.stderr

    status = runner.invoke(app, ["jobs", "status", job_id, *addr])
    assert status.exit_code == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    logs = runner.invoke(app, ["jobs", "logs", job_id, *addr])
    assert "hello from job" in logs.stdout
    followed = runner.invoke(app, ["jobs", "logs", job_id, "--follow", *addr])
    assert followed.exit_code == 0 and "hello from job" in followed.stdout
    listed = runner.invoke(app, ["jobs", "list", *addr])
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout


def test_cli_stop_ends_a_running_job(head, job_dir, monkeypatch):
    runner, app = CliRunner(), cli()
    monkeypatch.setenv("RAY_ADDRESS", head.address)  # --address defaults to $RAY_ADDRESS
    started = runner.invoke(app, ["submit", "--working-dir", str(job_dir), "--",
                                  "python", "-c", "import time; print('sleeping'); time.sleep(120)"])
    assert started.exit_code == 0, started.output
    job_id = started.stdout.strip()
    client = job_client(head.address)
    deadline = time.monotonic() + 60
    while client.get_job_status(job_id) != JobStatus.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    stopped = runner.invoke(app, ["jobs", "stop", job_id])
    assert stopped.exit_code == 0 and f"stopping {job_id}" in stopped.stdout
    assert wait_for_job(head.address, job_id, poll_s=0.5, timeout_s=60, progress=None) == JobStatus.STOPPED


@pytest.mark.parametrize("address", [
    "http://127.0.0.1:9",      # discard port: nothing listens
    "http://127.0.0.1:99999",  # no such port: requests' InvalidURL was a traceback
    "no-port",                 # no http://, so Ray parses a GCS address: its ValueError was a traceback
    "htp://127.0.0.1:8265",    # a typo'd scheme: Ray's RuntimeError was a traceback
])
def test_cli_says_when_the_cluster_is_unreachable(address):
    result = CliRunner().invoke(cli(), ["jobs", "list", "--address", address])
    assert result.exit_code == 2 and "cannot reach" in result.stderr, (result.output, result.exception)
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_requests_the_job_server_refuses_are_one_line_errors(head, job_dir):
    """An unknown job id or a --job-id already taken: one error line and exit status 2, not a traceback."""
    runner, app, addr = CliRunner(), cli(), ["--address", head.address]
    for cmd in (["jobs", "status"], ["jobs", "logs"], ["jobs", "logs", "--follow"], ["jobs", "stop"]):
        r = runner.invoke(app, [*cmd, "raysubmit_nope", *addr])
        assert r.exit_code == 2 and "raysubmit_nope does not exist" in r.stderr, (cmd, r.output, r.exception)
    submit_taken = ["submit", *addr, "--job-id", "taken", "--working-dir", str(job_dir), "--", "python", "-c", "1"]
    assert runner.invoke(app, submit_taken).exit_code == 0
    again = runner.invoke(app, submit_taken)
    assert again.exit_code == 2 and "taken already exists" in again.stderr, (again.output, again.exception)
