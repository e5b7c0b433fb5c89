"""Tessera: every modality as discrete tokens in one vocabulary.

The repository root is this package: ``core/`` installs as ``tessera.core``,
``modalities/`` as ``tessera.modalities``, ``llm/`` as ``tessera.llm``,
``pipelines/`` as ``tessera.pipelines`` and ``apps/`` as ``tessera.apps``.
Importing :mod:`tessera` imports nothing heavy.
"""

__version__ = "0.1.0"
