"""The ``tropical`` command line: parse arguments, build library objects, call them, print. No logic of its own."""
