"""readlib: READ (Recurrent Adaptation of Large Transformers) and selective fine-tuning, reproduced on GLUE.

``readlib.load(path)`` returns a trained model saved with ``--save_dir`` (``readlib.serve.load``); it is resolved on
first use (PEP 562), so ``import readlib`` stays light and the package's layers stay acyclic.
"""

import importlib

__version__ = "0.1.0"
LAZY = {"load": "readlib.serve"}  # public name -> module that defines it


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'readlib' has no attribute '{name}'")
