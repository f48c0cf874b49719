"""Crash-point runner for tests/test_crash_points.py: kill a pkd command at many points, resume it, compare.

Run as ``python tests/_crash.py JOB.json RESULT.json``. It imports pkd's two CLIs once, then forks one child per
launch (no interpreter or torch start-up per kill point) and runs two kill points at a time. Kill points are
of two kinds: ``commit N`` (the child SIGKILLs itself right after its N-th durable write: ``PKD_CRASH_AT``,
``pkd.common.durable``) and ``time T`` (the parent SIGKILLs it T seconds after the fork, mid-write or
mid-step). After the kill the command is rerun as a user would, following its messages (``--resume``; then
``--overwrite`` or the plain command when the message says so), until it exits 0; then every output file is
digested (in a forked child too: the parent never starts zarr's or torch's threads) and compared with the
uninterrupted run's.

JOB: {"app": "prep"|"train", "argv": [...], "resume": [...flags of a rerun...], "outputs": [relative paths],
"work": dir, "commits": how many commit points, "times": how many time points, "points": the least in all
(more time points make it up), "timing_keys": [...]}.
RESULT: {"clean": {...}, "points": [{"point", "killed", "launches", "reruns", "identical", "content", "diffs"}]}.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Generator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two children at a time on two cores

from pkd.common.cli import run_app  # noqa: E402
from pkd.common.durable import CRASH_AT, CRASH_DELAY, CRASH_LOG  # noqa: E402
from pkd.preprocess.cli import app as prep_app  # noqa: E402
from pkd.train.cli import app as train_app  # noqa: E402

APPS = {"prep": prep_app, "train": train_app}
SKIP = (".lock",)  # the kernel lock file beside an output


def _child(job: dict[str, Any], argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
    """The forked child: run one CLI launch (or a digest) in ``cwd`` and exit with its code."""
    code = 1
    try:
        os.chdir(cwd)
        os.environ.update(env)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        import torch

        torch.set_num_threads(1)
        if argv[0] == "--digest":
            (cwd / "digest.json").write_text(json.dumps(digest(cwd, job["outputs"], job["timing_keys"])))
            code = 0
        else:
            try:
                run_app(APPS[job["app"]], argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content(path: Path, timing: set[str]) -> Any:
    """What a file means, where its bytes may differ for a known reason: JSON without wall-clock fields, a torch
    checkpoint as the hashes of its tensors and values."""
    if path.suffix in (".json", ".jsonl"):
        text = path.read_text()
        lines = [json.loads(text)] if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x]
        return [_drop(line, timing) for line in lines]
    if path.suffix == ".pt":
        import torch

        return _tensors(torch.load(path, map_location="cpu", weights_only=True))
    return None


def _drop(value: Any, timing: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _drop(v, timing) for k, v in value.items() if k not in timing}
    if isinstance(value, list):
        return [_drop(v, timing) for v in value]
    return value


def _tensors(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        buffer = io.BytesIO()
        buffer.write(str((value.dtype, tuple(value.shape))).encode())
        buffer.write(value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return _hash(buffer.getvalue())
    if isinstance(value, dict):
        return {str(k): _tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors(v) for v in value]
    return value


def digest(cwd: Path, outputs: list[str], timing_keys: list[str]) -> dict[str, Any]:
    """Every file under ``outputs``: its bytes' hash and, for JSON and checkpoints, its content."""
    files: dict[str, Any] = {}
    for out in outputs:
        base = cwd / out
        for path in sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]:
            if path.name.endswith(SKIP) or not path.is_file():
                continue
            rel = str(path.relative_to(cwd))
            files[rel] = {"bytes": _hash(path.read_bytes()), "content": _content(path, set(timing_keys))}
    return files


# ---- launches ------------------------------------------------------------------------------------------------


class Launch:
    """One fork: ``argv`` in ``cwd`` with ``env``, SIGKILLed by the parent after ``kill_after`` seconds if set."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None, kill_after: float | None = None):
        self.argv, self.cwd, self.env, self.kill_after = argv, cwd, env or {}, kill_after


Steps = Generator[Launch, tuple[int, str], dict[str, Any]]


def clean_run(job: dict[str, Any], cwd: Path) -> Steps:
    """The uninterrupted run, listing its commits, then its digest."""
    cwd.mkdir(parents=True)
    start = time.monotonic()
    began = time.time()
    rc, text = yield Launch(job["argv"], cwd, {CRASH_LOG: str(cwd / "commits.txt")})
    seconds = time.monotonic() - start
    assert rc == 0, f"the uninterrupted run failed (exit {rc}):\n{text[-3000:]}"
    rc, text = yield Launch(["--digest"], cwd)
    assert rc == 0, text[-3000:]
    commits, stamps = zip(*(line.split("\t") for line in (cwd / "commits.txt").read_text().splitlines()))
    times = [began, *map(float, stamps), began + seconds]
    return {
        "seconds": seconds,
        "commits": list(commits),
        "gaps": [b - a for a, b in zip(times, times[1:])],  # before commit 1, between commits, after the last
        "digest": json.loads((cwd / "digest.json").read_text()),
    }


def killed_run(job: dict[str, Any], cwd: Path, point: dict[str, Any], clean: dict[str, Any]) -> Steps:
    """Kill at ``point``, rerun as the messages say until it succeeds, digest, compare with ``clean``."""
    cwd.mkdir(parents=True)
    env, kill_after = {CRASH_AT: str(point["at"])}, None
    if point["kind"] == "time" and point["at"] == 0:
        env, kill_after = {}, point["delay"]
    elif point["kind"] == "time":
        env[CRASH_DELAY] = str(point["delay"])
    rc, text = yield Launch(job["argv"], cwd, env, kill_after)
    killed, reruns = rc == -signal.SIGKILL, []
    flags = list(job["resume"])
    while rc != 0 and len(reruns) < 4:
        rc, text = yield Launch(job["argv"] + flags, cwd)
        reruns.append(" ".join(flags) or "(same command)")
        if rc == 2 and "--overwrite" in text and "--resume" in flags:
            flags = ["--overwrite"]
        elif rc == 2 and "drop --resume" in text:
            flags = []
        elif rc != 0:
            break
    result = {**point, "killed": killed, "launches": 1 + len(reruns), "reruns": reruns, "exit": rc}
    if rc != 0:
        return {**result, "identical": False, "content": False, "diffs": [f"rerun exit {rc}: {text[-1500:]}"]}
    rc, text = yield Launch(["--digest"], cwd)
    assert rc == 0, text[-3000:]
    return {**result, **compare(clean["digest"], json.loads((cwd / "digest.json").read_text()))}


def compare(clean: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Byte-identical files, content-identical ones (bytes differ only in wall-clock fields), and the rest."""
    diffs = [f"missing {f}" for f in sorted(set(clean) - set(got))]
    diffs += [f"extra {f}" for f in sorted(set(got) - set(clean))]
    differ_bytes = []
    for name in sorted(set(clean) & set(got)):
        if clean[name]["bytes"] == got[name]["bytes"]:
            continue
        differ_bytes.append(name)
        if clean[name]["content"] is None or clean[name]["content"] != got[name]["content"]:
            diffs.append(f"differs {name}")
    return {
        "identical": not diffs and not differ_bytes,
        "content": not diffs,
        "bytes_differ": differ_bytes,
        "diffs": diffs,
    }


def drive(job: dict[str, Any], tasks: list[Steps], parallel: int = 2) -> list[dict[str, Any]]:
    """Run the generators' launches, ``parallel`` children at a time; returns each generator's result."""
    results: list[dict[str, Any]] = [{} for _ in tasks]
    pending = list(enumerate(tasks))
    running: dict[int, tuple[int, Steps, Launch, float, Path]] = {}

    def start(index: int, gen: Steps, launch: Launch) -> None:
        log = launch.cwd / f"launch-{time.monotonic_ns()}.log"
        pid = os.fork()
        if pid == 0:
            _child(job, launch.argv, launch.cwd, launch.env, log)
        running[pid] = (index, gen, launch, time.monotonic(), log)

    def advance(index: int, gen: Steps, reply: tuple[int, str] | None) -> None:
        try:
            launch = gen.send(reply) if reply is not None else next(gen)
        except StopIteration as stop:
            results[index] = stop.value
            return
        start(index, gen, launch)

    while pending or running:
        while pending and len(running) < parallel:
            advance(*pending.pop(0), None)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for child, (_, _, launch, began, _) in list(running.items()):
                if launch.kill_after is not None and now - began >= launch.kill_after:
                    os.kill(child, signal.SIGKILL)
                    launch.kill_after = None
            time.sleep(0.01)
            continue
        index, gen, launch, _, log = running.pop(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        text = log.read_text(errors="replace")
        log.unlink()
        advance(index, gen, (code, text))
    return results


def spread(count: int, total: int) -> list[int]:
    """``count`` commit numbers spread evenly over 1..total (all of them when there are fewer)."""
    if total <= count:
        return list(range(1, total + 1))
    return sorted({1 + round(i * (total - 1) / (count - 1)) for i in range(count)})


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    work = Path(job["work"])
    (clean,) = drive(job, [clean_run(job, work / "clean")])
    points = [{"kind": "commit", "at": n} for n in spread(job["commits"], len(clean["commits"]))]
    times = max(job["times"], job["points"] - len(points))  # at least job["points"] in all
    gaps = spread(times, len(clean["gaps"]) - 1)  # not the last one: the run would be done
    points += [{"kind": "time", "at": n - 1, "delay": round(clean["gaps"][n - 1] / 2, 3)} for n in gaps]
    tasks = [killed_run(job, work / f"{p['kind']}-{i}", p, clean) for i, p in enumerate(points)]
    results = drive(job, tasks)
    for result in results:
        if result["at"]:
            result["commit"] = clean["commits"][result["at"] - 1]
    summary = {"seconds": clean["seconds"], "commits": clean["commits"], "files": sorted(clean["digest"])}
    Path(result_path).write_text(json.dumps({"clean": summary, "points": results}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
