"""Shared test helpers: where the real-data fixtures live, and skipping cleanly when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

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
