"""The verbs of the ``femkin`` command line, one module each (see :mod:`femkin.cli`).

Every module defines ``register(subparsers)``, which adds the verb's parser and sets ``func`` to
its ``run(args)``; the numerics they call live in the library.
"""
