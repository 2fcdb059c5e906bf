"""The Shapes world: a procedural image-caption domain that lets every feature run and be measured offline.

* :mod:`clipkit.shapes.world`  scenes, attributes, captions (deterministic from a seed)
* :mod:`clipkit.shapes.render` batched anti-aliased renderer (torch; CPU or GPU)
* :mod:`clipkit.shapes.oracle` reads attributes back from pixels alone (the judge)
* :mod:`clipkit.shapes.data`   torch datasets with train/val/test splits by seed range
"""
