"""A package, so its test modules (test_train, test_embed...) may share a basename with the library
module tests they sit beside (tests/captioning/test_train.py) under pytest's default import mode."""
