"""Write each domain's train/test split as ordinary files: JSONL rows + PNG images.

Layout (what a real dmo data source looks like)::

    data/<domain>/train.jsonl   {"id", "image": "images/<file>.png", "question", "answer", "domain"} per line
    data/<domain>/test.jsonl    the held-out benchmark split
    data/<domain>/val.jsonl     a validation split (``loss:<domain>`` scores): rows of a stream of their own, seen by
                                no pre-training, SFT or benchmark; written after the rest (write_val_split)
    data/<domain>/images/*.png

Decoding tens of thousands of PNGs again for every training run would cost more than the training, so the
same pixels are also kept as one uint8 array per split under ``cache/pixels/`` (rebuilt from the PNGs if
missing). Item ``i`` of a split is drawn from its own generator seeded by (seed, domain, split, i): a split's
first items do not depend on its size, and domains can be rendered in parallel.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dmo.atomic import atomic_dir, atomic_file
from dmo.tinyworld.render import DOMAINS, sample

SPLITS: tuple[str, ...] = ("train", "test")
#: Every split's random stream, by position; ``val`` comes after the splits ``write_domain`` writes, so that adding it
#: changed no byte of an existing world (and no cache key).
STREAMS: tuple[str, ...] = (*SPLITS, "val")


@functools.lru_cache(maxsize=16384)
def read_image(path: Path) -> Image.Image:
    """An RGB image of the world's data, decoded once per process: lmms-eval asks for every benchmark image again
    for every model it scores, and loads the task's hooks afresh each time (so they cannot keep a cache).
    Callers share the image and must not change it."""
    with Image.open(path) as image:
        return image.convert("RGB")


def item_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, DOMAINS.index(domain), STREAMS.index(split), index])


def pixel_cache_path(root: Path, domain: str, split: str) -> Path:
    return root / "cache" / "pixels" / domain / f"{split}.npy"


def write_domain(root: Path, domain: str, seed: int, sizes: dict[str, int], image_size: int) -> None:
    """Render and write ``data/<domain>/`` atomically, then its pixel cache. Safe to run in a worker process."""
    root = Path(root)
    arrays: dict[str, np.ndarray] = {}
    with atomic_dir(root / "data" / domain) as tmp:
        (tmp / "images").mkdir()
        for split in SPLITS:
            pixels = np.empty((sizes[split], image_size, image_size, 3), dtype=np.uint8)
            lines = []
            for i in range(sizes[split]):
                image, question, answer = sample(domain, item_rng(seed, domain, split, i), image_size)
                name = f"images/{split}-{i:05d}.png"
                image.save(tmp / name, format="PNG", optimize=False, compress_level=1)
                pixels[i] = np.asarray(image)
                row = {
                    "id": f"{domain}-{split}-{i:05d}",
                    "image": name,
                    "question": question,
                    "answer": answer,
                    "domain": domain,
                }
                lines.append(json.dumps(row, separators=(", ", ": ")))
            (tmp / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
            arrays[split] = pixels
    for split, pixels in arrays.items():
        _save_array(pixel_cache_path(root, domain, split), pixels)


def write_val_split(root: Path, domain: str, seed: int, size: int, image_size: int) -> None:
    """Add ``data/<domain>/val.jsonl`` (and its images) to a written domain; the jsonl is written last, atomically,
    so a half-written split is never read (its images are simply written again)."""
    folder = Path(root) / "data" / domain
    lines = []
    for i in range(size):
        image, question, answer = sample(domain, item_rng(seed, domain, "val", i), image_size)
        name = f"images/val-{i:05d}.png"
        image.save(folder / name, format="PNG", optimize=False, compress_level=1)
        row = {"id": f"{domain}-val-{i:05d}", "image": name, "question": question, "answer": answer, "domain": domain}
        lines.append(json.dumps(row, separators=(", ", ": ")))
    with atomic_file(folder / "val.jsonl", "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_file(path, "wb") as fh:
        np.save(fh, array)


def read_split(root: Path, domain: str, split: str) -> list[dict]:
    """The rows of ``data/<domain>/<split>.jsonl``."""
    path = Path(root) / "data" / domain / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_pixels(root: Path, domain: str, split: str, rows: Sequence[dict] | None = None) -> np.ndarray:
    """All images of a split as one ``(N, H, W, 3)`` uint8 array, from the cache or else from the PNGs."""
    path = pixel_cache_path(Path(root), domain, split)
    if path.exists():
        return np.load(path, mmap_mode="r")
    rows = read_split(root, domain, split) if rows is None else rows
    folder = Path(root) / "data" / domain
    pixels = np.stack([np.asarray(Image.open(folder / r["image"]).convert("RGB")) for r in rows])
    _save_array(path, pixels)
    return pixels
