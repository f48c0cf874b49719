"""Geometry stage of pkd-prep against the decode-only limit, on a real 7-Scenes sequence and the demo scene.

For each input (packed into a .sens by this script) and sampling method it measures, single-threaded:
  * decode-only frames/s: read + decode the kept frames' JPEG and depth payloads, nothing else;
  * geometry frames/s: read + decode + back-project + sample + color (``make_sample``), no teacher;
  * bytes read from the .sens against the kept frames' payload bytes;
  * peak RSS of the geometry pass over the file and over a 4x longer file (flat = independent of size).

    python bench/prep_geometry.py --out bench/results/prep_geometry.json
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pkd.preprocess.demo import write_demo_scene
from pkd.preprocess.frame_sample import GeometryConfig, SkipFrame, make_sample
from pkd.preprocess.frames import Camera, decode_color, decode_depth
from pkd.preprocess.sens import SensReader, write_sens

from _report import write_report

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SEVEN_SCENES = FIXTURES / "7scenes_seq"
SCANNET = FIXTURES / "scannet_sample" / "scans_test" / "scene0707_00"


def pack_seven_scenes(out: Path, repeat: int = 1) -> Path:
    """The 300 real 7-Scenes frames (repeated ``repeat`` times) as a ScanNet .sens file."""
    k = np.loadtxt(SEVEN_SCENES / "camera-intrinsics.txt")
    camera = Camera(k, k, np.eye(4), (640, 480), (640, 480), 1000.0)
    names = sorted(SEVEN_SCENES.glob("frame-*.color.jpg"))

    def frames():
        for _ in range(repeat):
            for color in names:
                stem = color.name.removesuffix(".color.jpg")
                depth = cv2.imread(str(SEVEN_SCENES / f"{stem}.depth.png"), cv2.IMREAD_UNCHANGED)
                yield np.loadtxt(SEVEN_SCENES / f"{stem}.pose.txt"), color.read_bytes(), depth

    return write_sens(out, camera, frames())


def pack_scannet(out: Path, repeat: int = 10) -> Path:
    """The 3 real ScanNet frames (1296x968 color), repeated, as a .sens: real ScanNet decode costs."""
    k_color = np.loadtxt(SCANNET / "intrinsic" / "intrinsic_color.txt")[:3, :3]
    k_depth = np.loadtxt(SCANNET / "intrinsic" / "intrinsic_depth.txt")[:3, :3]
    camera = Camera(k_color, k_depth, np.eye(4), (1296, 968), (640, 480), 1000.0)
    frames = [
        (
            np.loadtxt(SCANNET / "pose" / f"{i}.txt"),
            (SCANNET / "color" / f"{i}.jpg").read_bytes(),
            cv2.imread(str(SCANNET / "depth" / f"{i}.png"), cv2.IMREAD_UNCHANGED),
        )
        for i in range(3)
    ]
    return write_sens(out, camera, frames * repeat)


def kept(reader: SensReader, skip: int) -> list[int]:
    return [f for f in reader.frame_numbers() if f % skip == 0]


def decode_pass(path: Path, skip: int) -> tuple[float, int, int]:
    """Seconds, bytes read and kept payload bytes of reading + decoding the kept frames."""
    with SensReader(path) as reader:
        frames = kept(reader, skip)
        start, payload = time.perf_counter(), 0
        for raw in reader.read(frames):
            decode_color(raw)
            decode_depth(raw, reader.camera)
            payload += len(raw.color) + len(raw.depth)
        return time.perf_counter() - start, reader.bytes_read, payload


def geometry_pass(path: Path, skip: int, sampling: str) -> tuple[float, int]:
    """Seconds and samples made by the full geometry stage over the kept frames."""
    cfg = GeometryConfig(sampling=sampling)
    made = 0
    with SensReader(path) as reader:
        start = time.perf_counter()
        for raw in reader.read(kept(reader, skip)):
            try:
                make_sample(raw, reader.camera, cfg, seed=raw.frame)
                made += 1
            except SkipFrame:
                continue
        return time.perf_counter() - start, made


def peak_rss_mib(path: Path, skip: int, sampling: str) -> float:
    """Peak RSS of a fresh process running the geometry pass over ``path``."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import prep_geometry as b, resource; "
        f"from pathlib import Path; b.geometry_pass(Path({str(path)!r}), {skip}, {sampling!r}); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024


def best_of(fn, repeats: int):
    results = [fn() for _ in range(repeats)]
    return min(results, key=lambda r: r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frame-skip", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5, help="passes per measurement; the best is kept")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = next((write_demo_scene(tmp / "demo", layout="sens")).rglob("*.sens"))
        inputs = {"demo (640x480 synthetic)": (demo, args.frame_skip)}
        if SEVEN_SCENES.exists():
            inputs["7-Scenes (640x480 real)"] = (pack_seven_scenes(tmp / "7scenes.sens"), args.frame_skip)
            long_file = pack_seven_scenes(tmp / "7scenes_x4.sens", repeat=4)
        if SCANNET.exists():
            inputs["ScanNet (1296x968 real, every frame)"] = (pack_scannet(tmp / "scannet.sens"), 1)
        missing = [p for p in (SEVEN_SCENES, SCANNET) if not p.exists()]
        if missing:
            print(f"skipping absent real-data fixtures: {missing}")
        for name, (path, skip) in inputs.items():
            dec_s, bytes_read, payload = best_of(functools.partial(decode_pass, path, skip), args.repeats)
            for sampling in ("fps", "random"):
                geo_s, made = best_of(functools.partial(geometry_pass, path, skip, sampling), args.repeats)
                frames = len(kept(SensReader(path), skip))
                row = {
                    "input": name,
                    "sampling": sampling,
                    "kept_frames": frames,
                    "samples": made,
                    "decode_fps": frames / dec_s,
                    "geometry_fps": frames / geo_s,
                    "ratio": dec_s / geo_s,
                    "bytes_read/payload": bytes_read / payload,
                    "rss_MiB": peak_rss_mib(path, skip, sampling),
                }
                if name.startswith("7-Scenes"):
                    row["rss_MiB_4x_file"] = peak_rss_mib(long_file, args.frame_skip, sampling)
                rows.append(row)
    write_report(
        "prep geometry stage vs decode-only limit (1 thread)",
        rows,
        args.out,
        {"targets": {"ratio": ">= 0.8", "bytes_read/payload": "<= 1.1", "rss": "flat in file size"}},
    )


if __name__ == "__main__":
    main()
