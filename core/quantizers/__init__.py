"""Tessera's quantizer library: one result type (:class:`QuantizerOutput`), one interface
(:class:`Quantizer`), one file per algorithm. See ``base.py`` for the shared conventions."""

from .base import Quantizer, QuantizerOutput, QuantizerStats, check_input, code_stats, multi_code_stats
from .bsq import BSQ
from .fsq import FSQ
from .grouped import GroupedQuantizer
from .lfq import LFQ
from .residual import ResidualQuantizer
from .vq import VectorQuantizer, VQConfig

__all__ = [
    "Quantizer",
    "QuantizerOutput",
    "QuantizerStats",
    "check_input",
    "code_stats",
    "multi_code_stats",
    "FSQ",
    "LFQ",
    "BSQ",
    "VectorQuantizer",
    "VQConfig",
    "ResidualQuantizer",
    "GroupedQuantizer",
]
