"""The papers' scenarios computed from shapes: parameters, training and inference memory, latency vs model size.

Models are ``random-*`` architectures (READ Table 6's T5 sizes, BERT-base and OPT-1.3B of TokenTune Table 1) with
random weights, built through ``methods.build`` like every run. Memory is counted on PyTorch's meta device (no
weights, any size) with the meters of ``readlib.costs``, and measured on real tensors where a size fits; these
numbers depend on shapes only. Tables come with the papers' numbers from ``readlib.paper`` beside ours.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import pandas as pd
import torch
import torch.fx.experimental._config as fx_config
import transformers
import transformers.masking_utils as masking_utils
from torch import nn
from tqdm.auto import tqdm

from readlib import backbones, costs, methods, paper
from readlib.methods import selective
from readlib.train import task_loss

MASK_HELPERS = ("_ignore_bidirectional_mask_sdpa", "_ignore_causal_mask_sdpa")  # transformers.masking_utils


def trainable_parameters(method: str, backbone: str, method_args: dict | None = None, num_labels: int = 2,
                         formulation: str | None = None) -> dict[str, int]:
    """Parameter counts of ``method`` on ``backbone``, without allocating weights.

    ``random-t5-*`` architectures are built on the meta device (T5-3B costs no memory). Returns
    ``trainable``, ``total`` (every parameter once; T5's tied embedding/LM head once) and ``backbone``
    (the frozen model's own parameters, with a tied LM head counted a second time, as READ Table 4's
    247.58 M for T5-base does — the denominator of the paper's "trainable params (%)").
    """
    bb = backbones.load(backbone, formulation=formulation, meta=backbone.startswith("random-t5-"))
    own = sum(p.numel() for p in bb.model.parameters())
    head = bb.model.get_output_embeddings() if bb.formulation == "text-to-text" else None
    tied = head is not None and head.weight is bb.model.get_input_embeddings().weight
    trainable, total = methods.count_parameters(methods.build(method, bb, num_labels, method_args))
    return {"trainable": trainable, "total": total, "backbone": own + (head.weight.numel() if tied else 0)}


@contextlib.contextmanager
def shape_only_forward() -> Iterator[None]:
    """Let a forward run on the meta device, for a batch of full-length sequences.

    The one place readlib patches transformers' private functions. Two data-dependent calls stop a meta forward:
    transformers' bidirectional and causal mask helpers ask whether the padding mask is all ones (``.all()``;
    answered "no", so the mask is applied — values change nothing on meta), and ``nonzero`` (READ gathers real
    tokens; all of them are real here, which is what PyTorch's flag assumes).
    """
    missing = [name for name in MASK_HELPERS if not hasattr(masking_utils, name)]
    if missing:
        raise RuntimeError(f"transformers {transformers.__version__} has no masking_utils.{', '.join(missing)}; "
                           "readlib.scaling.shape_only_forward must learn its new mask helpers")
    originals = {name: getattr(masking_utils, name) for name in MASK_HELPERS}
    for name in MASK_HELPERS:
        setattr(masking_utils, name, lambda *args, **kwargs: False)
    try:
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            yield
    finally:
        for name, original in originals.items():
            setattr(masking_utils, name, original)


def meta_step(method: str, backbone: str, batch: int, seq: int, target: int = 4, method_args: dict | None = None
              ) -> tuple[nn.Module, Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(model, run, loss) of one training step of ``method`` on a ``random-*`` architecture on the meta device:
    ``run()`` is the model's forward, ``loss(run())`` the training loss.

    T5: text-to-text with ``target`` decoder tokens; BERT: classification (2 classes); decoder-only LMs (OPT, GPT-2,
    Llama, Qwen2): the next-token loss at every position (language-model fine-tuning, as TokenTune Table 1; selective
    computes it inside ``run``). All tokens are real.
    """
    bb = backbones.load(backbone, meta=True)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    mask = torch.ones_like(ids)
    extra = {}
    if method == "selective":  # positions drawn on the CPU: only their count (k + 1 per row) matters on meta
        k = methods.make_config(method, method_args).k
        extra["selection"] = tuple(t.to("meta") for t in selective.select_positions(torch.ones(batch, seq), k))
    with torch.device("meta"):
        model = methods.build(method, bb, 2, method_args).train()
    if bb.formulation == "causal-lm" and method == "selective":
        return model, lambda: model(ids, mask, ids, **extra), lambda loss: loss
    if bb.formulation == "causal-lm":  # logits at every position, as transformers' causal-LM loss computes them
        targets = torch.ones_like(ids, dtype=torch.bool)
        labels = torch.zeros(batch * seq, dtype=torch.long, device="meta")
        return model, lambda: model(ids, mask, targets), lambda logits: task_loss(logits, labels, regression=False)
    inputs = {"input_ids": ids, "attention_mask": mask}
    labels = torch.zeros(batch, dtype=torch.long, device="meta")
    if bb.formulation == "text-to-text":
        inputs["decoder_input_ids"] = labels = torch.zeros(batch, target, dtype=torch.long, device="meta")
    elif not backbone.startswith("random-t5-"):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return model, lambda: model(**inputs, **extra), lambda logits: task_loss(logits, labels, regression=False)


def computed_phase_memory(method: str, backbone: str, batch: int, seq: int, target: int = 4,
                          method_args: dict | None = None) -> dict:
    """``costs.phase_memory`` of one AdamW step of ``method`` on a ``random-*`` architecture (T5, BERT or OPT),
    computed on the meta device: no memory, no weights, any size. ``batch`` x ``seq`` real tokens."""
    with shape_only_forward():
        model, run, loss = meta_step(method, backbone, batch, seq, target, method_args)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        out = costs.phase_memory(model, lambda: loss(run()), optimizer)
    return out | {"method": method, "backbone": backbone, "batch": batch, "seq": seq}


def computed_training_memory(method: str, backbone: str, batch: int, seq: int, target: int = 4,
                             method_args: dict | None = None) -> dict:
    """Training-memory breakdown in bytes (weights, stored activations, gradients, AdamW state) of one step of
    ``method`` on a ``random-*`` architecture (T5 text-to-text, BERT classification, OPT causal LM), computed
    on the meta device: no memory, no weights, any size. ``batch`` sequences of ``seq`` source and ``target``
    decoder tokens, all real. Activations: what the model's forward stores (the loss on its output excluded)."""
    with shape_only_forward():
        model, run, _ = meta_step(method, backbone, batch, seq, target, method_args)
        with costs.SavedTensorMeter(model) as meter:
            run()
    trained = costs.parameter_bytes(model, trainable_only=True)
    steps = 4 * sum(1 for p in model.parameters() if p.requires_grad)  # AdamW's float32 step count per tensor
    parts = {"weights": costs.parameter_bytes(model), "activations": meter.bytes, "gradients": trained,
             "optimizer": 2 * trained + steps}
    return {"accounted": parts, "accounted_total": sum(parts.values()), "batch": batch, "seq": seq, "target": target}


def _t5_inputs(batch: int, seq: int, target: int) -> dict[str, torch.Tensor]:
    """Random token ids for a T5 text-to-text batch, every token real (draws from torch's global RNG)."""
    ids = torch.randint(5, 1000, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "decoder_input_ids": torch.randint(5, 1000, (batch, target))}


def measured_training_memory(method: str, backbone: str, batch: int, seq: int, target: int = 4) -> dict[str, int]:
    """The same breakdown as ``computed_training_memory``, measured on real tensors (one AdamW step, seed 0) of a
    ``random-t5-*`` architecture small enough for this machine; bytes per part."""
    torch.manual_seed(0)
    model = methods.build(method, backbones.load(backbone), 2).train()
    inputs = _t5_inputs(batch, seq, target)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with costs.SavedTensorMeter(model) as meter:
        logits = model(**inputs)
    logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    return {"weights": costs.parameter_bytes(model), "activations": meter.bytes,
            "gradients": costs.parameter_bytes(model, trainable_only=True),
            "optimizer": costs.optimizer_state_bytes(optimizer)}


# ---------------------------------------------------------------- READ Section 4: scaling over T5 sizes


def t5_names(sizes: list[str]) -> list[str]:
    return [f"random-t5-{s}" for s in sizes]


def parameters_by_size(sizes: list[str]) -> pd.DataFrame:
    """READ Figure 5 (left): trainable and backbone parameters (millions) of every text-to-text method per T5 size."""
    rows = []
    for size, backbone in zip(sizes, t5_names(sizes), strict=True):
        for name in methods.METHODS:
            if methods.supports(name, "text-to-text"):
                counts = trainable_parameters(name, backbone)
                rows.append({"backbone": size, "method": name, "trainable_M": counts["trainable"] / 1e6,
                             "backbone_M": counts["backbone"] / 1e6})
    return pd.DataFrame(rows)


def training_memory_by_size(sizes: list[str], names: list[str], batch: int, seq: int, target: int,
                            measure: list[str] = ()) -> pd.DataFrame:
    """READ Figure 5 (right): the training-memory breakdown (GiB) per method and T5 size, computed on the meta
    device for every size (``source`` "computed (meta)") and measured on this machine for ``measure`` sizes."""
    rows = []
    for size, backbone in zip(sizes, t5_names(sizes), strict=True):
        for name in names:
            computed = computed_training_memory(name, backbone, batch, seq, target)
            rows.append({"backbone": size, "method": name, "source": "computed (meta)",
                         **{k: costs.in_unit(v, "GiB") for k, v in computed["accounted"].items()},
                         "total_GiB": costs.in_unit(computed["accounted_total"], "GiB")})
    for size in measure:
        for name in names:
            parts = measured_training_memory(name, f"random-t5-{size}", batch, seq, target)
            rows.append({"backbone": size, "method": name, "source": "measured (CPU)",
                         **{k: costs.in_unit(v, "GiB") for k, v in parts.items()},
                         "total_GiB": costs.in_unit(sum(parts.values()), "GiB")})
    return pd.DataFrame(rows)


def latency_by_size(sizes: list[str], names: list[str], seq: int, target: int, repeats: int) -> pd.DataFrame:
    """READ Figure 6 / Table 4: median inference latency (s) of one forward pass at batch 1 per method and size,
    on this machine with random weights. Per size the methods' models are built side by side (memory: all of them
    at once) and timed on the same batch by ``costs.interleaved_latency`` (2 warm-up calls each, then ``repeats``
    rounds of one call per method), so that the machine's drift does not favour the method timed last."""
    rows = []
    for size in sizes:
        models = {}
        for name in names:  # a fresh backbone each: several methods change it in place
            torch.manual_seed(0)
            models[name] = methods.build(name, backbones.load(f"random-t5-{size}"), 2).eval()
        inputs = _t5_inputs(1, seq, target)
        with torch.no_grad():
            calls = {name: functools.partial(model, **inputs) for name, model in models.items()}
            timing = costs.interleaved_latency(calls, warmup=2, repeats=repeats)
        rows += [{"backbone": size, "method": name, "latency_s": timing[name]["median_s"]} for name in names]
    return pd.DataFrame(rows, columns=["backbone", "method", "latency_s"])


def table4(parameters: pd.DataFrame, memory: pd.DataFrame, latency: pd.DataFrame) -> pd.DataFrame:
    """READ Table 4 (T5-base): our computed memory (GiB), trainable parameters (M) and latency (s) next to the
    paper's, with memory relative to full fine-tuning on both sides (only ratios compare: the paper's memory is a
    CUDA peak at its batch size)."""
    base = memory[(memory.backbone == "base") & (memory.source == "computed (meta)")][["method", "total_GiB"]]
    ours = base.merge(parameters[parameters.backbone == "base"][["method", "trainable_M"]], on="method")
    if "base" in set(latency.backbone):
        ours = ours.merge(latency[latency.backbone == "base"][["method", "latency_s"]], on="method")
    theirs = pd.DataFrame([{"method": m, "paper_memory_GB": v["memory_gb"], "paper_params_M": v["params_m"],
                            "paper_inference_s": v["inference_s"]} for m, v in paper.READ_TABLE4.items()])
    table = ours.merge(theirs, on="method")
    table["memory_vs_full"] = table.total_GiB / table.set_index("method").loc["full", "total_GiB"]
    table["paper_memory_vs_full"] = table.paper_memory_GB / paper.READ_TABLE4["full"]["memory_gb"]
    return table


def inference_memory_by_size(sizes: list[str], seq: int, target: int) -> pd.DataFrame:
    """READ Table 2 / Figure 6 (right): peak memory (GB, 1e9 bytes) of one forward pass without gradients at
    batch 1, computed on the meta device, next to the paper's; growth over full fine-tuning in % on both sides."""
    rows = []
    for size, backbone in zip(sizes, t5_names(sizes), strict=True):
        for name, paper_gb in paper.READ_TABLE2_GB.items():
            peak = computed_phase_memory(name, backbone, 1, seq, target)["cumulative"]["forward_no_grad"]
            known = size in paper.TABLE2_SIZES
            rows.append({"backbone": size, "method": name, "inference_GB": costs.in_unit(peak, "GB"),
                         "paper_GB": paper_gb[paper.TABLE2_SIZES.index(size)] if known else float("nan")})
    table = pd.DataFrame(rows)
    full = table[table.method == "full"].set_index("backbone")
    table["growth_pct"] = 100 * (table.inference_GB / table.backbone.map(full.inference_GB) - 1)
    table["paper_growth_pct"] = 100 * (table.paper_GB / table.backbone.map(full.paper_GB) - 1)
    return table


# ---------------------------------------------------------------- TokenTune Table 1 and Figure 2 (left)

TOKENTUNE_VARIANTS = {"full": ("full", None), "lora": ("lora", None), "lst": ("lst", None),
                      "selective": ("selective", None), "selective+lora": ("selective", {"lora_rank": 32}),
                      "read": ("read", None)}


def tokentune_phases(encoder: str, seq: int, progress: bool = True) -> dict[tuple[str, str], dict]:
    """TokenTune Table 1's setups, computed: ``computed_phase_memory`` per (model, method) for BERT-base
    (``encoder``) at batch 256 and OPT-1.3B at batch 1, full fine-tuning, LoRA, selective (k = 16) and, on OPT,
    selective + LoRA (rank 32)."""
    opt = "random-opt-1.3b"
    setups = {("bert", "full"): ("full", encoder, 256, None), ("bert", "lora"): ("lora", encoder, 256, None),
              ("bert", "selective"): ("selective", encoder, 256, None),
              ("opt", "full"): ("full", opt, 1, None), ("opt", "lora"): ("lora", opt, 1, None),
              ("opt", "selective"): ("selective", opt, 1, None),
              ("opt", "selective+lora"): ("selective", opt, 1, {"lora_rank": 32})}
    return {key: computed_phase_memory(m, bb, b, seq, method_args=args)
            for key, (m, bb, b, args) in tqdm(setups.items(), desc="Table 1", disable=not progress)}


def memory_vs_batch(encoder: str, batches: list[int], seq: int, progress: bool = True) -> pd.DataFrame:
    """TokenTune Figure 2 (left): peak training memory (bytes, the cumulative optimizer-step row) of one step per
    method variant and batch size on ``encoder``, computed on the meta device."""
    rows = []
    for name, (method, args) in tqdm(TOKENTUNE_VARIANTS.items(), desc="memory vs batch", disable=not progress):
        for b in batches:
            result = computed_phase_memory(method, encoder, b, seq, method_args=args)
            rows.append({"method": name, "batch": b, "peak_bytes": result["cumulative"]["optimizer"]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- a decoder-only LM at 7B scale, quantized or not

# QLoRA (Dettmers et al. 2023, Section 3): NF4 weights (4 bits) in blocks of 64, each block's absmax constant quantized
# to 8 bits ("double quantization") in blocks of 256 with one float32 constant each: 4 + 8/64 + 32/(64 x 256) bits.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
DECODER_SETTINGS = (  # (setting, method, 4-bit backbone)
    ("full fine-tuning", "full", False),
    ("LoRA", "lora", False),
    ("LoRA, 4-bit backbone (QLoRA-style)", "lora", True),
    ("READ, bf16 backbone", "read", False),
    ("READ, 4-bit backbone", "read", True),
)


def decoder_training_memory(backbone: str = "random-llama-7b", batch: int = 8, seq: int = 512, lora_rank: int = 16,
                            progress: bool = True) -> pd.DataFrame:
    """Training memory of one step per setting of ``DECODER_SETTINGS`` on a decoder-only ``random-*`` LM, computed
    from shapes on the meta device (no weights; the numbers hold for any weights of that architecture), in bytes.

    Convention (mixed precision, as usually trained): every trained parameter is kept in float32 with a float32
    gradient and AdamW's two float32 moments (16 bytes); every frozen parameter in bfloat16 (2 bytes), or, with a
    4-bit backbone, each frozen ``nn.Linear`` weight of the layers in NF4 (``NF4_BYTES_PER_PARAM``, 0.516 bytes; the
    embeddings, norms and LM head stay bfloat16, as bitsandbytes leaves them). Activations: what one bfloat16 forward
    stores for backward (``costs.SavedTensorMeter``), with the next-token loss at all ``batch`` x ``seq`` positions;
    autocast's cast copies, the loss itself and allocator slack are not counted. LoRA: rank ``lora_rank`` on the query
    and value projections (``readlib.methods.lora``). A 4-bit backbone does not change what is stored for backward:
    LoRA's backward through the frozen layers keeps their bfloat16 inputs either way, and READ keeps nothing of the
    backbone (Section 2.1), so only the weights differ.
    """
    rows = []
    for setting, method, four_bit in tqdm(DECODER_SETTINGS, desc="settings", disable=not progress):
        args = {"rank": lora_rank} if method == "lora" else None
        with shape_only_forward():
            model, run, _ = meta_step(method, backbone, batch, seq, method_args=args)
            model.to(torch.bfloat16)
            with costs.SavedTensorMeter(model) as meter:
                run()
        params = {id(p): p for p in model.parameters()}.values()
        trained = sum(p.numel() for p in params if p.requires_grad)
        frozen = {id(p): p.numel() for p in params if not p.requires_grad}
        head = {id(m.get_output_embeddings().weight) for m in model.modules()
                if isinstance(m, transformers.PreTrainedModel) and m.get_output_embeddings() is not None}
        quantized = {id(m.weight) for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad
                     and id(m.weight) not in head} if four_bit else set()
        weights = 4 * trained + sum(n * (NF4_BYTES_PER_PARAM if i in quantized else 2) for i, n in frozen.items())
        label = setting.replace("LoRA", f"LoRA (rank {lora_rank})", 1)
        rows.append({"setting": label, "method": method, "backbone_bits": 4 if four_bit else 16,
                     "trainable_params": trained, "trainable_percent": 100 * trained / (trained + sum(frozen.values())),
                     "weights": round(weights), "activations": meter.bytes, "gradients": 4 * trained,
                     "optimizer": 8 * trained})
    table = pd.DataFrame(rows)
    table["total"] = table[["weights", "activations", "gradients", "optimizer"]].sum(axis=1)
    return table.assign(backbone=backbone, batch=batch, seq=seq, source="computed from shapes (meta device)")


def decoder_parameters(names: list[str], methods_: tuple[str, ...] = ("full", "lora", "read"), lora_rank: int = 16
                       ) -> pd.DataFrame:
    """Trainable and total parameters of ``methods_`` on decoder-only ``random-*`` LMs, built on the meta device (no
    weights, any size; LoRA at rank ``lora_rank``): one row per (backbone, method)."""
    rows = []
    for name in names:
        for method in methods_:
            bb = backbones.load(name, meta=True)
            with torch.device("meta"):
                model = methods.build(method, bb, 2, {"rank": lora_rank} if method == "lora" else None)
            trainable, total = methods.count_parameters(model)
            rows.append({"backbone": name, "method": method, "trainable": trainable, "total": total,
                         "trainable_percent": 100 * trainable / total})
    return pd.DataFrame(rows)
