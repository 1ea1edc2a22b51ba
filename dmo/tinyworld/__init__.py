"""The embedded tiny world: a seeded, locally built stand-in for a real multimodal SFT setup.

It produces ordinary artifacts (JSONL + PNG data, an HF Qwen2-VL model folder, PEFT LoRA adapters, an
``experts.yaml`` manifest), so the rest of dmo treats it exactly like a real setup. Entry point:
:func:`dmo.tinyworld.build.build_world`. Nothing heavy is imported here.
"""

__all__: list[str] = []  # import the submodules: build (build_world), source, internvl
