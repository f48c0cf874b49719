"""One exit-code test per console command, through the installed scripts in a subprocess (tests/_cli.py).

Each command's case runs it with a bad input (exit 2, one ``error:`` paragraph naming the input, nothing
written), and, where that is quick, with good input (exit 0, its output there), and a fault during the work
(exit 1). The commands come from the two typer apps, so a new command without a case here fails the test.
README "Reliability" lists the codes; Ctrl-C (130) and SIGTERM (143) are tested in tests/test_exit_codes.py
for prep and distill and here for fine-tuning.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zarr
from test_exit_codes import INTERRUPTED, TINY, check, unwritable, wait_for

from _cli import flags, script
from _cli import run_command as run

PREP, TRAIN = script("pkd-prep"), script("pkd-train")


def command_names() -> set[str]:
    """Every ``pkd-prep X`` and ``pkd-train X [Y]`` command, from the typer apps themselves."""
    from typer.main import get_group

    from pkd.preprocess.cli import app as prep_app
    from pkd.train.cli import app as train_app

    names = set()
    for script_name, app in (("pkd-prep", prep_app), ("pkd-train", train_app)):
        group = get_group(app)
        for name, command in group.commands.items():
            subs = getattr(command, "commands", None)
            names |= {f"{script_name} {name} {s}" for s in subs} if subs else {f"{script_name} {name}"}
    return names


@pytest.fixture(scope="module")
def trained(demo_store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    check(run(TRAIN, "distill", demo_store, *TINY, "--max-steps", 1, "--run-dir", run_dir), 0)
    return run_dir


def nothing_new(tmp_path: Path, before: set[Path]) -> None:
    assert set(tmp_path.rglob("*")) == before, sorted(set(tmp_path.rglob("*")) - before)


def bad(tmp_path: Path, *command: object, message: str) -> None:
    """``command`` exits 2 naming ``message`` and writes nothing under ``tmp_path``."""
    before = set(tmp_path.rglob("*"))
    check(run(*command, cwd=tmp_path), 2, "error:", message)
    nothing_new(tmp_path, before)


# ---- pkd-prep ------------------------------------------------------------------------------------------------


def prep_scannet(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "scannet", "--root", tmp_path / "none", "--out", "p.zarr", message="none")
    bad(tmp_path, PREP, "scannet", "--root", demo_root, "--out", "p.zarr", "--limit", 0, message="--limit")
    # exit 0 with the store complete, 130 on Ctrl-C and 1 for an unwritable store: tests/test_exit_codes.py


def prep_demo_scene(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "demo-scene", "--out", "d", "--layout", "mesh", message="--layout")
    check(run(PREP, "demo-scene", "--out", tmp_path / "d", "--frames", 30, "--layout", "exported"), 0, "wrote")
    assert (tmp_path / "d" / "splits").is_dir()


def prep_scannet_seg(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "scannet-seg", "--root", tmp_path / "none", "--out", "seg.zarr", message="none")
    from test_scannet_seg import demo_tree

    tree = demo_tree(tmp_path / "tree")
    done = run(PREP, "scannet-seg", "--root", tree, "--out", tmp_path / "seg.zarr", "--splits", tree / "splits")
    check(done, 0, "1 scenes written")
    check(run(PREP, "verify", tmp_path / "seg.zarr"), 0, "OK")
    chunk = next(p for p in (tmp_path / "seg.zarr").rglob("c/*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 0xFF]))
    check(run(PREP, "verify", tmp_path / "seg.zarr"), 1, "FAULT", "unreadable")


def prep_info(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "info", "missing.zarr", message="no pair store at missing.zarr")
    check(run(PREP, "info", demo_store, "--json"), 0)


def prep_verify(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "verify", "missing.zarr", message="no pair store at missing.zarr")
    check(run(PREP, "verify", demo_store), 0, "OK")
    # exit 1 for a corrupt chunk, a missing file, bad stats: tests/test_exit_codes.py


def prep_upgrade(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "upgrade", "missing.zarr", message="no pair store at missing.zarr")
    shutil.copytree(demo_store, tmp_path / "p.zarr")
    check(run(PREP, "upgrade", tmp_path / "p.zarr"), 0, "already version")


def prep_teacher(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "teacher", "missing.zarr", "--teacher", "random", message="missing.zarr: create one")
    shutil.copytree(demo_store, tmp_path / "p.zarr")
    before = set(tmp_path.rglob("*"))
    done = run(PREP, "teacher", tmp_path / "p.zarr", "--weights-dir", tmp_path / "none", cwd=tmp_path)
    check(done, 2, "error:", "none")
    nothing_new(tmp_path, before)


def prep_show(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "show", demo_store, "--index", 99, "--out", "s.png", message="99")
    check(run(PREP, "show", demo_store, "--out", tmp_path / "s.png"), 0, "wrote")
    assert (tmp_path / "s.png").stat().st_size > 0


def prep_caption(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "caption", demo_store, "--clipcap-weights", "none.pt", "--tokenizer", "tok", message="tok")


def prep_ply(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, PREP, "ply", demo_store, "--index", 99, "--out", "s.ply", message="99")
    check(run(PREP, "ply", demo_store, "--out", tmp_path / "s.ply"), 0, "wrote")
    assert (tmp_path / "s.ply").read_bytes().startswith(b"ply")


# ---- pkd-train -----------------------------------------------------------------------------------------------


def train_distill(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, TRAIN, "distill", "missing.zarr", *TINY, "--run-dir", "run", message="missing.zarr")
    bad(tmp_path, TRAIN, "distill", demo_store, *TINY, "--run-dir", "run", "--init", "none.pth", message="none.pth")
    check(run(TRAIN, "distill", demo_store, *TINY, "--max-steps", 1, "--run-dir", tmp_path / "run"), 0)
    assert (tmp_path / "run" / "last.pt").is_file()
    # 130 / 143 and 1 for an unwritable checkpoint: tests/test_exit_codes.py


def train_ablate(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, TRAIN, "ablate", "missing.zarr", *TINY, "--eval", "none", "--name", "a", message="missing.zarr")


def train_export(tmp_path, demo_root, demo_store, trained):
    bad(tmp_path, TRAIN, "export", tmp_path / "norun", "--out", "e.pth", message="norun")
    check(run(TRAIN, "export", trained, "--out", tmp_path / "e.pth"), 0)
    assert (tmp_path / "e.pth").is_file()
    check(run(TRAIN, "export", trained, "--out", unwritable(tmp_path) / "e.pth"), 1, "cannot write")


def train_compare(tmp_path, demo_root, demo_store, trained):
    (tmp_path / "empty").mkdir()
    bad(tmp_path, TRAIN, "compare", tmp_path / "empty", "--out", "t.md", message="no pkd-results/1 results")
    # exit 0 with a table: tests/test_benchmarks.py


def train_finetune(name: str) -> Callable[..., None]:
    def case(tmp_path, demo_root, demo_store, trained):
        (tmp_path / "empty").mkdir()
        data = ["--fold-files", tmp_path / "empty"] if name == "fewshot" else ["--data", tmp_path / "empty"]
        bad(tmp_path, TRAIN, "finetune", name, *data, "--init", "scratch", "--run-dir", "r", message="empty")

    return case


def train_test(name: str) -> Callable[..., None]:
    def case(tmp_path, demo_root, demo_store, trained):
        bad(tmp_path, TRAIN, "test", name, tmp_path / "norun", message="norun")

    return case


def train_probe(name: str) -> Callable[..., None]:
    def case(tmp_path, demo_root, demo_store, trained):
        (tmp_path / "empty").mkdir()
        bad(tmp_path, TRAIN, "probe", name, "--data", tmp_path / "empty", "--init", trained, message="empty")

    return case


def cases() -> dict[str, Callable[..., None]]:
    table: dict[str, Callable[..., None]] = {}
    for name in command_names():
        parts = name.split()
        fn = globals().get(f"{parts[0][4:]}_{parts[1].replace('-', '_')}")
        if len(parts) == 3:
            fn = {"finetune": train_finetune, "test": train_test, "probe": train_probe}[parts[1]](parts[2])
        if fn is not None:
            table[name] = fn
    return table


def test_every_command_has_an_exit_code_case():
    assert command_names() == set(cases()), sorted(command_names() - set(cases()))


@pytest.mark.parametrize("command", sorted(cases()))
def test_exit_codes(command, tmp_path, demo_root, demo_store, trained):
    cases()[command](tmp_path, demo_root, demo_store, trained)


def test_ctrl_c_during_finetuning_exits_130_and_resumes(tmp_path):
    from test_scannet_seg import demo_tree

    tree = demo_tree(tmp_path / "tree")
    args = [TRAIN, "finetune", "scannet-seg", "--data", tree, "--splits", tree / "splits", "--init", "scratch"]
    args += flags(epochs=1000, repeats=2, batch_size=2, num_points=256, num_group=16, group_size=8, dim=32, depth=3)
    args += ["--heads", 2, "--device", "cpu", "--cache-dir", tmp_path / "cache", "--run-dir", tmp_path / "run"]
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "run" / "last.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    check(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130, INTERRUPTED)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps and zarr.open_group(str(tmp_path / "cache" / "scannet_seg.zarr"), mode="r") is not None
    done = run(*args[:-2], "--run-dir", tmp_path / "run", "--resume", "--max-steps", max(steps) + 1)
    check(done, 0)
