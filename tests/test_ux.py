"""A new user's first afternoon: split messages, early refusals, prep parameters, logs and progress, depth scale."""

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from pkd.common import logs, store
from pkd.common.errors import ConfigError, DataError, StoreError
from pkd.common.geometry import derive_seed
from pkd.preprocess import prep as prep_module
from pkd.preprocess.frame_sample import GeometryConfig, make_sample
from pkd.preprocess.prep import RunOptions, run_prep
from pkd.preprocess.scenes import find_scenes, open_scene
from pkd.preprocess.teacher import TeacherConfig

from _cli import flags, run_script
from conftest import demo_prep_config


@pytest.fixture
def restore_logging():
    """Undo logs.configure (it replaces the root handlers) after the test."""
    root, pkd = logging.getLogger(), logging.getLogger("pkd")
    saved = root.handlers[:], root.level, pkd.level, logs._settings.progress
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    pkd.setLevel(saved[2])
    logs._settings.progress = saved[3]


def test_a_split_that_selects_no_scene_names_the_splits_found(scannet_scene):
    root = scannet_scene.parents[1]  # the sample tree: scans_test/scene0707_00
    assert [e.split for e in find_scenes(root)] == ["test"]
    with pytest.raises(DataError, match=r"in split 'train'; the scenes there fall in test: 1 scene \(scene0707_00\)"):
        find_scenes(root, split="train")


def test_a_store_without_the_split_names_its_splits_and_the_option(demo_store):
    expected = r"no split 'test'; it holds train \(5 samples\)\. Pass --split .*--split train"
    with pytest.raises(StoreError, match=expected):
        store.open_split(demo_store, "test")


def test_other_arguments_are_refused_before_the_teacher_is_built(demo_root, demo_store, monkeypatch):
    monkeypatch.setattr(prep_module, "build_teacher", lambda cfg: pytest.fail("the teacher was built"))
    quiet = RunOptions(progress=False)
    with pytest.raises(ConfigError, match="teacher.seed: 0 -> 1"):
        run_prep(demo_prep_config(demo_root), str(demo_store), TeacherConfig(kind="random", seed=1), quiet)
    with pytest.raises(ConfigError, match="frame_skip: 25 -> 10"):
        run_prep(demo_prep_config(demo_root, frame_skip=10), str(demo_store), TeacherConfig(kind="random"), quiet)


def test_info_shows_the_prep_parameters(demo_store):
    out = run_script("pkd-prep", "info", demo_store)
    assert out.returncode == 0, out.stderr
    assert "frame skip 25, limit None, 1024 points (fps), depth 0.1-10.0 m" in out.stdout


def test_an_unwritable_log_file_is_a_usage_error(demo_store, tmp_path):
    (tmp_path / "file").write_text("")
    out = run_script("pkd-prep", "--log-file", tmp_path / "file" / "log.txt", "info", demo_store)
    assert out.returncode == 2
    assert "cannot write the log file" in out.stderr and "Traceback" not in out.stderr


def test_progress_off_a_terminal_is_a_few_log_lines(tmp_path, restore_logging):
    log_file = tmp_path / "run.log"
    logs.configure(log_file=log_file)
    with logs.progress_bar(total=50, desc="stage x", unit="item") as bar:
        for _ in range(50):
            bar.update()
            bar.set_postfix(loss="1.0")  # forces a refresh: must not add a line per step
    lines = [line for line in log_file.read_text().splitlines() if "pkd.progress" in line]
    assert len(lines) == 2
    assert "stage x:   0%" in lines[0] and "0/50" in lines[0]
    assert "stage x: 100%" in lines[1] and "50/50" in lines[1] and "loss=1.0" in lines[1]
    logs.configure(progress=False, log_file=log_file)
    for _ in logs.progress_bar(range(3), desc="stage y"):
        pass
    assert "stage y" not in log_file.read_text()


def test_expected_library_warnings_go_to_debug(tmp_path, restore_logging, capfd):
    log_file = tmp_path / "run.log"
    logs.configure(log_file=log_file)
    with logs.demoted("", "No pretrained weights loaded"):
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    logging.warning("something else")
    logging.getLogger("pkd.test").info("pkd's own line")
    text = log_file.read_text()
    assert "DEBUG root: No pretrained weights loaded" in text and "WARNING root: something else" in text
    console = capfd.readouterr().err
    assert "No pretrained" not in console
    assert "WARNING root: something else" in console and "pkd's own line" in console


def test_piped_pkd_train_prints_lines_and_writes_the_log_file(demo_store, tmp_path):
    log_file = tmp_path / "train.log"
    out = run_script(
        "pkd-train",
        *flags(log_file=log_file),
        "distill",
        demo_store,
        *flags(run_dir=tmp_path / "run", device="cpu", max_steps=1, batch_size=2, num_points=256),
        *flags(num_group=8, group_size=8, dim=32, depth=1, heads=2),
    )
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr
    assert "train distill: 100%" in out.stderr
    assert "INFO pkd.progress: train distill: 100%" in log_file.read_text()


def _exported_scene(sevenscenes: Path, folder: Path, depth_per_metre: int, frames: range) -> Path:
    """7-Scenes frames in the exported layout, depth re-encoded at ``depth_per_metre`` units per metre."""
    for part in ("color", "depth", "pose", "intrinsic"):
        (folder / part).mkdir(parents=True)
    for i in frames:
        stem = sevenscenes / f"frame-{i:06d}"
        shutil.copy(f"{stem}.color.jpg", folder / "color" / f"{i}.jpg")
        shutil.copy(f"{stem}.pose.txt", folder / "pose" / f"{i}.txt")
        millimetres = cv2.imread(f"{stem}.depth.png", cv2.IMREAD_UNCHANGED).astype(np.uint32)
        cv2.imwrite(str(folder / "depth" / f"{i}.png"), (millimetres * depth_per_metre // 1000).astype(np.uint16))
    for name in ("intrinsic_color.txt", "intrinsic_depth.txt"):  # 3x3, as 7-Scenes ships it
        shutil.copy(sevenscenes / "camera-intrinsics.txt", folder / "intrinsic" / name)
    return folder


def _points(entry, frame: int) -> np.ndarray:
    with open_scene(entry) as reader:
        (raw,) = reader.read([frame])
        return make_sample(raw, reader.camera, GeometryConfig(num_points=1024, min_valid_pixels=1024), 7).points


def _median_depth(points: np.ndarray, pose: np.ndarray) -> float:
    """Median distance of world points along the camera's viewing axis."""
    return float(np.median((points - pose[:3, 3]) @ pose[:3, 2]))


def test_depth_scale_reads_frames_from_another_sensor(sevenscenes, tmp_path):
    mm = _exported_scene(sevenscenes, tmp_path / "mm" / "kitchen", 1000, range(3))
    tum = _exported_scene(sevenscenes, tmp_path / "tum" / "kitchen", 5000, range(3))  # TUM RGB-D units
    (reference,) = find_scenes(mm)
    (scaled,) = find_scenes(tum, depth_scale=5000)
    (unscaled,) = find_scenes(tum)
    np.testing.assert_allclose(_points(scaled, 2), _points(reference, 2), atol=1e-5)
    with open_scene(unscaled) as reader:  # read as millimetres, the same depth PNG lies 5x farther away
        (raw,) = reader.read([2])
        far = make_sample(raw, reader.camera, GeometryConfig(num_points=1024, min_valid_pixels=1024, max_depth=100), 7)
    ratio = _median_depth(far.points, far.pose) / _median_depth(_points(reference, 2), far.pose)
    assert 4.5 < ratio < 5.5

    out = tmp_path / "pairs.zarr"
    result = run_script(
        "pkd-prep",
        "--no-progress",
        "scannet",
        *flags(root=tum, out=out, teacher="random", frame_skip=1, num_points=1024, depth_scale=5000, teacher_batch=3),
    )
    assert result.returncode == 0, result.stderr
    assert "scenes under" in result.stderr and "train: 1 scene (kitchen)" in result.stderr
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["prep"]["depth_scale"] == 5000
    assert group["train"]["valid"][:].all()
    # the store's seed for a sample derives from (seed, scene, frame): recompute frame 1 the same way
    with open_scene(reference) as reader:
        (raw,) = reader.read([1])
        expected = make_sample(
            raw, reader.camera, GeometryConfig(num_points=1024, min_valid_pixels=1024), derive_seed(0, "kitchen", 1)
        ).points
    np.testing.assert_allclose(group["train"]["points"][1], expected, atol=1e-5)


def test_depth_scale_is_refused_for_sens_files(demo_root):
    with pytest.raises(DataError, match="records its own depth scale; pass --source exported"):
        find_scenes(demo_root, depth_scale=5000)
    assert {e.kind for e in find_scenes(demo_root, source="exported", depth_scale=5000)} == {"exported"}
    out = run_script(
        "pkd-prep", "scannet", *flags(root=demo_root, out=demo_root / "x.zarr", teacher="random", depth_scale=0)
    )
    assert out.returncode == 2 and "--depth-scale must be positive" in out.stderr and "Traceback" not in out.stderr
    assert not (demo_root / "x.zarr").exists()


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_scalars_of_metrics_jsonl_also_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional extra pkd[tensorboard] is not installed")
    from pkd.train.model import StudentConfig
    from pkd.train.trainer import TrainConfig, train

    from store_factory import make_store

    store_path = make_store(tmp_path / "pairs.zarr", n=8, num_points=128, shard_size=4)
    model = StudentConfig(
        num_points=128, num_group=8, group_size=8, dim=32, depth=1, heads=2, num_concepts=4, head_hidden=32
    )
    cfg = TrainConfig(
        store=str(store_path), model=model, epochs=2, warmup_epochs=1, batch_size=4, max_steps=4, device="cpu"
    )
    run = tmp_path / "run"
    train(TrainConfig(**{**cfg.__dict__, "stop_after": 3}), run, progress=False, tensorboard=True)
    train(cfg, run, resume=True, progress=False, tensorboard=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("kind", "step"):
                expected.setdefault(f"{record['kind']}/{key}", []).append((record["step"], value))
    scalars = _scalars(run / "tensorboard")
    assert set(scalars) == set(expected) and "step/loss" in scalars and "epoch/loss" in scalars
    for tag, values in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in values], tag
        np.testing.assert_allclose([v for _, v in scalars[tag]], [v for _, v in values], rtol=1e-6, err_msg=tag)


def test_show_draws_the_points_from_the_camera_with_equal_axes(demo_store):
    import matplotlib.pyplot as plt

    from pkd.preprocess.show import camera_points, draw_points, load_sample

    sample = load_sample(str(demo_store), "train", 2)
    cam = camera_points(sample)
    assert (cam[:, 2] >= 0.1 - 1e-4).all() and (cam[:, 2] <= 10.0 + 1e-4).all()  # the prep depth range, in front
    np.testing.assert_allclose(
        np.linalg.norm(cam, axis=1), np.linalg.norm(sample.points - sample.pose[:3, 3], axis=1), rtol=1e-5
    )
    fig = plt.figure()
    ax = fig.add_subplot(projection="3d")
    draw_points(ax, sample)
    spans = [np.ptp(limits) for limits in (ax.get_xlim3d(), ax.get_ylim3d(), ax.get_zlim3d())]
    np.testing.assert_allclose(spans, spans[0])
    assert (ax.azim, ax.elev) == (-90, 12)  # looking forward from behind the camera
    outside, inside, camera = (len(c._offsets3d[0]) for c in ax.collections)
    assert (outside, inside, camera) == (int((~sample.in_view).sum()), int(sample.in_view.sum()), 1)
    assert outside > 0 and inside > 0
    plt.close(fig)


def test_the_readme_snippet_reads_a_store(demo_store):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Reading the store") :]
    code = section[
        section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))
    ]
    assert 'path = "pairs.zarr"\n' in code
    namespace: dict = {}
    exec(code.replace('path = "pairs.zarr"', f"path = {str(demo_store)!r}"), namespace)
    group = zarr.open_group(str(demo_store), mode="r")["train"]
    valid = group["valid"][:]
    np.testing.assert_allclose(
        namespace["mean_prefix"], group["prefix"][:][valid].astype(np.float32).mean(0), rtol=1e-5, atol=1e-6
    )
    assert namespace["points"].shape == (1024, 3) and namespace["scene"] == "scene9000_00"
