"""CLIP-prefix captioning (ClipCap, Mokady et al. 2021) with batched, KV-cached decoding.

* :mod:`clipkit.captioning.model`      config, MLP and transformer mappers, the ClipCap model
* :mod:`clipkit.captioning.decode`     batched greedy / beam / nucleus decoding with the KV cache
* :mod:`clipkit.captioning.checkpoint` our safetensors format and the official ``.pt`` importer
* :mod:`clipkit.captioning.captioner`  ``Captioner``: CLIP + ClipCap + tokenizer, ``caption()``
* :mod:`clipkit.captioning.train`      ``clipkit train captioner`` (embeddings cached once per image)
* :mod:`clipkit.captioning.metrics`    BLEU, ROUGE-L, CIDEr-D, CLIP-S, RefCLIP-S
"""
