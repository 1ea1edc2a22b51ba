"""Merged LoRA experts as proxies for models trained on data mixtures.

``lora`` reads experts and builds the exact linear proxy (as one LoRA adapter or as dense deltas), ``dense``
applies deltas to weights, ``names`` reconciles checkpoint and live parameter names, and ``registry`` holds the
merge methods by name. Import the submodules directly; this package imports nothing so that it stays cheap.
"""
