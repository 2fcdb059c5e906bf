"""``clipkit embed``: embed a folder into one safetensors file, sharded under ``accelerate launch``.

The streaming, cache-aware embedding itself is :mod:`clipkit.core.embedding` (shared with search).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clipkit.core.artifacts import save_safetensors
from clipkit.core.cache import open_cache
from clipkit.core.dist import partial_state
from clipkit.core.embedding import embed_files
from clipkit.core.errors import InputError
from clipkit.core.io import scan_images
from clipkit.core.outputs import check_output_file, write_atomic


def embed_folder_distributed(folders, out_path, scorer, batch_size: int = 64, num_workers: int = 0,
                             timeout_s: float | None = 30.0, overwrite: bool = False,
                             cache_dir=None) -> dict | None:
    """Embed the images under ``folders`` into ``out_path`` (safetensors), sharded over the
    processes of ``accelerate launch`` (``PartialState.split_between_processes``).

    Every encoded batch goes to the embedding cache under ``cache_dir`` (None: no cache) as it is
    produced, so an interrupted run resumes where it stopped, and ends with the same file as an
    uninterrupted one. Each process writes its shard beside ``out_path``; after a barrier the main
    process merges the shards in file order into ``out_path`` (atomically: never half a file, never
    through a symlink) and removes them. Returns a summary on the main process, None elsewhere.
    """


    out = check_output_file(out_path, overwrite=overwrite, inputs=folders, what="--out")
    state = partial_state()
    files = scan_images(folders)
    if not files:
        raise InputError("no image files found")
    cache = open_cache(cache_dir, scorer) if cache_dir is not None else None
    index = list(range(len(files)))
    try:
        with state.split_between_processes(index) as mine:
            res = embed_files([files[i] for i in mine], scorer, cache=cache, batch_size=batch_size,
                              num_workers=num_workers, timeout_s=timeout_s)
    finally:
        if cache is not None:
            cache.close()
    shard = out.with_name(f".{out.name}.shard{state.process_index}")
    write_atomic(shard, lambda t: save_safetensors({"embeddings": res.embeddings.contiguous()}, t, metadata={
        "paths": json.dumps(res.paths), "skipped": json.dumps(res.skipped)}), overwrite=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    paths, embs, skipped = [], [], []
    for r in range(state.num_processes):
        sp = out.with_name(f".{out.name}.shard{r}")
        with safe_open(str(sp), "pt") as f:
            meta = f.metadata()
        t = load_file(str(sp))["embeddings"]
        paths += json.loads(meta["paths"])
        skipped += json.loads(meta["skipped"])
        if len(t):
            embs.append(t)
    for r in range(state.num_processes):
        os.remove(out.with_name(f".{out.name}.shard{r}"))
    if not paths:                   # nothing to write: an error, as every other command (exit 2)
        raise InputError(f"none of the {len(files)} image files could be read "
                         f"(e.g. {skipped[0]['path']}: {skipped[0]['reason']}); {out} was not written")
    emb = torch.cat(embs)
    write_atomic(out, lambda t: save_safetensors({"embeddings": emb.contiguous()}, t, metadata={
        "paths": json.dumps(paths), "skipped": json.dumps(skipped), "model": scorer.spec,
        "preprocess": json.dumps(scorer.preprocess.to_dict()),
        "processes": str(state.num_processes)}), overwrite=overwrite)
    return {"count": len(paths), "skipped": skipped, "cached": res.cached}
