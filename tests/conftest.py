import pytest
import torch

from readlib import backbones

# One intra-op thread. The CI and development machines have 2 cores shared with other jobs; there,
# two OpenMP threads spin-waiting on each other made the tiny models in these tests 10-100x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm():
    """The bundled MiniLM, loaded once for the whole run.

    Only hand it to methods that keep the backbone frozen; for full fine-tuning deep-copy it first
    (full fine-tuning switches requires_grad on in the backbone it is given).
    """
    return backbones.load("minilm")


@pytest.fixture(scope="session")
def tokenizer():
    """The word-piece tokenizer the random T5s use (no T5 tokenizer is reachable offline)."""
    return backbones.load("random-t5-tiny").tokenizer
