"""Small helpers shared by several test modules."""

import os

import datasets
import optuna
import torch

from readlib import backbones, sweep
from readlib.costs import SavedTensorMeter
from readlib.params import make_params
from readlib.train import fit


def randomize(module, std=0.1, seed=0):
    """Fresh random weights; on READ's side networks this moves W_o off its zero initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def train_steps(model, batch, labels, loss_fn, lr, steps=15):
    """(loss before, loss after) ``steps`` AdamW steps on one batch; both losses in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def loss():
        return loss_fn(model(**batch), labels)

    model.eval()
    with torch.no_grad():
        first = loss().item()
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return first, loss().item()


def assert_restores(restored, trained, saved_path, state, batch):
    """Loading the saved trained state into a freshly built model reproduces the trained model's outputs."""
    with torch.no_grad():
        assert not torch.equal(restored(**batch), trained(**batch))
        result = restored.load_state_dict(torch.load(saved_path), strict=False)
        assert result.unexpected_keys == []
        assert set(result.missing_keys) == set(restored.state_dict()) - set(state)  # only the frozen backbone
        assert torch.equal(restored(**batch), trained(**batch))
        return result


def own_copy(backbone):
    """A deep copy, for methods that change the backbone they get (the session fixture must stay as it is)."""
    import copy
    import dataclasses

    return dataclasses.replace(backbone, model=copy.deepcopy(backbone.model))


def t5_batch(seed=0):
    """A text-to-text batch for a tiny random T5: 3 sources of 7 tokens (one padded) and 3 x 4 target tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0  # one padded source
    labels = torch.randint(5, 1000, (3, 4), generator=gen)
    decoder_input_ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), labels[:, :-1]], 1)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_input_ids}, labels


ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


TINY = {"max_train": 16, "max_eval": 8, "max_epochs": 1}


def spec(**changes):
    values = dict(task="rte", method="bitfit", profile="quick", overrides=dict(TINY), lr_rounds=3, seeds=2)
    return sweep.SweepSpec(**(values | changes))


def trials(url, name):
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


TEXTS = ["The cat sat on the mat.", "A considerably longer sentence, so that the others need padding.", "Short."]


def encode(backbone):
    enc = backbone.tokenizer(TEXTS, PAIRS, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


PAIRS = ["It sat.", "The sentence is long.", "Yes."]


PAIR_TEXTS = ["The cat sat on the mat.", "A considerably longer sentence, so that the others need padding.", "Short."]


def encode_pairs(backbone):
    enc = backbone.tokenizer(PAIR_TEXTS, PAIRS, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


VOCAB = backbones.T5_VOCAB


def t5_text():
    return backbones.load("random-t5-tiny")


def grads_set(model):
    return {n for n, p in model.named_parameters() if p.grad is not None}


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def load_t5(name="random-t5-tiny", seed=0):
    return backbones.load(name, seed=seed)  # T5ForConditionalGeneration (text-to-text is T5's default)


def seq2seq_batch(vocab_lo=1000, vocab_hi=2000):
    """Two source rows of 7 tokens, the second padded after 4 (11 real tokens), and 3 decoder inputs."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab_lo, vocab_hi, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0  # the pad id
    dec = torch.randint(vocab_lo, vocab_hi, (2, 3), generator=gen)
    dec[:, 0] = 0  # T5's decoder start is the pad id
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


def t5_tiny():
    return backbones.load("random-t5-tiny", formulation="classification")


F32 = 4  # bytes per float32


def saved(fn, model=None) -> int:
    with SavedTensorMeter(model) as meter:
        fn()
    return meter.bytes


def saved_tensors(model, inputs: dict) -> list[tuple[int, bool, tuple[int, ...]]]:
    """(storage address, inference tensor?, shape) of every tensor autograd saves in one forward of ``model``."""
    out = []

    def pack(t):
        out.append((t.untyped_storage().data_ptr(), t.is_inference(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return out


CPU = torch.device("cpu")


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rte_rows():
    return datasets.Dataset.from_dict({
        "sentence1": ["A cat sat.", "It rained all day long in the city."],
        "sentence2": ["A cat is sitting.", "The sun shone."],
        "label": [0, 1],  # entailment, not_entailment
        "idx": [0, 1],
    })


SMALL = dict(task="rte", method="read", backbone="minilm", max_train=64, max_eval=32, max_epochs=2,
             batch_size=16, micro_batch_size=8, max_length=32)


def run(on_epoch=None, **overrides):
    return fit(make_params("quick", **(SMALL | overrides)), progress=False, on_epoch=on_epoch)


SENTENCES = [
    "The cat sat on the mat.",
    "A considerably longer sentence, so that the other two in this batch need padding.",
    "Short one.",
]


def encode_sentences(backbone, texts=SENTENCES):
    """Single sentences, padded to the longest: input_ids, attention_mask (and token_type_ids where the model has
    them)."""
    enc = backbone.tokenizer(texts, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def no_dropout(run):
    """A ``train.Run`` with every dropout off: two runs that share weights then compute the same function."""
    for module in run.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return run


def one_error_line(capsys) -> str:
    """The CLI's stderr after bad input: nothing on stdout, exactly one line, ``readlib: error: ...``; returned."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith("readlib: error: ")
    return lines[0]
