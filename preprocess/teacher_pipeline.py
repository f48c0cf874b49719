"""Feed the teacher without letting JPEG decoding stall it.

Decoding and the open_clip transform run in a thread pool (PIL and torch release the GIL for the
heavy parts) a bounded number of images ahead, while the main thread runs the model on the
previous batch. Order is preserved, memory stays bounded by ``prefetch`` batches.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from pkd.common.errors import DataError
from pkd.preprocess.teacher import Teacher, TeacherOutput


def decode_image(item: bytes | np.ndarray) -> Image.Image:
    """An encoded image (JPEG/PNG bytes) or an (H, W, 3) uint8 RGB array as an RGB PIL image."""
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {item.shape} {item.dtype}")
        return Image.fromarray(item, "RGB")
    with Image.open(io.BytesIO(item)) as image:
        return image.convert("RGB")


def encode_images(
    teacher: Teacher,
    images: Iterable[bytes | np.ndarray],
    batch_size: int = 32,
    num_workers: int = 2,
    prefetch: int = 2,
) -> Iterator[TeacherOutput]:
    """Teacher outputs (on CPU) for consecutive batches of ``images``, in input order.

    At most ``prefetch`` batches are decoded ahead of the model; a chunk is shorter only at the end.
    A frame that does not decode raises DataError naming its position in ``images``.
    """
    if batch_size < 1 or num_workers < 1 or prefetch < 1:
        raise ValueError("batch_size, num_workers and prefetch must be >= 1")

    def prepare(index: int, item: bytes | np.ndarray) -> torch.Tensor:
        try:
            return teacher.transform(decode_image(item))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL reports corrupt data with these
            raise DataError(f"image {index} of the teacher input could not be decoded: {exc}") from exc

    source = enumerate(images)
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(num_workers, thread_name_prefix="pkd-decode") as pool:
        def fill() -> None:
            while len(pending) < batch_size * (prefetch + 1):
                item = next(source, None)
                if item is None:
                    return
                pending.append(pool.submit(prepare, *item))

        try:
            fill()
            while pending:
                batch = torch.stack([pending.popleft().result() for _ in range(min(batch_size, len(pending)))])
                fill()  # keep the workers busy while the model runs
                yield teacher.encode(batch).cpu()
        finally:
            for future in pending:
                future.cancel()
