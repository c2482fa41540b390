"""readlib.scaling: memory computed on the meta device equals the same step measured on real weights; parameter
counts of the papers' architectures; the tables keep the papers' numbers beside ours."""

import pandas as pd
import pytest
import torch
import transformers.masking_utils as masking_utils

from readlib import backbones, costs, methods, paper, scaling
from readlib.costs import SavedTensorMeter, parameter_bytes
from readlib.errors import ConfigError
from readlib.train import task_loss

# ---------------------------------------------------------------- training memory computed on the meta device


@pytest.mark.parametrize("method", ["full", "read", "lst", "lora"])
def test_meta_device_memory_equals_a_real_step(method):
    # the same step on real (random) weights, measured: the meta computation must give the same bytes
    computed = scaling.computed_training_memory(method, "random-t5-tiny", batch=3, seq=10, target=4)
    torch.manual_seed(0)
    model = methods.build(method, backbones.load("random-t5-tiny"), 2).train()
    inputs = {"input_ids": torch.randint(5, 1000, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long),
              "decoder_input_ids": torch.randint(5, 1000, (3, 4))}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with SavedTensorMeter(model) as meter:
        logits = model(**inputs)
    logits.sum().backward()
    optimizer.step()
    measured = {"weights": parameter_bytes(model), "activations": meter.bytes,
                "gradients": sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None),
                "optimizer": costs.optimizer_state_bytes(optimizer)}
    assert computed["accounted"] == measured


@pytest.mark.parametrize("method", ["full", "lora", "lst"])
def test_computed_phase_memory_equals_the_same_step_on_real_weights(method):
    computed = scaling.computed_phase_memory(method, "random-bert-tiny", batch=3, seq=10)
    torch.manual_seed(0)
    model = methods.build(method, backbones.load("random-bert-tiny"), 2).train()
    ids = torch.randint(1000, 2000, (3, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    labels = torch.zeros(3, dtype=torch.long)
    with scaling.shape_only_forward():  # the padding mask applied, as on meta (it changes no value)
        measured = costs.phase_memory(model, lambda: task_loss(model(**inputs), labels, False), optimizer)
    assert computed["peak"] == measured["peak"] and computed["after"] == measured["after"]
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert computed["after"]["optimizer"] - computed["after"]["backward"] == 2 * trained + 4 * len(optimizer.state)


def test_computed_phase_memory_decoder_only_methods():
    full = scaling.computed_phase_memory("full", "random-opt-tiny", batch=2, seq=16)
    lora = scaling.computed_phase_memory("lora", "random-opt-tiny", batch=2, seq=16)
    sel = scaling.computed_phase_memory("selective", "random-opt-tiny", batch=2, seq=16, method_args={"k": 4})
    params = list(backbones.load("random-opt-tiny", meta=True).model.parameters())  # embedding and head tied
    weights = sum(p.numel() * 4 for p in params)
    assert full["after"]["optimizer"] - full["after"]["backward"] == 2 * weights + 4 * len(params)
    assert lora["cumulative"]["optimizer"] < full["cumulative"]["optimizer"]
    assert sel["peak"]["forward"] < full["peak"]["forward"]
    read = scaling.computed_phase_memory("read", "random-opt-tiny", batch=2, seq=16)
    trained = [p for p in meta_read_parameters() if p.requires_grad]
    assert read["after"]["optimizer"] - read["after"]["backward"] == sum(2 * p.numel() * 4 + 4 for p in trained)
    with pytest.raises(ConfigError, match="does not train causal-lm"):
        scaling.computed_phase_memory("bitfit", "random-opt-tiny", batch=1, seq=8)


def meta_read_parameters():
    with torch.device("meta"):
        return list(methods.build("read", backbones.load("random-opt-tiny", meta=True), 2).parameters())


# ---------------------------------------------------------------- parameter counts and the patch of transformers


def test_trainable_parameters_of_read_on_t5_base_are_table4s():
    counts = scaling.trainable_parameters("read", "random-t5-base")  # GRU/256, READ Table 7's final choice
    assert counts["trainable"] == 1_969_152  # READ Table 4: 1.97 M
    assert counts["backbone"] == 222_903_552 + 32128 * 768 == 247_577_856  # Table 4's 247.58 M: tied head twice
    assert counts["total"] == 222_903_552 + 1_969_152  # every parameter once
    assert scaling.trainable_parameters("full", "random-t5-base")["trainable"] == 222_903_552


def test_shape_only_forward_patches_the_mask_helpers_and_restores_them():
    originals = [getattr(masking_utils, name) for name in scaling.MASK_HELPERS]
    with scaling.shape_only_forward():
        assert all(getattr(masking_utils, name)(None) is False for name in scaling.MASK_HELPERS)
    assert [getattr(masking_utils, name) for name in scaling.MASK_HELPERS] == originals


def test_shape_only_forward_says_so_when_transformers_renames_a_helper(monkeypatch):
    monkeypatch.delattr(masking_utils, scaling.MASK_HELPERS[0])
    with pytest.raises(RuntimeError, match=f"has no masking_utils.{scaling.MASK_HELPERS[0]}"):
        with scaling.shape_only_forward():
            pass


def test_table4_puts_ratios_to_full_beside_the_papers():
    parameters = pd.DataFrame({"backbone": ["base"] * 3, "method": ["full", "lst", "read"],
                               "trainable_M": [222.9, 5.0, 1.97], "backbone_M": [247.58] * 3})
    memory = pd.DataFrame({"backbone": ["base"] * 3, "method": ["full", "lst", "read"],
                           "source": ["computed (meta)"] * 3, "total_GiB": [8.0, 2.0, 1.0]})
    latency = pd.DataFrame({"backbone": ["small"], "method": ["full"], "latency_s": [0.1]})  # no base: left out
    table = scaling.table4(parameters, memory, latency).set_index("method")
    assert list(table["memory_vs_full"]) == [1.0, 0.25, 0.125]
    assert table.loc["read", "paper_memory_vs_full"] == paper.READ_TABLE4["read"]["memory_gb"] / 17.86
    assert table.loc["lst", "paper_params_M"] == 5.04 and "latency_s" not in table


def test_latency_by_size_times_the_methods_in_turn_on_one_batch(monkeypatch):
    calls, order = [], []
    timed = costs.interleaved_latency

    def spy(fns, warmup, repeats):
        calls.append(fns)

        def logged(name, fn):
            return lambda: (order.append(name), fn())

        return timed({name: logged(name, fn) for name, fn in fns.items()}, warmup, repeats)

    monkeypatch.setattr(costs, "interleaved_latency", spy)
    table = scaling.latency_by_size(["tiny"], ["full", "lst", "read"], seq=8, target=2, repeats=3)
    assert len(calls) == 1 and list(calls[0]) == ["full", "lst", "read"]  # one measurement of the three together
    assert order == ["full"] * 2 + ["lst"] * 2 + ["read"] * 2 + ["full", "lst", "read"] * 3  # warm-up, then turns
    batches = [fn.keywords for fn in calls[0].values()]
    assert all(b["input_ids"] is batches[0]["input_ids"] and b["input_ids"].shape == (1, 8) for b in batches)
    assert list(table.method) == ["full", "lst", "read"] and list(table.backbone) == ["tiny"] * 3
    assert (table.latency_s > 0).all()  # timings of real models: only that they were measured


def test_decoder_training_memory_by_hand():
    """Llama-shaped (tiny: d 64, 2 layers, SwiGLU 128, vocabulary 32000, untied head) on the meta device."""
    table = scaling.decoder_training_memory("random-llama-tiny", batch=2, seq=16, lora_rank=4, progress=False)
    rows = table.set_index("setting")
    assert list(rows.index) == ["full fine-tuning", "LoRA (rank 4)", "LoRA (rank 4), 4-bit backbone (QLoRA-style)",
                                "READ, bf16 backbone", "READ, 4-bit backbone"]
    embed = head = 32000 * 64
    layer_linear = 4 * 64 * 64 + 3 * 64 * 128  # q, k, v, o and gate, up, down
    norms = 2 * 2 * 64 + 64
    total = embed + head + 2 * layer_linear + norms
    lora = 2 * 2 * 4 * (64 + 64)  # q and v of 2 layers: A [4, 64] and B [64, 4]
    read = 3 * 256 * 64 + 3 * 256 * 256 + 2 * 768 + 64 * 256  # GRU/256 and W_o
    assert rows["trainable_params"].tolist() == [total, lora, lora, read, read]
    assert rows.loc["full fine-tuning", "weights"] == 4 * total
    assert rows.loc["LoRA (rank 4)", "weights"] == 4 * lora + 2 * total
    nf4 = 2 * layer_linear * scaling.NF4_BYTES_PER_PARAM  # the layers' Linear weights; embeddings, norms, head bf16
    assert rows.loc["READ, 4-bit backbone", "weights"] == round(4 * read + 2 * (total - 2 * layer_linear) + nf4)
    assert scaling.NF4_BYTES_PER_PARAM * 8 == pytest.approx(4.127, abs=1e-3)  # QLoRA's 4.127 bits per parameter
    for part, per_param in (("gradients", 4), ("optimizer", 8)):
        assert (rows[part] == per_param * rows["trainable_params"]).all()
    # a 4-bit backbone changes the weights only; READ stores no backbone activation
    for method in ("LoRA (rank 4)", "READ"):
        plain, four = (rows.loc[r] for r in rows.index if r.startswith(method))
        assert plain["activations"] == four["activations"] and four["weights"] < plain["weights"]
    acts = rows["activations"]
    # READ, in bfloat16: φ_1..φ_2 of 32 positions [2, 32, 64], GRU states s_0..s_2 [3, 32, 256], h_2 [32, 256]
    assert acts["READ, bf16 backbone"] == (2 * 32 * 64 + 3 * 32 * 256 + 32 * 256) * 2 == 73_728
    assert acts["READ, bf16 backbone"] < acts["LoRA (rank 4)"] < acts["full fine-tuning"]
    assert (table["total"] == table[["weights", "activations", "gradients", "optimizer"]].sum(axis=1)).all()


def test_decoder_parameters_on_published_shapes():
    table = scaling.decoder_parameters(["random-gpt2-small", "random-llama-7b"]).set_index(["backbone", "method"])
    trainable = table["trainable"].to_dict()
    assert trainable[("random-gpt2-small", "full")] == 124_439_808
    assert trainable[("random-gpt2-small", "lora")] == 12 * 16 * (768 + 3 * 768)  # rank 16 on the fused c_attn
    assert trainable[("random-gpt2-small", "read")] == 984_576
    assert trainable[("random-llama-7b", "lora")] == 32 * 2 * 16 * (4096 + 4096) == 8_388_608  # q_proj, v_proj
    assert trainable[("random-llama-7b", "read")] == 4_392_448
    assert table.loc[("random-llama-7b", "read"), "total"] == 6_738_415_616 + 4_392_448
