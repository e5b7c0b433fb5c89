"""Example third-party Tessera plugin: multichannel sensor time series tokenized with FSQ.

Installed with ``pip install -e examples/plugin-template``; Tessera finds
:class:`SensorTokenizer` through the entry point ``sensor`` in the group
``tessera.modalities`` (see pyproject.toml and docs/plugins.md).
"""

from .tokenizer import SensorConfig, SensorTokenizer, TrainConfig, split_chunks, train

__all__ = ["SensorConfig", "SensorTokenizer", "TrainConfig", "split_chunks", "train"]
