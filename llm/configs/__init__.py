"""DeepSpeed configs shipped with Tessera: ZeRO stages 0-3 and ZeRO-3 with CPU offload.

Batch sizes, gradient clipping and bf16 are filled in from ``TrainConfig`` by
``llm/train.py``; a user config may leave them out or must agree with it.
"""
