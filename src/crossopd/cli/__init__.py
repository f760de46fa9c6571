"""The ``crossopd`` command line: one module per command."""
