"""RankFed: federated LoRA fine-tuning where every device trains at the rank it can afford."""

__version__ = "0.1.0"
