"""Trainable parameters per method on the T5 architectures, next to READ's Table 1 / Table 4 figures.

    python bench/parameters.py                                     # T5-base
    python bench/parameters.py --backbones random-t5-small,random-t5-base,random-t5-large,random-t5-3b

Models are built on PyTorch's meta device (shapes only), each method at its defaults (READ Table 7's final
architectures: READ GRU/256, Adapter 64, LoRA 32, prompt 20, LST side dim 96), text-to-text as in the paper,
plus two variants that explain the paper's figures: ``adapter:attention=false`` (one adapter per block, which
gives Table 1's 0.96 %) and ``lst:drop_every=0`` (no layer dropping, READ Table 4's 5.04 M). ``--methods``
takes any list of ``method[:key=value,...]``.
"Percent" uses the paper's denominator: the backbone with its tied LM head counted a second time (247.58 M
for T5-base, Table 4). Written to ``outputs/tables/parameters.{csv,md,tex}``.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from readlib import methods
from readlib.errors import ConfigError
from readlib.paper import READ_T5_BASE_PARAMS
from readlib.report import write_table
from readlib.scaling import trainable_parameters

VARIANTS = ["adapter:attention=false", "lst:drop_every=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="random-t5-base")
    parser.add_argument("--methods", default=",".join([*methods.METHODS, *VARIANTS]))
    args = parser.parse_args()
    rows = []
    for backbone in args.backbones.split(","):
        for spec in args.methods.split(","):
            method, hparams = methods.parse_variant(spec)
            try:
                counts = trainable_parameters(method, backbone, hparams)
            except ConfigError as err:
                print(f"{spec} on {backbone}: not applicable: {err}")
                continue
            trainable = counts["backbone"] if method == "full" else counts["trainable"]  # paper: untied count
            paper = READ_T5_BASE_PARAMS.get(spec, (None, None)) if backbone == "random-t5-base" else (None, None)
            rows.append({"backbone": backbone, "method": spec, "trainable_M": trainable / 1e6,
                         "percent": 100 * trainable / counts["backbone"],
                         "paper_M": paper[0], "paper_percent": paper[1]})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-"))
    paths = write_table(table, "parameters", "Trainable parameters per method (meta device); paper: READ Tables 1, 4")
    print(f"written: {paths['csv']} (and .md, .tex)")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # bad method, variant or backbone: one line, before any model is built
        sys.exit(f"error: {err}")
