"""Data parallelism with two CPU processes (torchrun, gloo): each process takes half of every optimizer step's
examples, and the gradients summed over processes equal one process's gradients of the whole step; evaluation is
sharded and gathered, with metrics identical to one process's.

Adam's first step turns float noise into sign flips (lr · g/|g|), so two runs' weights drift apart whatever the
processes do; the gradients are therefore compared at every step from the same weights: the ones the two-process
run had before that step.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENV, no_dropout

from readlib import train
from readlib.params import make_params

HERE = Path(__file__).resolve().parent

CASES = {
    # READ from its hidden-state cache: 2 epochs x 2 steps of 32 = 2 processes x 2 micro-batches of 8
    "read": dict(task="rte", method="read", max_train=64, max_eval=24, max_epochs=2, batch_size=32,
                 micro_batch_size=8, dropout=0.0, device="cpu", patience=2),
    # full fine-tuning of MiniLM on STS-B (regression): a step of 12 is 6 + 6, one micro-batch each
    "full": dict(task="stsb", method="full", max_train=24, max_eval=16, max_epochs=1, batch_size=12,
                 micro_batch_size=8, dropout=0.0, device="cpu", lr=1e-4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_sum_to_one_process_gradients_and_metrics(case, tmp_path):
    overrides = CASES[case]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "distributed_capture.py"), str(tmp_path), json.dumps(overrides)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["record"]["processes"] == 2
    energy = ranks[0]["record"]["energy"]  # costs.sum_energy of both processes' meters (here: CPU, no GPU metered)
    assert all(len(energy[source]["ranks"]) == 2 for source in ("nvml_counter", "paper_eq4", "rapl"))
    assert energy["nvml_counter"]["kwh"] is None and "cpu" in energy["nvml_counter"]["reason"]
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):  # both processes take the same step
        assert torch.equal(a["ids"], b["ids"]) and a["loss"] == b["loss"]
        assert all(torch.equal(x, y) for x, y in zip(a["grads"], b["grads"], strict=True))

    params = make_params("quick", **overrides)
    task, raw, info = train.load_data(params)
    run = no_dropout(train.build_model(params, task, raw, info))  # this test's process: a single-process run
    train.build_caches(run, progress=False)
    record = ranks[0]["record"]
    # sharded, gathered evaluation: the same metrics as one process, before training (step 0) and on test
    assert run.score("validation") == record["step0_validation"]
    trained = [p for p in run.model.parameters() if p.requires_grad]
    steps = ranks[0]["steps"]
    assert len(steps) == {"read": 4, "full": 2}[case]
    for k, captured in enumerate(steps):
        with torch.no_grad():
            for p, w in zip(trained, captured["before"], strict=True):
                p.copy_(w)
        run.model.zero_grad(set_to_none=True)
        run.model.train()
        loss = train.train_step(run, captured["ids"], trained, None)
        ours = torch.cat([p.grad.flatten() for p in trained])
        theirs = torch.cat([g.flatten() for g in captured["grads"]])
        # summation order differs (two partial sums, other padding widths): float32 noise, far below a real
        # error (a missing process's share halves the gradient; a wrong weight is off by the share, >= 1/4)
        scale = theirs.abs().max().item()
        assert scale > 0
        diff = (ours - theirs).abs().max().item()
        print(f"{case} step {k}: max |grad difference| {diff:.3g} (max |grad| {scale:.3g})")
        assert diff <= 1e-4 * scale, f"step {k}"
        assert loss == pytest.approx(captured["loss"], rel=1e-4)
    run.model.load_state_dict(ranks[0]["best_state"], strict=False)
    assert record["test"] is not None and run.score("test") == record["test"]
