"""The CLIP scoring core: registry, scorer, preprocessing, prompts, losses, robust image I/O."""
