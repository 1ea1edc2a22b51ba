"""Shared helpers of the data tests: small per-domain sources in the formats dmo reads, with real PNG images."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(path)


def make_sources(root: Path, n_general: int = 12, n_ocr: int = 20) -> Path:
    """Two domains in two of the accepted formats: dmo rows (general) and sharegpt conversations (ocr)."""
    data = root / "src"
    rows = []
    for i in range(n_general):
        write_image(data / "general" / "images" / f"{i}.png", i)
        rows.append({"id": f"g{i}", "image": f"images/{i}.png", "question": f"q{i}", "answer": f"a{i}"})
    (data / "general").mkdir(parents=True, exist_ok=True)
    (data / "general" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    conv = []
    for i in range(n_ocr):
        write_image(data / "ocr_images" / f"{i}.png", 100 + i)
        conv.append(
            {
                "conversations": [
                    {"from": "human", "value": f"<image>read {i}"},
                    {"from": "gpt", "value": str(i)},
                ],
                "images": [f"ocr_images/{i}.png"],
            }
        )
    (data / "ocr.json").write_text(json.dumps(conv))
    return data


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
