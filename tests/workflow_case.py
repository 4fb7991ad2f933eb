"""The tiny twin-experiment case of the workflow tests.

Written by ``benchmarks/twin_case.py``, which the benchmarks share (one ``case.toml`` text).
"""

from twin_case import CASE_TOML, case_toml, write_case

__all__ = ["CASE_TOML", "case_toml", "write_case"]
