"""Shared test helpers: where the real-data fixtures live, and skipping cleanly when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# One intra-op thread in this process and every command it starts: float reductions then round alike in a test's
# in-process fixtures and its subprocess runs (the teacher's float16 targets differ by an ulp between 1 and 2
# threads), and the pytest-xdist workers of scripts/test.sh do not contend for the cores.
os.environ["OMP_NUM_THREADS"] = "1"

# Real (licence-restricted, never committed) data beside the checkout: ../shared/fixtures.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def require_fixture(sub: str) -> Path:
    """Path of a real-data fixture under FIXTURES; skips the test with the reason when it is absent."""
    path = FIXTURES / sub
    if not path.exists():
        pytest.skip(f"real-data fixture {path} is absent (stage it under {FIXTURES}, see its README.md)")
    return path


@pytest.fixture
def scannet_scene() -> Path:
    """The 3 real ScanNet v2 frames of scene0707_00 in the exported layout."""
    return require_fixture("scannet_sample/scans_test/scene0707_00")


@pytest.fixture
def sevenscenes() -> Path:
    """300 contiguous real 7-Scenes Kinect frames with poses and intrinsics."""
    return require_fixture("7scenes_seq")


DEMO_POINTS = 1024


def demo_prep_config(root: Path, **changes):
    """A quick prep config for the demo scene: 1024 points, shards of 2 samples."""
    from pkd.preprocess.frame_sample import GeometryConfig
    from pkd.preprocess.prep import PrepConfig

    geometry = GeometryConfig(num_points=DEMO_POINTS, min_valid_pixels=DEMO_POINTS)
    return PrepConfig(**{"root": str(root), "shard_size": 2, "geometry": geometry, **changes})


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A 130-frame synthetic ScanNet scene (both layouts): kept frames 0, 25, 50, 75, 125; 100 is lost."""
    from pkd.preprocess.demo import write_demo_scene

    root = tmp_path_factory.mktemp("demo")
    write_demo_scene(root, num_frames=130, layout="both")
    return root


@pytest.fixture(scope="session")
def demo_store(demo_root, tmp_path_factory) -> Path:
    """The demo scene prepped with the seeded random teacher (treat as read-only)."""
    from pkd.preprocess.prep import RunOptions, run_prep
    from pkd.preprocess.teacher import TeacherConfig

    out = tmp_path_factory.mktemp("stores") / "pairs.zarr"
    run_prep(
        demo_prep_config(demo_root),
        str(out),
        TeacherConfig(kind="random", seed=0),
        RunOptions(teacher_batch=2, progress=False),
    )
    return out
