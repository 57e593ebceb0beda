"""Harnesses: what is run on purpose, never by the product.

Benchmarks (``edgestream bench ...``), chaos, soak, attack and fuzz runs, the
canned worker engines they use and a delaying relay for multi-host tests. They
start the real gateway and workers as processes or in-process servers, so this
is the one place (with :mod:`gateway.cli`) that imports both ``gateway`` and
``workers``; the import contract in ``pyproject.toml`` keeps product code from
importing it.
"""
