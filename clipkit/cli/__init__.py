"""The clipkit command line: thin click modules, imported lazily (``clipkit --help`` never imports torch)."""
