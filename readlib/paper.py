"""Every number quoted from the two papers, labelled with its table, figure or section.

READ: Wang et al. 2023, "READ: Recurrent Adaptation of Large Transformers" (arXiv 2305.15348).
TokenTune: Simoulin et al. 2023, "Memory-efficient selective fine-tuning" (ES-FoMo @ ICML 2023).
Tables and notebooks read these constants from here only; nothing here is computed.
"""

# ---------------------------------------------------------------- READ

V100_P0_KW = 0.25  # READ Section 3.4, eq. (4): p0, the power of an NVIDIA V100 32 GB at full utilisation (kW)

TABLE1_TASKS = ("cola", "mnli", "qnli", "mrpc", "qqp", "sst2", "stsb")

# READ Table 1 (T5-base): trainable params (%), an unlabelled column (0.77 for full tuning, so not Table 4's
# 17.86 GB), training energy (kWh), test scores (%, mean of 3 seeds) per task and the printed average. The printed
# average is 0.4-1.5 points above the mean of its seven task columns in every row (full tuning: 84.10 vs 84.52).
READ_TABLE1 = {
    method: dict(zip(("params_pct", "unlabeled", "energy_kwh", *TABLE1_TASKS, "avg"), values, strict=True))
    for method, values in {
        "full": (100, 0.77, 12.52, 53.97, 86.17, 90.87, 86.88, 89.71, 92.89, 88.19, 84.52),
        "adapter": (0.96, 0.50, 6.99, 52.56, 85.68, 92.89, 87.84, 88.95, 93.12, 87.51, 85.04),
        "lora": (0.48, 0.68, 10.58, 51.70, 85.20, 92.72, 88.07, 88.92, 93.46, 86.97, 84.89),
        "bitfit": (0.06, 0.47, 7.68, 50.92, 85.28, 92.58, 86.32, 88.70, 94.15, 86.94, 84.43),
        "prompt": (0.01, 0.50, 6.45, 42.71, 79.38, 91.73, 86.04, 88.74, 93.12, 84.96, 82.38),
        "read": (0.80, 0.43, 2.06, 52.59, 85.25, 92.93, 87.09, 89.10, 93.80, 87.77, 84.97),
    }.items()
}

# READ Table 2: inference memory (GB) per method on T5-small, -base, -large, -3B (GLUE average, GPU).
TABLE2_SIZES = ("small", "base", "large", "3b")
READ_TABLE2_GB = {
    "read": (0.317, 0.966, 2.943, 10.885), "adapter": (0.303, 0.952, 2.936, 10.878),
    "lora": (0.302, 0.948, 2.925, 10.866), "prompt": (0.301, 0.948, 2.925, 10.894),
    "bitfit": (0.301, 0.945, 2.914, 10.855), "full": (0.300, 0.943, 2.912, 10.853),
}

# READ Table 3 (T5-base): test scores (%) of LST next to full tuning and READ, and the printed average.
READ_TABLE3 = {
    method: dict(zip((*TABLE1_TASKS, "avg"), values, strict=True))
    for method, values in {
        "full": (53.97, 86.17, 90.87, 86.88, 89.71, 92.89, 88.19, 84.52),
        "lst": (53.38, 84.53, 92.43, 87.38, 88.31, 92.09, 87.37, 84.58),
        "read": (52.59, 85.25, 92.93, 87.09, 89.10, 93.80, 87.77, 84.97),
    }.items()
}

# READ Table 4 (T5-base): peak training memory (GB, CUDA), trainable parameters (millions; full tuning counts the
# tied LM head a second time: 247.58 M) and inference latency (s).
READ_TABLE4 = {
    "full": {"memory_gb": 17.86, "params_m": 247.58, "inference_s": 0.083},
    "lst": {"memory_gb": 5.77, "params_m": 5.04, "inference_s": 0.165},
    "read": {"memory_gb": 6.90, "params_m": 1.97, "inference_s": 0.093},
}

# READ Table 1 (params %) and Table 4 (params, millions) of every method on T5-base; None where the paper gives none.
READ_T5_BASE_PARAMS = {
    "full": (247.58, 100.0), "adapter": (None, 0.96), "lora": (None, 0.48), "bitfit": (None, 0.06),
    "prompt": (None, 0.01), "read": (1.97, 0.80), "lst": (5.04, 2.00),
}

# READ Table 5: split sizes in thousands (train, test, validation) as printed; RTE is not in the paper.
READ_TABLE5_K = {
    "cola": (8.5, 0.52, 0.52), "sst2": (66.5, 0.9, 1.0), "mrpc": (3.7, 0.2, 0.2), "qqp": (323.4, 40.4, 1.0),
    "stsb": (5.8, 0.8, 0.8), "mnli": (392.7, 9.8, 9.8), "qnli": (99.3, 5.4, 1.0),
}

# READ Table 7: architecture candidates per method, the paper's final choice first (our defaults).
READ_TABLE7_CANDIDATES = {
    "read": [{"rnn": "gru", "hidden": 256}, {"rnn": "gru", "hidden": 128}, {"rnn": "lstm", "hidden": 128}],
    "adapter": [{"bottleneck": 64}, {"bottleneck": 32}, {"bottleneck": 128}],
    "lora": [{"rank": 32}, {"rank": 8}, {"rank": 16}],
    "prompt": [{"n_prompts": 20}, {"n_prompts": 10}, {"n_prompts": 30}],
    "lst": [{"reduction": 8}, {"reduction": 12}, {"reduction": 6}],  # side dim 96, 64, 128 on T5-base (d = 768)
}

# ---------------------------------------------------------------- TokenTune (selective fine-tuning)

TOKENTUNE_CONTEXT_MIB = 780  # TokenTune Table 1: the CUDA context included in every row
# TokenTune Table 1: GPU memory (MiB) after each phase of one training step (weights, forward without gradient,
# forward, backward, optimizer), cumulative, seq 128; BERT-base batch 256, OPT-1.3B batch 1.
TOKENTUNE_TABLE1_MIB = {
    ("bert", "full"): (1250, 2860, 24754, 25242, 25242),
    ("opt", "full"): (5806, 6050, 6290, 11258, 21390),
    ("bert", "lora"): (1250, 2860, 20554, 20948, 20948),
    ("opt", "lora"): (5828, 6072, 6294, 6322, 6322),
}
# TokenTune Section 3.3 / Figure 2 left: peak GPU memory (MiB) of BERT-base on CoLA at batch 512, as its text prints.
TOKENTUNE_FIG2_LEFT_MIB = {"full": {512: 23196}, "selective": {512: 9952}, "selective+lora": {512: 7682}}
# TokenTune Figure 2 right: mean dev score (%) over MRPC and STS-B against k, the values its text prints.
TOKENTUNE_FIG2_RIGHT = {4: 84.8, 32: 88.4, 64: 88.8}
