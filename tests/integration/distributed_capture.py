"""Started by tests/integration/test_distributed.py under torchrun: one ``train.fit`` whose every optimizer step is
captured (the trained weights before it, its example ids, the gradients after the processes' sum), with the best
checkpoint and the record, into ``<out>/rank<N>.pt``. Every dropout is switched off (``helpers.no_dropout``), so the
processes draw no random numbers that one process would draw differently.

    python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_capture.py OUT '{"task": "rte", ...}'
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
from helpers import no_dropout  # noqa: E402

from readlib import train
from readlib.params import make_params

out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
steps, best = [], {}
train_step, score_test, build_model = train.train_step, train.score_test, train.build_model


def capturing_step(run, step, trained, meter, scaler=None):
    before = [p.detach().clone() for p in trained]
    loss = train_step(run, step, trained, meter, scaler)
    steps.append({"ids": step.clone(), "before": before, "grads": [p.grad.detach().clone() for p in trained],
                  "loss": loss})
    return loss


def capturing_test(run, training):
    best.update(training.best_state or {})
    return score_test(run, training)


train.train_step, train.score_test = capturing_step, capturing_test
train.build_model = lambda *args: no_dropout(build_model(*args))
record = train.fit(make_params("quick", **overrides), progress=False)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save({"steps": steps, "best_state": best, "record": record}, out / f"rank{rank}.pt")
