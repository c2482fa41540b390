"""readlib: READ (Recurrent Adaptation of Large Transformers) and selective fine-tuning, reproduced on GLUE."""

__version__ = "0.1.0"
