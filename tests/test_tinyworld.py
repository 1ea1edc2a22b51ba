"""The embedded tiny world: determinism, self-consistent renders, processor/model round trips, and a real
small build (data, base, experts, 2-d ground truth) checked artifact by artifact."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from pydantic import ValidationError
from scipy import ndimage

from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.presets import paper_2d
from dmo.tinyworld import render
from dmo.tinyworld.build import World, build_world, default_root
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.data import load_pixels, read_split, write_domain
from dmo.tinyworld.generate import EncodingCache, encode, exact_match, generate, generate_encoded
from dmo.tinyworld.model import init_model, load_base
from dmo.tinyworld.tokenizer import build_processor, image_tokens, load_processor
from dmo.tinyworld.train import LORA_TARGET_REGEX, Encoder, pretrain_doses, sft_indices

SMALL = WorldConfig.small()


# ----------------------------------------------------------------------------------------------------------------
# Config and data determinism


def test_key_is_stable_and_sensitive() -> None:
    assert WorldConfig().key() == WorldConfig().key()
    assert WorldConfig(seed=1).key() != WorldConfig().key()
    assert WorldConfig.small().key() != WorldConfig().key()
    assert WorldConfig(lora_r=4).key() != WorldConfig().key()
    assert WorldConfig(threads=1).key() == WorldConfig(threads=2).key()  # speed knobs do not change artifacts
    assert re.fullmatch(r"[0-9a-f]{16}", WorldConfig().key())
    assert default_root(SMALL).name == SMALL.key()


#: The keys format 5's code gave its default and small worlds (before format 6 existed): caches built then are reused.
#: Format 6's default world keeps the key its ground truth was judged under.
V5_KEY, V5_SMALL_KEY = "0c6005d995b1641f", "11b4c085477ecbf6"
V6_KEY = "aa657b9b7356e1c8"  # candidate G of issue 22, whose ground truth was judged under this key


def test_format_6_is_the_default_under_its_key_and_format_5_is_built_by_name() -> None:
    current, v5, v6 = WorldConfig(), WorldConfig.named("v5"), WorldConfig.named("v6")
    assert current == WorldConfig.named("current") == v6 and v6.format_version == 6 and v5.format_version == 5
    assert v5.key() == V5_KEY and SMALL.key() == V5_SMALL_KEY == WorldConfig.named("v5", small=True).key()
    assert v6.key() == V6_KEY and WorldConfig.named("v6", small=True).key() not in (V5_SMALL_KEY, SMALL.key())
    assert SMALL.format_version == 5  # the tests' small world keeps format 5's recipe
    assert (v5.pretrain_samples, v5.test_size, v5.pretrain_weights) == (32768, 200, None)
    assert (v6.pretrain_samples, v6.test_size, v6.pretrain_weights, v6.budget) == (
        10752,
        1000,
        (1.0, 0.5, 8.0, 1.0),
        8192,
    )
    assert json.loads(v5.canonical_json())["format_version"] == 5 and "pretrain_weights" not in v5.canonical_json()
    assert json.loads(v6.canonical_json())["pretrain_weights"] == [1.0, 0.5, 8.0, 1.0]
    assert WorldConfig(pretrain_weights=(1, 1, 4, 1)).key() not in (v6.key(), v5.key())
    small6 = WorldConfig.named("v6", small=True)  # a small world keeps its sizes
    assert (small6.test_size, small6.budget) == (SMALL.test_size, SMALL.budget)
    with pytest.raises(DmoError, match="unknown tiny world 'v4'"):
        WorldConfig.named("v4")
    with pytest.raises(DmoError, match="pretrain_weights"):
        WorldConfig(pretrain_weights=(1, -1, 8, 1))
    with pytest.raises(DmoError, match="pretrain_weights"):
        WorldConfig(domains=("general", "ocr"), pretrain_weights=(0, 1, 0, 1))


def test_pretrain_doses_follow_the_weights_exactly() -> None:
    assert pretrain_doses(WorldConfig.named("v6")) == {"general": 1024, "counting": 512, "ocr": 8192, "chart": 1024}
    assert pretrain_doses(WorldConfig.named("v5")) == dict.fromkeys(render.DOMAINS, 8192)
    rng = np.random.default_rng(7)
    for _ in range(50):
        weights = tuple(float(w) for w in rng.uniform(0, 3, size=4))
        domains = tuple(d for d in render.DOMAINS if rng.random() < 0.7) or ("ocr",)
        total = int(rng.integers(1, 5000))
        doses = pretrain_doses(WorldConfig(domains=domains, pretrain_samples=total, pretrain_weights=weights))
        share = np.array([weights[render.DOMAINS.index(d)] for d in domains])
        exact = total * share / share.sum()
        got = np.array([doses[d] for d in domains])
        assert list(doses) == list(domains) and got.sum() == total
        assert np.all(np.abs(got - exact) < 1)  # largest remainder: every count within one sample of its share


def test_config_is_frozen_and_validated() -> None:
    with pytest.raises(ValidationError):
        SMALL.seed = 3  # type: ignore[misc]
    with pytest.raises(DmoError, match="mrope_section"):
        WorldConfig(mrope_section=(4, 4, 4))
    with pytest.raises(DmoError, match="does not exist"):
        WorldConfig(domains=("general", "maths"))
    with pytest.raises(DmoError, match="multiple of 28"):
        WorldConfig(image_size=90)
    with pytest.raises(DmoError, match="budget"):
        WorldConfig(train_size=100, budget=200)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    sizes = {"train": 12, "test": 5}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        for domain in render.DOMAINS:
            write_domain(tmp_path / name, domain, seed, sizes, 84)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert len(a) == 4 * (2 + 17 + 2)  # per domain: 2 jsonl, 17 png, 2 cached pixel arrays
    assert a["data/ocr/train.jsonl"] != c["data/ocr/train.jsonl"]
    # A split's first items do not depend on its size.
    write_domain(tmp_path / "d", "chart", 0, {"train": 20, "test": 5}, 84)
    assert read_split(tmp_path / "d", "chart", "train")[:12] == read_split(tmp_path / "a", "chart", "train")


def test_jsonl_rows_and_images(tmp_path: Path) -> None:
    write_domain(tmp_path, "counting", 3, {"train": 6, "test": 4}, 84)
    folder = tmp_path / "data" / "counting"
    rows = read_split(tmp_path, "counting", "test")
    assert len(rows) == 4 and len(read_split(tmp_path, "counting", "train")) == 6
    for row in rows:
        assert set(row) == {"id", "image", "question", "answer", "domain"}
        assert row["domain"] == "counting" and row["image"].startswith("images/")
        assert Image.open(folder / row["image"]).size == (84, 84)
    assert len({r["id"] for r in rows}) == 4
    pixels = load_pixels(tmp_path, "counting", "test")
    assert pixels.shape == (4, 84, 84, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[2], np.asarray(Image.open(folder / rows[2]["image"])))
    # Without the cache the same pixels come back from the PNGs.
    (tmp_path / "cache" / "pixels" / "counting" / "test.npy").unlink()
    assert np.array_equal(load_pixels(tmp_path, "counting", "test"), pixels)


# ----------------------------------------------------------------------------------------------------------------
# Every render answers its own question (read back from the pixels, not from the renderer's variables)


def _samples(domain: str, n: int = 150) -> list[tuple[np.ndarray, str, str]]:
    rng = np.random.default_rng(12345)
    out = []
    for _ in range(n):
        image, question, answer = render.sample(domain, rng)
        out.append((np.asarray(image).astype(int), question, answer))
    return out


def _ink(img: np.ndarray) -> np.ndarray:
    return (img != img[0, 0]).any(-1)  # the top-left pixel is background in every domain


def _colour_name(rgb: np.ndarray) -> str:
    return next(name for name, c in render.COLOURS.items() if tuple(int(v) for v in rgb) == c)


def _shape_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle"
    return "triangle" if box[-1].mean() > 0.8 else "diamond"  # widest row at the bottom, or in the middle


def test_general_renders_answer_their_question() -> None:
    seen = set()
    for img, question, answer in _samples("general"):
        mask = _ink(img)
        colours = {tuple(v) for v in img[mask]}
        assert len(colours) == 1  # one flat shape, no anti-aliasing
        ys, xs = np.nonzero(mask)
        shape = _shape_of(mask)
        if question == "What colour is the shape?":
            assert _colour_name(img[ys[0], xs[0]]) == answer
        else:
            assert question == "What shape is it?"
            assert shape == answer
        seen.add(answer)
    assert set(render.SHAPES) | set(render.COLOURS) == seen


def test_counting_renders_answer_their_question() -> None:
    counts = set()
    for img, question, answer in _samples("counting"):
        assert question == "How many circles?"
        labels, n_objects = ndimage.label(_ink(img))
        circles = 0
        for sl in ndimage.find_objects(labels):
            fill = (labels[sl] > 0).mean()
            assert 0.6 < fill  # a circle or a square, never two touching objects
            circles += fill < 0.9  # squares fill their box
        assert str(circles) == answer
        assert 0 <= n_objects - circles <= render.MAX_DISTRACTORS
        counts.add(circles)
    assert counts == set(range(1, render.MAX_CIRCLES + 1))


def _digit_templates() -> list[np.ndarray]:
    out = []
    for d in range(10):
        cell = Image.new("RGB", (render.CELL, render.CELL))
        render.draw_digit(ImageDraw.Draw(cell), str(d), 0, 0, 0, 0, (255, 255, 255))
        out.append(np.asarray(cell).any(-1))
    return out


def test_ocr_renders_answer_their_question() -> None:
    templates = _digit_templates()
    c = render.CELL
    for img, question, answer in _samples("ocr"):
        assert question == "What number is written?"
        mask = _ink(img)
        rows = [r for r in range(3) if mask[r * c : (r + 1) * c].any()]
        assert len(rows) == 1  # the number sits in one row of cells
        read = ""
        for col in range(3):
            cell = mask[rows[0] * c : (rows[0] + 1) * c, col * c : (col + 1) * c]
            iou = [(cell & t).sum() / (cell | t).sum() for t in templates]
            assert max(iou) > 0.8
            read += str(int(np.argmax(iou)))
        assert read == answer and read[0] != "0"


def test_chart_renders_answer_their_question() -> None:
    unit, base = render.bar_unit(84), 84 - 4
    kinds = set()
    for img, question, answer in _samples("chart"):
        bars = {}
        for i in range(3):
            x = i * render.CELL + 8
            name = _colour_name(img[base - 1, x])
            height = 0
            while tuple(img[base - 1 - height, x]) == render.COLOURS[name]:
                height += 1
            assert height % unit == 0
            bars[name] = height // unit
        assert len(set(bars.values())) == 3  # distinct values: one tallest bar
        if question == "Which bar is tallest?":
            assert answer == max(bars, key=bars.get)
            kinds.add("tallest")
        else:
            colour = re.fullmatch(r"What is the value of the (\w+) bar\?", question).group(1)
            assert answer == str(bars[colour])
            kinds.add("value")
    assert kinds == {"tallest", "value"}


def test_unknown_domain_is_refused() -> None:
    with pytest.raises(DmoError, match="unknown tiny-world domain"):
        render.sample("maths", np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------------------------
# Processor, tokenizer, model, generation


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("processor")
    build_processor(SMALL).save_pretrained(str(folder))
    return folder


def test_processor_round_trip_offline(processor_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fresh, loaded = build_processor(SMALL), load_processor(processor_dir)
    assert type(loaded).__name__ == "Qwen2VLProcessor"
    assert loaded.video_processor is not None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    text = loaded.apply_chat_template(messages, add_generation_prompt=True)
    assert text == fresh.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many circles?")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    tok = loaded.tokenizer
    assert tok.tokenize("472") == ["4", "##7", "##2"]  # one token per digit
    assert tok.decode(tok("472 purple")["input_ids"]) == "472 purple"
    assert tok.unk_token_id not in tok("What is the value of the orange bar?")["input_ids"]
    image = Image.new("RGB", (84, 84))
    a = loaded(text=[text], images=[image], return_tensors="pt")
    b = fresh(text=[text], images=[image], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert (a["input_ids"] == loaded.image_token_id).sum() == image_tokens(SMALL) == 9


def test_model_config_ids_inside_vocabulary() -> None:
    processor = build_processor(SMALL)
    model = init_model(SMALL, processor.tokenizer)
    text, tok = model.config.text_config, processor.tokenizer
    for token_id in (text.bos_token_id, text.eos_token_id, text.pad_token_id, model.config.image_token_id):
        assert 0 <= token_id < len(tok) <= text.vocab_size
    assert tok.convert_ids_to_tokens(text.eos_token_id) == "<|im_end|>"
    assert tok.convert_ids_to_tokens(model.config.image_token_id) == "<|image_pad|>"
    assert model.config.vision_config.hidden_size == text.hidden_size
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    # Same seed, same weights; another seed, other weights.
    again = init_model(SMALL, tok)
    other = init_model(SMALL.model_copy(update={"seed": 5}), tok)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


def test_training_ids_match_the_processor() -> None:
    processor = build_processor(SMALL)
    enc = Encoder(processor, image_tokens(SMALL))
    for domain in render.DOMAINS:
        image, question, answer = render.sample(domain, np.random.default_rng(1))
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        full = processor.apply_chat_template(messages)
        ids = processor(text=[full], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        seq, prompt_len = enc.encode(question, answer)
        assert ids[: len(seq)] == seq  # the template adds only a trailing newline, which the tokenizer drops
        assert processor.tokenizer.decode(seq[prompt_len:], skip_special_tokens=True) == answer


def test_tiny_model_generates() -> None:
    processor = build_processor(SMALL)
    model = init_model(SMALL, processor.tokenizer)
    rng = np.random.default_rng(0)
    items = [render.sample(d, rng) for d in render.DOMAINS]
    images, questions = [i for i, _, _ in items], [q for _, q, _ in items]
    out = generate(model, processor, images, questions, max_new_tokens=4, batch_size=3)
    assert len(out) == 4 and all(isinstance(a, str) and a == a.strip() for a in out)
    assert out == generate(model, processor, images, questions, max_new_tokens=4, batch_size=4)  # batching-invariant
    arrays = np.stack([np.asarray(i) for i in images])
    assert generate_encoded(model, processor, encode(processor, arrays, questions, 2), 4) == out
    model.train()
    generate(model, processor, images[:1], questions[:1], max_new_tokens=2)
    assert model.training  # the caller's mode is restored


def test_encodings_are_reused_by_content_and_bounded() -> None:
    processor = build_processor(SMALL)
    rng = np.random.default_rng(1)
    items = [render.sample(d, rng) for d in render.DOMAINS * 2]
    images, questions = [i for i, _, _ in items], [q for _, q, _ in items]
    calls = []

    class Spy:  # counts processor runs; everything else is the real processor
        def __call__(self, **kwargs):
            calls.append(len(kwargs["text"]))
            return processor(**kwargs)

        def __getattr__(self, name):
            return getattr(processor, name)

    spy, cache = Spy(), EncodingCache()
    first = cache.encode(spy, images, questions, 3)
    copies = [im.copy() for im in images]  # new objects, same pixels: the harness's case
    again = cache.encode(spy, copies, questions, 3)
    assert again is first and calls == [3, 3, 2] and len(cache) == 1
    for a, b in zip(first, encode(processor, images, questions, 3)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # any change of pixels, question or batching is another entry
    edited = [im.copy() for im in images]
    edited[5].putpixel((0, 0), (255, 255, 255) if edited[5].getpixel((0, 0)) != (255, 255, 255) else (0, 0, 0))
    cache.encode(spy, edited, questions, 3)
    cache.encode(spy, images, [*questions[:-1], "What shape is it?"], 3)
    cache.encode(spy, images, questions, 4)
    assert len(cache) == 4 and len(calls) == 3 + 3 + 3 + 2  # 8 items: 3 batches of 3, or 2 of 4
    one = sum(v.numel() * v.element_size() for b in first for v in b.values())
    small = EncodingCache(max_bytes=2 * one)
    for q in range(4):
        small.encode(processor, images, [*questions[:-1], f"q{q}"], 3)
    assert len(small) == 2  # the two least recently used went


def test_exact_match() -> None:
    assert exact_match(" Red\n", "red")
    assert exact_match("4  7", "4 7")
    assert not exact_match("47", "4 7")
    assert not exact_match("3", "30")


def test_sft_items_are_nested_across_mixtures() -> None:
    small, large = sft_indices(SMALL, "ocr", 32), sft_indices(SMALL, "ocr", 128)
    assert list(large[:32]) == list(small) and len(set(large)) == 128
    assert list(sft_indices(SMALL, "chart", 32)) != list(small)
    with pytest.raises(DmoError, match="train pool"):
        sft_indices(SMALL, "ocr", SMALL.train_size + 1)


# ----------------------------------------------------------------------------------------------------------------
# A real small build


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, float]:
    root = tmp_path_factory.mktemp("tinyworld") / "small"
    start = time.perf_counter()
    w = build_world(SMALL, root=root, ground_truth=("2d",), progress=False)
    return w, time.perf_counter() - start


def test_small_build_writes_every_artifact(world: tuple[World, float]) -> None:
    w, _ = world
    assert w.root.name == "small" and w.config == SMALL
    for domain in SMALL.domains:
        assert len(read_split(w.root, domain, "train")) == SMALL.train_size
        assert len(read_split(w.root, domain, "test")) == SMALL.test_size
        assert (w.data_dir(domain) / "images" / "test-00000.png").is_file()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (w.expert_dir(domain) / name).is_file()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "processor_config.json", "chat_template.jinja"):  # fmt: skip
        assert (w.base_dir / name).is_file(), name
    for m in paper_2d():
        for s in range(SMALL.n_seeds):
            assert (w.trained_dir(m, s) / "adapter_model.safetensors").is_file()
    assert not list(w.root.rglob("*.tmp")) and not (w.root / ".base-progress").exists()


def test_manifest_lists_base_experts_and_trained(world: tuple[World, float]) -> None:
    w, _ = world
    doc = yaml.safe_load(w.manifest_path.read_text())
    assert doc["name"] == "tinyworld" and doc["kind"] == "lora" and doc["budget"] == SMALL.budget
    assert doc["base"] == {"path": "base"}
    assert doc["experts"] == {d: {"path": f"experts/{d}"} for d in SMALL.domains}
    assert doc["data"] == "data" and all((w.data_dir(d) / "val.jsonl").is_file() for d in SMALL.domains)
    trained = doc["trained"]
    assert len(trained) == len(paper_2d()) * SMALL.n_seeds
    assert trained[0] == {"mixture": {"general": 1.0 - 0.125, "ocr": 0.125}, "seed": 0,
                          "path": "trained/general-0.875+ocr-0.125/seed-0"}  # fmt: skip
    for entry in trained:
        mixture = Mixture.from_mapping(entry["mixture"])
        assert entry["path"] == f"trained/{mixture.id}/seed-{entry['seed']}"
        assert (w.manifest_path.parent / entry["path"] / "adapter_config.json").is_file()


def test_world_json_reports_accuracy_and_mixture_effect(world: tuple[World, float]) -> None:
    w, _ = world
    info = w.info()
    assert info["key"] == SMALL.key() and WorldConfig(**info["config"]) == SMALL
    assert set(info["timings_seconds"]) == {"data", "validation", "processor", "base", "experts", "ground_truth_2d"}
    acc = info["accuracy"]
    assert set(acc["base"]) == set(SMALL.domains)
    assert all(0.0 <= v <= 1.0 for e in acc["experts"].values() for v in e.values())
    rows = acc["trained"]["2d"]
    assert [r["id"] for r in rows] == [m.id for m in paper_2d()]
    assert all(set(r["seeds"]) == {"0", "1"} for r in rows)
    effect = info["mixture_effect"]["2d"]
    assert set(effect) == {"general", "ocr"}
    ocr = [r["mean"]["ocr"] for r in rows]
    assert effect["ocr"]["across_mixtures"] == pytest.approx(max(ocr) - min(ocr), abs=1e-6)


def test_mixture_sample_counts_follow_the_weights(world: tuple[World, float]) -> None:
    w, _ = world
    for m in paper_2d():
        for s in range(SMALL.n_seeds):
            record = json.loads((w.trained_dir(m, s) / "dmo_training.json").read_text())
            assert record["counts"] == {d: round(m[d] * SMALL.budget) for d in m.domains}
            assert record["seed"] == s and record["steps"] == -(-SMALL.budget // SMALL.lora_batch)
    expert = json.loads((w.expert_dir("ocr") / "dmo_training.json").read_text())
    assert expert["counts"] == {"ocr": SMALL.budget}


def test_adapters_load_with_peft(world: tuple[World, float]) -> None:
    from peft import PeftModel

    w, _ = world
    model, processor = load_base(w.root)
    config = json.loads((w.expert_dir("chart") / "adapter_config.json").read_text())
    assert config["r"] == SMALL.lora_r and config["target_modules"] == LORA_TARGET_REGEX
    seed0, seed1 = (w.trained_dir(paper_2d()[3], s) for s in (0, 1))
    peft_model = PeftModel.from_pretrained(model, str(seed0))
    names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    # the language model's linear layers only: the vision tower and merger stay frozen (as in the paper's recipe),
    # so vLLM, which serves LoRA on the language model only, serves these adapters whole
    assert all(".language_model." in n for n in names) and not any("visual" in n for n in names)
    assert len(names) == 7 * SMALL.text_layers
    rows = read_split(w.root, "ocr", "test")[:3]
    images = [Image.open(w.data_dir("ocr") / r["image"]) for r in rows]
    answers = generate(peft_model, processor, images, [r["question"] for r in rows], max_new_tokens=4)
    assert len(answers) == 3
    from safetensors.torch import load_file

    a = load_file(str(seed0 / "adapter_model.safetensors"))
    b = load_file(str(seed1 / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # seeds differ


def test_precomputed_inputs_are_what_the_model_computes(world: tuple[World, float]) -> None:
    """A LoRA step takes the M-RoPE position ids and the frozen vision tower's output computed beforehand (once per
    run, once per process): the same ids, the same loss and LoRA gradients, and the same answers as when the model
    computes them itself from the pixels, on rows of different lengths and a non-zero adapter."""
    from peft import get_peft_model

    from dmo.tinyworld.generate import encoder_outputs
    from dmo.tinyworld.train import Examples, Positions, collate, gather, image_grid, lora_config, vision_features

    w, _ = world
    base, processor = load_base(w.root)
    picks = {d: sft_indices(SMALL, d, 12) for d in ("ocr", "counting", "general")}
    plain = gather(w.root, processor, image_tokens(SMALL), picks)
    assert len({len(s) for s in plain.input_ids}) > 1  # padding is exercised
    torch.manual_seed(3)  # PEFT draws the A matrices from torch's global generator
    model = get_peft_model(base, lora_config(SMALL))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    positions = Positions(model, processor, image_grid(processor, SMALL.image_size))
    fast = Examples(**{**plain.__dict__, "features": vision_features(base, processor, plain.pixels, batch=7)})
    idx = np.arange(len(plain))[::-1].copy()  # not the order the features were computed in

    ref_batch = collate(processor, plain, idx)
    ref_pos, _ = model.get_base_model().model.get_rope_index(
        ref_batch["input_ids"], ref_batch["mm_token_type_ids"], ref_batch["image_grid_thw"], None,
        attention_mask=ref_batch["attention_mask"],
    )  # fmt: skip
    fast_batch = collate(processor, fast, idx, positions)
    assert "pixel_values" not in fast_batch and torch.equal(fast_batch["position_ids"], ref_pos)

    def loss_and_grads(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads(ref_batch)
    loss, grads = loss_and_grads(fast_batch)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 7 * SMALL.text_layers
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-7)
    assert any(g.abs().max() > 0 for n, g in grads.items() if "lora_A" in n)

    rows = read_split(w.root, "ocr", "test")
    pixels = load_pixels(w.root, "ocr", "test", rows)
    batches = encode(processor, pixels, [r["question"] for r in rows], 16)
    merged = model.merge_and_unload()
    with_tower = generate_encoded(merged, processor, batches, 4)
    precomputed = [
        {**{k: v for k, v in b.items() if k != "pixel_values"},
         "mm_encoder_outputs": encoder_outputs(vision_features(base, processor, pixels[i : i + 16]))}
        for i, b in zip(range(0, len(rows), 16), batches)
    ]  # fmt: skip
    assert generate_encoded(merged, processor, precomputed, 4) == with_tower


def test_vision_outputs_are_reused_only_for_the_same_tower(world: tuple[World, float]) -> None:
    """Scoring reuses a benchmark's vision-tower outputs across models whose towers are equal (LoRA on the language
    model only), with the answers of the full forward; a model with a different tower gets its own."""
    from dmo.tinyworld.generate import VisionCache

    w, _ = world
    model, processor = load_base(w.root)
    rows = read_split(w.root, "chart", "test")
    batches = encode(processor, load_pixels(w.root, "chart", "test", rows), [r["question"] for r in rows], 16)
    cache = VisionCache()
    first = cache.batches(model, batches)
    assert all("pixel_values" not in b and "mm_encoder_outputs" in b for b in first)
    assert generate_encoded(model, processor, first, 4) == generate_encoded(model, processor, batches, 4)
    with torch.no_grad():  # the language model changes: same tower, same entry
        model.model.language_model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert cache.batches(model, batches) is first and len(cache) == 1
    with torch.no_grad():  # the tower changes: a new entry, and the answers of the full forward
        model.model.visual.blocks[0].mlp.fc1.weight.add_(0.05)
    second = cache.batches(model, batches)
    assert second is not first and len(cache) == 2
    image = [b[0]["mm_encoder_outputs"]["image"].pooler_output[0] for b in (first, second)]
    assert not torch.equal(*image)
    assert generate_encoded(model, processor, second, 4) == generate_encoded(model, processor, batches, 4)


def test_load_base_is_offline_and_complete(world: tuple[World, float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    w, _ = world
    model, processor = load_base(w.root)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and not model.training
    assert model.generation_config.eos_token_id[0] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(DmoError, match="no tiny-world base"):
        load_base(w.root / "nowhere")


def test_cached_rebuild_is_fast_and_changes_nothing(world: tuple[World, float]) -> None:
    w, first = world
    before = {p: p.stat().st_mtime_ns for p in w.root.rglob("*")}
    start = time.perf_counter()
    again = build_world(SMALL, root=w.root, ground_truth=("2d",), progress=False)
    elapsed = time.perf_counter() - start
    assert again.root == w.root
    assert elapsed < 5.0, f"cached rebuild took {elapsed:.1f}s (first build {first:.1f}s)"
    assert {p: p.stat().st_mtime_ns for p in w.root.rglob("*")} == before


def test_ground_truth_needs_the_spaces_domains(world: tuple[World, float], tmp_path: Path) -> None:
    with pytest.raises(DmoError, match="needs domains"):
        build_world(WorldConfig.small(domains=("general", "ocr")), root=tmp_path, ground_truth=("3d",), progress=False)
    with pytest.raises(DmoError, match="unknown ground-truth space"):
        build_world(SMALL, root=tmp_path, ground_truth=("5d",), progress=False)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_interrupted_output_is_rebuilt(world: tuple[World, float]) -> None:
    """A missing evaluation (as after a crash between saving an adapter and scoring it) is redone alone."""
    w, _ = world
    m = paper_2d()[0]
    evaluation = w.root / "evals" / "trained" / m.id / "seed-1.json"
    adapter = w.trained_dir(m, 1) / "adapter_model.safetensors"
    old_eval, old_adapter = json.loads(evaluation.read_text()), adapter.stat().st_mtime_ns
    evaluation.unlink()
    build_world(SMALL, root=w.root, ground_truth=("2d",), progress=False)
    assert json.loads(evaluation.read_text())["accuracy"] == old_eval["accuracy"]  # deterministic
    assert adapter.stat().st_mtime_ns == old_adapter  # the adapter was not retrained


def _copy_pretrained(w: World, root: Path) -> World:
    """A world at ``root`` that has ``w``'s data, processor and base, and nothing trained."""
    import shutil

    for part in ("data", "processor", "base"):
        shutil.copytree(w.root / part, root / part)
    return World(root, w.config)


def test_a_space_gets_its_experts_and_one_seed_and_a_later_build_adds_the_rest(
    world: tuple[World, float], tmp_path: Path
) -> None:
    """What ``dmo demo`` builds (its space's experts, one seed of its ground truth), listed as built so far; a full
    build then trains only what is missing, and the first seed's adapters are the full build's, byte for byte."""
    full, _ = world
    w = _copy_pretrained(full, tmp_path / "w")
    build_world(SMALL, root=w.root, ground_truth=("2d",), seeds=1, experts=("general", "ocr"), progress=False)
    doc = yaml.safe_load(w.manifest_path.read_text())
    assert set(doc["experts"]) == {"general", "ocr"} and not w.expert_dir("counting").exists()
    assert [t["seed"] for t in doc["trained"]] == [0] * len(paper_2d())
    assert not any(w.trained_dir(m, 1).exists() for m in paper_2d())
    rows = w.info()["accuracy"]["trained"]["2d"]
    assert [r["id"] for r in rows] == [m.id for m in paper_2d()] and all(set(r["seeds"]) == {"0"} for r in rows)
    assert w.info()["mixture_effect"]["2d"]["ocr"]["across_seeds_mean"] is None  # no second seed to compare
    for m in paper_2d():
        a = (w.trained_dir(m, 0) / "adapter_model.safetensors").read_bytes()
        assert a == (full.trained_dir(m, 0) / "adapter_model.safetensors").read_bytes()
    first = {m.id: w.trained_dir(m, 0).stat().st_mtime_ns for m in paper_2d()}

    build_world(SMALL, root=w.root, ground_truth=("2d",), progress=False)
    doc = yaml.safe_load(w.manifest_path.read_text())
    assert set(doc["experts"]) == set(SMALL.domains) and len(doc["trained"]) == len(paper_2d()) * SMALL.n_seeds
    assert {m.id: w.trained_dir(m, 0).stat().st_mtime_ns for m in paper_2d()} == first  # not retrained
    with pytest.raises(DmoError, match="seeds must be between 1 and"):
        build_world(SMALL, root=w.root, seeds=SMALL.n_seeds + 1, progress=False)
    with pytest.raises(DmoError, match="no domain 'maps'"):
        build_world(SMALL, root=w.root, experts=("maps",), progress=False)


def test_demo_builds_one_seed_and_says_the_seed_ceiling_is_missing(
    world: tuple[World, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dmo demo --small`` on a cache with the pre-trained small world: the whole pipeline, one training seed, the
    proxies scored by a second process."""
    from typer.testing import CliRunner

    from dmo.cli import app

    full, _ = world
    monkeypatch.chdir(tmp_path)  # nothing may be written outside the cache and the results folder
    monkeypatch.setenv("DMO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DMO_RESULTS", str(tmp_path / "results"))
    w = _copy_pretrained(full, default_root(SMALL))
    result = CliRunner().invoke(app, ["demo", "--small", "--n-trials", "2"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "one training seed per mixture, so no seed ceiling" in out and "report:" in out
    assert "best trained mixture" in out and "proxy's pick among the trained mixtures" in out
    assert not w.expert_dir("counting").exists() and not w.trained_dir(paper_2d()[0], 1).exists()
    assert not (w.root / "evals").exists()  # the demo scores through lmms-eval; world.json's tables wait for a build
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "results"]
    scores = [json.loads(line) for line in (tmp_path / "results" / "tiny-2d" / "scores.jsonl").read_text().splitlines()]
    trained = {(r["mixture"], r["seed"]) for r in scores if r["kind"] == "trained"}
    assert trained == {(m.id, 0) for m in paper_2d()}


def test_format_6_builds_by_name(tmp_path: Path) -> None:
    """``dmo world build --world v6``: format 6's world, under its own key, with its pre-training doses."""
    from typer.testing import CliRunner

    from dmo.cli import app

    result = CliRunner().invoke(
        app, ["world", "build", "--world", "v6", "--small", "--ground-truth", "none", "--root", str(tmp_path / "v6")]
    )
    assert result.exit_code == 0, result.output
    small_key = WorldConfig.named("v6", small=True).key()
    assert f"key {small_key}, format 6" in " ".join(result.output.split())
    info = json.loads((tmp_path / "v6" / "world.json").read_text())
    assert info["key"] == small_key and info["config"]["pretrain_weights"] == [1.0, 0.5, 8.0, 1.0]
    assert set(info["accuracy"]["experts"]) == set(render.DOMAINS) and info["base_training"]["samples"] == 2048
    bad = CliRunner().invoke(app, ["world", "build", "--world", "v4", "--root", str(tmp_path / "v4")])
    assert bad.exit_code != 0 and not (tmp_path / "v4").exists()
