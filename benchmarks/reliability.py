"""Reliability figures, measured in one run: under faults nothing is lost, duplicated or left behind.

    python benchmarks/reliability.py [--videos 162] [--resume-at 0.9] [--kill-points 5] [--seed 0]

Prints:
1. hostile inputs tried / handled (curated, or rejected with the expected reason)
2. kill points tried / clip sets identical to a clean run: `spacetime curate` SIGKILLed at seeded
   kill points (Ray starting, a source being analysed, clips being transcoded, a source staged, the
   commit just landed), then rerun; and, separately, one of the run's Ray workers SIGKILLed while busy
   (an analysis actor or the embed actor, seeded) as the run goes on: Ray Data restarts the actor and
   retries its task, or the run fails and a rerun finishes it
3. duplicate clip_ids, orphan media files, clip rows whose media is missing, `_staging` or
   `_analysed` left — summed over every dataset root this run wrote
4. resumed run ÷ full run, the run killed --resume-at (0.9) of the way through a full run's wall
   time (target ≤ 0.2): "cold" (both are fresh `spacetime curate` processes, Ray start-up included)
   and "warm" (both in this process, Ray already up, as for a job on a running cluster). Beside each,
   the fixed cost every run pays (a run over one video: Ray start and stop, Ray Data's actors, the
   embed actor's open_clip import and model build) and the ratio beyond it. On a small corpus that
   fixed cost, not redone work, sets the ratio, and the kill lands at a random phase of the embed
   stage's batches (16 clips, ~2 s), so runs spread by several points. Hence 162 videos by default
   (a full run ~170 s on 2 CPUs), where the fixed cost is under a tenth of the run. Measured on
   2 CPUs: 162 videos, killed with 146/162 sources staged: cold 0.156 (fixed 13.4 s), warm 0.121
   (fixed 7.3 s), beyond the fixed cost 0.085 / 0.080. At 54 videos (a 64-66 s full run): killed
   with 45-49 staged, cold 0.25-0.31 (fixed 13-15 s), warm 0.18-0.21; beyond the fixed cost
   0.06-0.11. A resume redoes at most the embed batch in flight: the analysis of sources not yet
   embedded is kept (<root>/_analysed). The line prints how many sources were staged at the kill.

The helpers (launch `spacetime curate` in its own session, find its Ray workers, kill it, audit a
dataset root, the clip set of a clean analysis) are shared with tests/test_reliability.py.
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import store  # noqa: E402


# --- processes --------------------------------------------------------------------------------

def start_curate(sources: list[str], root, log: Optional[Path] = None) -> subprocess.Popen:
    """`spacetime curate SOURCES --dataset ROOT` as a subprocess with its own local Ray, in a new
    session (so every process it starts, Ray's included, can be found and killed by session id)."""
    cmd = [sys.executable, "-m", "spacetime.cli", "curate", *map(str, sources), "--dataset", str(root)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
    finally:
        if log:
            out.close()


def processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, title) from /proc. Ray workers set their title to `ray::...`."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            title = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited while we looked
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session
        out[int(d)] = (int(fields[1]), int(fields[3]), title)
    return out


def ray_workers(driver_pid: int, name: str = "") -> list[tuple[int, str]]:
    """(pid, title) of the Ray worker processes of a run whose driver is `driver_pid`: processes
    titled `ray::<name>...` whose parent is that run's raylet (the raylet is the driver's child)."""
    procs = processes()
    raylets = {p for p, (pp, _, t) in procs.items() if pp == driver_pid and "/raylet" in t.split(" ")[0]}
    return sorted((p, t) for p, (pp, _, t) in procs.items()
                  if pp in raylets and t.startswith("ray::" + name))


def session_alive(sid: int) -> list[int]:
    return [p for p, (_, s, _) in processes().items() if s == sid and p != os.getpid()]


def kill_run(proc: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGKILL the driver (a crash: nothing of it runs again), give the Ray processes it started
    `grace_s` to notice and exit, then SIGKILL whatever of its session is left. Returns how many
    processes had outlived the grace period."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + grace_s
    while time.time() < deadline and session_alive(proc.pid):
        time.sleep(0.25)
    left = session_alive(proc.pid)
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while session_alive(proc.pid) and time.time() < deadline + 10:
        time.sleep(0.1)
    return len(left)


def wait_until(pred: Callable[[], bool], timeout_s: float, proc: Optional[subprocess.Popen] = None,
               poll_s: float = 0.2) -> bool:
    """Poll `pred` until it holds (True) or `timeout_s` passes or `proc` exits (False)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(poll_s)
    return False


def _in_session(proc: subprocess.Popen, program: str) -> bool:
    return any(s == proc.pid and program in Path(t.split(" ")[0]).name for _, s, t in processes().values())


def _analysing(proc: subprocess.Popen) -> bool:
    return any("__init__" not in t for _, t in ray_workers(proc.pid, "MapWorker(FlatMap(AnalyzeSource))"))


# Moments to SIGKILL a curate run at: each waits for a state of the run, then a seeded jitter.
KILL_POINTS: dict[str, Callable] = {
    "transcoding": lambda proc, root: _in_session(proc, "ffmpeg"),    # an ffmpeg child is cutting clips
    "staged": lambda proc, root: staged(root) >= 1,                  # a finished source is on disk
    "analysing": lambda proc, root: _analysing(proc),                # an analysis actor runs a task
    "starting": lambda proc, root: True,                             # Ray still starting up
    "committed": lambda proc, root: store.table_exists(root),        # the commit landed; cleanup pending
}


def kill_at(seed: int) -> tuple[str, float]:
    """Seed -> (kill point, jitter in s): seeds 0..4 cover every point once."""
    name = list(KILL_POINTS)[seed % len(KILL_POINTS)]
    return name, random.Random(seed).uniform(0.0, 5.0 if name == "starting" else 1.0)


def run_and_kill(sources: list[str], root, seed: int, log: Optional[Path] = None, timeout_s: float = 1800) -> dict:
    """Start `spacetime curate`, SIGKILL it at kill point `kill_at(seed)`. Returns what was seen."""
    name, jitter = kill_at(seed)
    proc = start_curate(sources, root, log)
    reached = wait_until(lambda: KILL_POINTS[name](proc, Path(root)), timeout_s, proc, poll_s=0.01)
    time.sleep(jitter)
    finished = proc.poll() is not None
    state = {"point": name, "jitter_s": jitter, "reached": reached, "finished_before_kill": finished,
             "staged": staged(root), "version": store.latest_version(root)}
    state["leftover_processes"] = kill_run(proc)
    return state


WORKERS = ("MapWorker(FlatMap(AnalyzeSource))", "MapWorker(MapBatches(EmbedClips))")


def kill_worker(sources: list[str], root, seed: int, log: Optional[Path] = None, timeout_s: float = 1800) -> dict:
    """Start `spacetime curate`, SIGKILL one of its Ray workers once it is busy (seeded: an analysis
    actor or the embed actor, plus a jitter) and let the run go on; rerun it if it failed."""
    name = WORKERS[seed % len(WORKERS)]
    jitter = random.Random(seed).uniform(0.0, 1.0)
    proc = start_curate(sources, root, log)
    busy = lambda: [p for p, t in ray_workers(proc.pid, name) if t.endswith(".submit")]  # noqa: E731
    reached = wait_until(lambda: bool(busy()), timeout_s, proc, poll_s=0.01)
    time.sleep(jitter)
    victims = busy() if proc.poll() is None else []
    if victims:
        os.kill(victims[0], signal.SIGKILL)
    try:
        rc = proc.wait(timeout=timeout_s)
    finally:
        kill_run(proc, grace_s=5)
    rerun_rc = None if rc == 0 else start_curate(sources, root, log).wait(timeout=timeout_s)
    return {"worker": name, "jitter_s": jitter, "reached": reached, "killed": bool(victims), "rc": rc,
            "rerun_rc": rerun_rc}


def staged(root) -> int:
    """Sources staged (finished, not yet committed) under a dataset root."""
    d = store.staging_dir(root)
    return len(list(d.glob("*.parquet"))) if d.is_dir() else 0


# --- what a dataset root holds ----------------------------------------------------------------

@dataclass
class Audit:
    clip_ids: set = field(default_factory=set)
    duplicates: int = 0          # clip rows beyond the first with the same clip_id (latest version)
    orphans: list = field(default_factory=list)   # files under media/ the latest version does not name
    missing: list = field(default_factory=list)   # clip_uri of a clip row with no file behind it
    bad_frames: list = field(default_factory=list)  # media whose frame count != end - start (if checked)
    staging_left: bool = False
    versions: int = 0

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.orphans or self.missing or self.bad_frames or self.staging_left)


def audit(root, count_frames: bool = False) -> Audit:
    """Check the latest version of `root`'s clips table against the files on disk."""
    root = Path(root)
    a = Audit(staging_left=store.staging_dir(root).exists() or store.analysed_dir(root).exists())
    if not store.table_exists(root):
        a.orphans = sorted(str(p) for p in (root / "media").rglob("*") if p.is_file()) if (root / "media").exists() else []
        return a
    a.versions = store.latest_version(root) + 1
    rows = store.read_clips(root, columns=["clip_id", "clip_uri", "start_frame", "end_frame", "status"]).to_pylist()
    ids = [r["clip_id"] for r in rows if r["clip_id"]]
    a.clip_ids, a.duplicates = set(ids), len(ids) - len(set(ids))
    media = [r for r in rows if r["clip_uri"] and "#frames=" not in r["clip_uri"]]
    named = {r["clip_uri"] for r in media}
    on_disk = {str(p) for p in (root / "media").rglob("*") if p.is_file()} if (root / "media").exists() else set()
    a.orphans = sorted(on_disk - named)
    a.missing = sorted(named - on_disk)
    if count_frames:
        import av

        for r in media:
            if r["clip_uri"] in on_disk:
                try:
                    with av.open(r["clip_uri"]) as c:
                        n = sum(1 for _ in c.decode(video=0))
                except Exception as e:  # a torn file is exactly what this looks for
                    n = f"{type(e).__name__}: {e}"
                if n != r["end_frame"] - r["start_frame"]:
                    a.bad_frames.append((r["clip_uri"], n))
    return a


def reference_clip_ids(sources: list[str]) -> set:
    """The clip_ids a clean run produces for `sources`: the analysis stage run in this process, no
    Ray, `clips: reference` (ids depend on content and frame ranges only, not on transcoding)."""
    from pipeline.graph import AnalyzeSource, Done
    from pipeline.sources import expand_sources
    from pipeline.spec import DatasetSpec

    srcs = expand_sources(sources)
    spec = DatasetSpec.model_validate({"clips": {"mode": "reference"}}).model_dump(mode="json")
    with tempfile.TemporaryDirectory() as tmp:
        stage = AnalyzeSource(tmp, spec, [(s.uri, s.reject) for s in srcs], Done())
        return {r["clip_id"] for i in range(len(srcs)) for r in stage({"i": i}) if r["clip_id"]}


# --- the figures ------------------------------------------------------------------------------

def hostile_figure(work: Path) -> tuple[int, int, list]:
    """Curate the hostile corpus (in this process; Ray must be up): (tried, handled, problems)."""
    from pipeline.graph import curate, display_uri
    from pipeline.spec import DatasetSpec
    from tests.hostile import make_hostile_corpus

    cases = make_hostile_corpus(work / "corpus")
    croot = work / "corpus" / "root"
    probe_cases = [c for c in cases if c.stage == "probe" and c.path and c.kind != "directory"]
    curate([c.path for c in probe_cases] + [str(croot / "manifest.txt"), str(croot / "escape_link.mp4")],
           str(work / "ds_hostile"), DatasetSpec())
    rows: dict[str, list] = {}
    for r in store.read_clips(work / "ds_hostile").to_pylist():
        rows.setdefault(r["source_uri"], []).append(r)
    problems = []
    for c in probe_cases:
        got = rows.get(display_uri(os.path.abspath(c.path)), [])
        if c.expect == "rejected":
            ok = len(got) == 1 and got[0]["status"] == "rejected" and (
                not c.reason_contains or c.reason_contains in (got[0]["reason"] or ""))
        else:  # curated: clips, or a row naming the byte-identical file that holds them
            ok = bool(got) and all((g["clip_id"] and g["status"] != "rejected")
                                   or (g["reason"] or "").startswith("identical content to ") for g in got)
        if not ok:
            problems.append(f"{c.kind}: {[(g['status'], g['reason']) for g in got] or 'no row'}")
    escapes = sum(1 for rs in rows.values() for r in rs if "escapes its root" in (r["reason"] or ""))
    tried = len(probe_cases) + 2   # + the escaping manifest entries and the escaping symlink
    handled = len(probe_cases) - len(problems) + min(2, escapes)
    return tried, handled, problems


def kill_points(src: Path, work: Path, n: int, seed: int, reference: set) -> list[dict]:
    """Kill `spacetime curate` at n seeded kill points (one dataset root each), rerun each."""
    out = []
    for k in range(n):
        root = work / f"ds_kill_{k}"
        state = run_and_kill([str(src)], root, seed + k, work / f"kill_{k}.log")
        rc = start_curate([str(src)], root, work / f"kill_{k}.log").wait(timeout=1800)
        a = audit(root)
        out.append({**state, "rerun_rc": rc, "identical": a.clip_ids == reference, "audit": a})
    return out


def worker_kills(src: Path, work: Path, n: int, seed: int, reference: set) -> list[dict]:
    """Kill one busy Ray worker of n seeded runs (one dataset root each); audit each when it is done."""
    out = []
    for k in range(n):
        root = work / f"ds_worker_{k}"
        state = kill_worker([str(src)], root, seed + k, work / f"worker_{k}.log")
        a = audit(root, count_frames=True)  # a killed worker's ffmpeg child may race the retried task
        out.append({**state, "identical": a.clip_ids == reference and not a.bad_frames, "audit": a})
    return out


def resume_ratio(src: Path, work: Path, frac: float = 0.9) -> dict:
    """Full run vs the resume of a run killed `frac` of the way through (of the full run's wall time);
    cold (fresh CLI processes) and warm (this process, Ray up). Returns the timings, the audits and
    the ratios."""
    import ray

    from pipeline.graph import curate
    from pipeline.spec import DatasetSpec

    t = time.perf_counter()
    full = start_curate([str(src)], work / "ds_full_cold", work / "full_cold.log")
    assert full.wait() == 0, "clean run failed: see full_cold.log"
    full_cold = time.perf_counter() - t

    killed = work / "ds_resume_cold"
    proc = start_curate([str(src)], killed, work / "killed.log")
    ended = wait_until(lambda: False, frac * full_cold, proc)  # False: the run lived to the kill time
    at_kill = staged(killed)
    kill_run(proc)
    assert not ended and not store.table_exists(killed), "run committed before the kill: lower --resume-at"
    shutil.copytree(killed, work / "ds_resume_warm")  # the same killed state, resumed warm below

    t = time.perf_counter()
    assert start_curate([str(src)], killed, work / "resume_cold.log").wait() == 0
    resume_cold = time.perf_counter() - t

    # The fixed cost of any run, resumed or not: a cold run over one video (its own work included).
    one = sorted(src.glob("*.mp4"))[:1]
    t = time.perf_counter()
    assert start_curate([str(one[0])], work / "ds_one_cold", work / "one_cold.log").wait() == 0
    one_cold = time.perf_counter() - t

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_init = time.perf_counter() - t
    t = time.perf_counter()
    curate([str(src)], str(work / "ds_full_warm"), DatasetSpec())
    full_warm = time.perf_counter() - t
    t = time.perf_counter()
    curate([str(src)], str(work / "ds_resume_warm"), DatasetSpec())
    resume_warm = time.perf_counter() - t
    t = time.perf_counter()
    curate([str(one[0])], str(work / "ds_one_warm"), DatasetSpec())
    one_warm = time.perf_counter() - t
    return {"staged_at_kill": at_kill, "full_cold": full_cold, "resume_cold": resume_cold, "ray_init": ray_init,
            "full_warm": full_warm, "resume_warm": resume_warm, "one_cold": one_cold, "one_warm": one_warm,
            "audits": {n: audit(work / n) for n in ("ds_full_cold", "ds_resume_cold", "ds_full_warm", "ds_resume_warm")}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=162, help="demo videos for the resume ratio (~170 s a full run on 2 CPUs)")
    ap.add_argument("--resume-at", type=float, default=0.9,
                    help="kill the run to resume this fraction of the way through (of a full run's wall time)")
    ap.add_argument("--kill-videos", type=int, default=3, help="demo videos for each kill point")
    ap.add_argument("--kill-points", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    from pipeline.synthetic import generate_footage

    work = Path(tempfile.mkdtemp(prefix="spacetime_reliability_"))
    try:
        src_big, src_small = work / "footage_big", work / "footage_small"
        generate_footage(src_big, seed=args.seed, videos=args.videos)
        generate_footage(src_small, seed=args.seed + 1, videos=args.kill_videos)

        reference = reference_clip_ids([str(src_small)])
        kills = kill_points(src_small, work, args.kill_points, args.seed, reference)
        wkills = worker_kills(src_small, work, args.kill_points, args.seed, reference)
        r = resume_ratio(src_big, work, args.resume_at)
        tried, handled, problems = hostile_figure(work)  # Ray is up from resume_ratio

        audits = [k["audit"] for k in kills + wkills] + list(r["audits"].values())
        same = r["audits"]["ds_full_cold"].clip_ids
        resumed_identical = all(a.clip_ids == same for a in r["audits"].values())
        print(f"\nreliability figures (work dir {work}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
        print(f"1. hostile inputs tried / handled:            {tried} / {handled}")
        for p in problems:
            print(f"     not handled: {p}")
        print(f"2. kill points tried / clip sets identical:   {len(kills)} / {sum(k['identical'] for k in kills)}"
              f"   (+ the resume kill: {'identical' if resumed_identical else 'DIFFERENT'})")
        for k in kills:
            when = "after the run finished" if k["finished_before_kill"] else f"{k['staged']} staged, version {k['version']}"
            print(f"     kill at '{k['point']}' +{k['jitter_s']:.1f} s ({when}; {k['leftover_processes']} Ray processes "
                  f"outlived the driver 10 s): rerun exit {k['rerun_rc']}, {len(k['audit'].clip_ids)} clips, "
                  f"identical={k['identical']}")
        print(f"   Ray workers killed / clip sets identical:  {sum(w['killed'] for w in wkills)} / "
              f"{sum(w['identical'] for w in wkills)}")
        for w in wkills:
            how = "finished" if w["rc"] == 0 else f"failed (exit {w['rc']}), rerun exit {w['rerun_rc']}"
            print(f"     {w['worker']} {'killed' if w['killed'] else 'NOT killed (never seen busy)'} "
                  f"+{w['jitter_s']:.1f} s: run {how}, {len(w['audit'].clip_ids)} clips, identical={w['identical']}")
        print(f"3. over {len(audits)} dataset roots: duplicate clip_ids {sum(a.duplicates for a in audits)}, "
              f"orphan files {sum(len(a.orphans) for a in audits)}, missing media {sum(len(a.missing) for a in audits)}, "
              f"staging left {sum(a.staging_left for a in audits)}")
        print(f"4. resume of a run killed {args.resume_at:.0%} of the way through ({r['staged_at_kill']}/{args.videos} "
              f"sources staged) ÷ full run (target ≤ 0.2):")
        for kind, how in (("cold", "fresh CLI processes, Ray start-up included"), ("warm", "one process, Ray already up")):
            full, resumed, one = r[f"full_{kind}"], r[f"resume_{kind}"], r[f"one_{kind}"]
            print(f"     {kind} ({how}): {resumed / full:.3f}   ({resumed:.1f} s ÷ {full:.1f} s); the fixed cost, a "
                  f"{kind} run over one video: {one:.1f} s; beyond it, resume ÷ full {(resumed - one) / (full - one):.3f}")
        print(f"     Ray start-up ÷ warm full run: {r['ray_init'] / r['full_warm']:.3f}; "
              f"warm full ÷ cold full: {r['full_warm'] / r['full_cold']:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
