from clipkit.shapes.probes import reference_accuracy


def test_reference_accuracy_of_the_bundled_clip(shapes_scorer):
    """The WiSE-FT reference task: Shapes zero-shot on single-object test renders."""
    acc = reference_accuracy(shapes_scorer, n=64, attributes=("color", "shape"))
    assert acc == {"color": 1.0, "shape": 1.0}
