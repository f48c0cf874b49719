"""The planner: the only place that assigns sample indices.

Order is deterministic (split, then scene, then frame), so a rerun, a resume or a distributed run all
write the same sample to the same index. Frames whose stored pose is unusable are dropped here, where
reading a pose is cheap; frames that fail later (undecodable, too little depth) keep their slot with
``valid=False``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from pkd.common import geometry
from pkd.common.logs import progress_bar
from pkd.common.store import MISSING_FILES, SPLITS, shard_ranges
from pkd.preprocess.scenes import SceneEntry, open_scene


@dataclass
class SplitPlan:
    """Planned samples of one split: (scene index, frame number) per sample, plus plan-time skips."""

    split: str
    scenes: list[SceneEntry]
    samples: list[tuple[int, int]]
    skipped: Counter = field(default_factory=Counter)
    color_sizes: list[tuple[int, int]] = field(default_factory=list)

    def shards(self, shard_size: int) -> list[tuple[int, int]]:
        """Sample ranges of the split's shards."""
        return shard_ranges(len(self.samples), shard_size)

    def fingerprint(self) -> str:
        """Hash of the scene names and planned samples: detects a dataset that changed under a resume."""
        payload = json.dumps([[e.name for e in self.scenes], self.samples])
        return hashlib.sha256(payload.encode()).hexdigest()


def plan_splits(
    entries: list[SceneEntry], frame_skip: int, limit: int | None = None, progress: bool = True
) -> dict[str, SplitPlan]:
    """Plan every split: keep frames numbered 0, frame_skip, 2*frame_skip, ... of each scene, at most
    ``limit`` per split (frame numbers, not positions, so .sens and exported folders agree)."""
    plans: dict[str, SplitPlan] = {}
    for split in SPLITS:
        scenes = [e for e in entries if e.split == split]
        if not scenes:
            continue
        plan = SplitPlan(split, scenes, [])
        bar = progress_bar(scenes, desc=f"plan {split}: poses", unit="scene", disable=not progress)
        for index, entry in enumerate(bar):
            if limit is not None and len(plan.samples) >= limit:
                break
            with open_scene(entry) as reader:
                plan.color_sizes.append(reader.camera.color_size)
                plan.skipped[MISSING_FILES] += sum(f % frame_skip == 0 for f in reader.missing)
                for frame in (f for f in reader.frame_numbers() if f % frame_skip == 0):
                    problem = geometry.pose_problem(reader.pose(frame))
                    if problem:
                        plan.skipped[problem] += 1
                        continue
                    plan.samples.append((index, frame))
                    if limit is not None and len(plan.samples) >= limit:
                        break
        plan.scenes = plan.scenes[: len(plan.color_sizes)]
        plan.skipped = +plan.skipped  # drop zero counts
        plans[split] = plan
    return plans
