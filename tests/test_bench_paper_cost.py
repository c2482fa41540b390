"""bench/paper_cost.py: the GPU-hours arithmetic on hand-computed numbers, and its FLOP counts on a tiny T5."""

import importlib.util
from pathlib import Path

import pytest
import torch

from readlib import backbones, costs, methods
from readlib.train import task_loss

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "paper_cost.py"
spec = importlib.util.spec_from_file_location("paper_cost", SCRIPT)
paper_cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_cost)

# READ Section 3.2 training-split sizes of the seven Table 1 tasks (official GLUE train sizes; 1000 rows held out
# as validation where there are 10k or more): cola, mnli, qnli - 1000, mrpc, qqp - 1000, sst2 - 1000, stsb
TRAIN_SIZES = (8551, 392702, 104743 - 1000, 3668, 363846 - 1000, 67349 - 1000, 5749)


def test_gpu_hours_by_hand():
    # 1e12 FLOPs x 3600 examples x 2 epochs x 5 runs = 3.6e16 FLOPs; at 100 TFLOP/s 360 s = 0.1 h
    assert paper_cost.gpu_hours(1e12, 3600, 2, 5, 100.0) == pytest.approx(0.1, rel=1e-12)


def test_task_hours_adds_training_cache_fill_validation_and_test():
    flops = {"train": 2e12, "once": 1e12, "score": 4e12}
    sizes = {"train": 900, "validation": 90, "test": 180}
    # per run: 2e12 x 900 x 3 epochs + 1e12 x 900 (cache fill) + 4e12 x 90 x 4 (before training and after each
    # epoch) + 4e12 x 180 (test) = 5.4e15 + 0.9e15 + 1.44e15 + 0.72e15 = 8.46e15; 2 runs at 1 TFLOP/s: 16920 s
    assert paper_cost.task_hours(flops, sizes, 3, 2, 1.0) == pytest.approx(16920 / 3600, rel=1e-12)


def test_hours_table_totals_v100_row_and_seven_method_column():
    # 3.6e15 FLOPs per training example, one epoch, one run, 1 TFLOP/s sustained: hours = training examples
    names = (*paper_cost.METHODS, paper_cost.READ_NO_CACHE)
    flops = {m: {"train": 3.6e15, "once": 0.0, "score": 0.0} for m in names}
    table = paper_cost.hours_table(flops, 1, 1, 2.0, 0.5).set_index("task")
    assert list(table.index) == ["cola", "mnli", "qnli", "mrpc", "qqp", "sst2", "stsb", "total", "total on V100"]
    assert table["full"].iloc[:7].tolist() == pytest.approx(TRAIN_SIZES, rel=1e-12)
    assert table.loc["total", "lst"] == pytest.approx(943608, rel=1e-12)
    assert table.loc["total on V100", "read"] == pytest.approx(943608 * 2 / 125, rel=1e-12)  # same utilization
    assert table.loc["total", "7 methods"] == pytest.approx(7 * 943608, rel=1e-12)  # READ cache-off left out


@pytest.fixture(scope="module")
def tiny_flops():
    """FLOPs per example of full fine-tuning and READ on a tiny T5, 16 source and 3 target tokens."""
    counts = [paper_cost.method_flops(name, "random-t5-tiny", 16, 3) for name in ("full", "read")]
    return counts[0] | counts[1]


def test_read_cache_split_adds_up(tiny_flops):
    cached, uncached = tiny_flops["read"], tiny_flops[paper_cost.READ_NO_CACHE]
    assert cached["once"] > 0 and cached["train"] > 0
    assert cached["once"] + cached["train"] == uncached["train"]  # backbone pass + side network = one READ step
    assert uncached["once"] == 0 and cached["score"] == uncached["score"]


def test_meta_counts_equal_real_tensor_counts(tiny_flops):
    torch.manual_seed(0)
    model = methods.build("full", backbones.load("random-t5-tiny"), 2).train()
    batch = paper_cost.BATCH
    ids, targets = torch.randint(5, 1000, (batch, 16)), torch.randint(5, 1000, (batch, 3))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": targets}
    train = costs.count_flops(lambda: task_loss(model(**inputs), targets, False).backward())
    model.eval()
    with torch.no_grad():
        score = sum(costs.count_flops(lambda t=t: model(**inputs | {"decoder_input_ids": targets[:, :t]}))
                    for t in (1, 2, 3))
    assert tiny_flops["full"] == {"train": train / batch, "once": 0.0, "score": score / batch}
