"""readlib.quantize: an int8 MiniLM (bytes from shapes, states close to float32's, READ and LST train on it), the
run parameter backbone_quant (its errors, its place in run ids and cache keys; the record: tests/integration)."""

import pytest
import torch
from helpers import CPU
from torch import nn

import readlib.cache
import readlib.train
from readlib import backbones, data, methods, quantize, serve
from readlib.errors import ConfigError
from readlib.params import make_params, run_id


@pytest.fixture(scope="module")
def int8_minilm():
    """A MiniLM of its own (quantized in place), and the float32 bytes it had from its shapes."""
    backbone = backbones.load("minilm")
    assert quantize.weight_bytes(backbone.model) == 4 * sum(p.numel() for p in backbone.model.parameters())
    expected = 0
    for module in backbone.model.modules():
        if isinstance(module, nn.Linear):  # int8 weights, float32 bias, float64 scale + int64 zero point per row
            expected += module.weight.numel() + 4 * module.out_features + 16 * module.out_features
        elif isinstance(module, nn.Embedding):  # uint8 weights, float32 scale + zero point per row
            expected += module.weight.numel() + 8 * module.num_embeddings
        elif isinstance(module, nn.LayerNorm):
            expected += 4 * (module.weight.numel() + module.bias.numel())
    float_bytes = quantize.weight_bytes(backbone.model)
    return quantize.quantize(backbone, "int8", CPU), float_bytes, expected


def sentences(task: str, n: int) -> list[str]:
    return list(data.load_task(task, max_train=8)[0]["validation"]["sentence"][:n])


def test_int8_weight_bytes_are_the_formula_and_under_0_3x_float32(int8_minilm):
    backbone, float_bytes, expected = int8_minilm
    assert float_bytes == 4 * 22_565_376  # MiniLM-L6: 22.6 M float32 weights
    assert quantize.weight_bytes(backbone.model) == expected
    assert expected / float_bytes < 0.3  # 0.257
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in backbone.model.modules())


@pytest.mark.parametrize("task", ["sst2", "cola"])
def test_int8_last_hidden_state_is_close_to_float32_on_real_sentences(minilm, int8_minilm, task):
    tokens = minilm.tokenizer(sentences(task, 32), padding=True, return_tensors="pt")
    keep = tokens["attention_mask"].bool()
    with torch.inference_mode():
        exact = minilm.last_hidden_state(tokens["input_ids"], tokens["attention_mask"])
        quantized = int8_minilm[0].last_hidden_state(tokens["input_ids"], tokens["attention_mask"])
    per_token = nn.functional.cosine_similarity(quantized[keep], exact[keep], dim=-1)
    # measured (x86 engine, 32 sentences, sst2 / cola): mean 0.962 / 0.964, 1st percentile 0.915 / 0.918
    assert per_token.mean() > 0.93
    assert per_token.quantile(0.01) > 0.85
    mask = tokens["attention_mask"].unsqueeze(-1)
    pooled = [(h * mask).sum(1) / mask.sum(1) for h in (exact, quantized)]  # what READ's head reads, untrained
    per_sentence = nn.functional.cosine_similarity(*pooled, dim=-1)
    assert per_sentence.mean() > 0.95 and per_sentence.min() > 0.9  # measured: mean 0.969 / 0.972, min 0.941 / 0.938


def test_read_trains_on_int8_minilm_and_never_back_propagates_into_it(int8_minilm):
    backbone = int8_minilm[0]
    torch.manual_seed(0)
    model = methods.build("read", backbone, 2).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if not n.startswith("frozen.")}
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    tokens = backbone.tokenizer(sentences("sst2", 8), padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1] * 4)
    for _ in range(2):  # W_o starts at zero: the RNN's gradient is zero until the first step moved it
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens["input_ids"], tokens["attention_mask"]), labels).backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for p in backbone.model.parameters())  # its layer norms: the only float left


def test_lst_builds_from_float_weights_and_trains_on_an_int8_backbone():
    params = make_params("quick", task="sst2", method="lst", backbone="random-bert-tiny", backbone_quant="int8",
                         max_train=8, max_eval=8)
    task, raw, info = readlib.train.load_data(params)
    run = readlib.train.build_model(params, task, raw, info)
    float_side = readlib.train.build_model(make_params("quick", task="sst2", method="lst", backbone="random-bert-tiny",
                                                       max_train=8, max_eval=8), task, raw, info).model.side
    assert torch.equal(run.model.side.blocks[0].attention.self.query.weight,  # the pruned init read float weights
                       float_side.blocks[0].attention.self.query.weight)
    logits, labels = readlib.train.forward(run.model, run.splits["train"], range(8), CPU)
    readlib.train.task_loss(logits, labels, False).backward()
    assert run.model.side.first_down.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in run.backbone.model.parameters())


@pytest.mark.parametrize("overrides, message", [
    ({"backbone_quant": "int4"}, "unknown backbone_quant 'int4'; choose one of: none, int8, nf4"),
    ({"backbone_quant": "int8", "method": "lora"},
     "backbone_quant int8 needs a method that never back-propagates through the backbone (read, lst); 'lora' does"),
    ({"backbone_quant": "int8", "method": "full"}, "(read, lst); 'full' does"),
    ({"backbone_quant": "int8", "backbone": "random-t5-tiny"},
     "needs --formulation classification: text-to-text back-propagates through the backbone's LM head"),
])
def test_bad_backbone_quant_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_params("quick", **overrides)


def test_nf4_names_what_is_missing_before_loading_anything(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(quantize, "has_bitsandbytes", lambda: False)
    with pytest.raises(ConfigError, match=r"nf4 needs a CUDA GPU and bitsandbytes \(pip install 'bitsandbytes>="):
        make_params("quick", backbone_quant="nf4")
    monkeypatch.setattr(quantize, "has_bitsandbytes", lambda: True)
    with pytest.raises(ConfigError, match="nf4 needs a CUDA GPU; use int8"):
        make_params("quick", backbone_quant="nf4")


def test_int8_refuses_a_device_other_than_the_cpu(monkeypatch, minilm):
    with pytest.raises(ConfigError, match="int8 runs on the CPU only .* device is 'cuda:0'; use --device cpu"):
        quantize.check("int8", "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto would choose the GPU
    with pytest.raises(ConfigError, match=r"device is 'auto' \(a GPU is visible\)"):
        make_params("quick", backbone_quant="int8")
    make_params("quick", backbone_quant="int8", device="cpu")
    with pytest.raises(ConfigError, match="int8 runs on the CPU only, not on meta"):
        quantize.quantize(minilm, "int8", torch.device("meta"))  # refused before anything changes
    assert any(isinstance(m, nn.Linear) for m in minilm.model.modules())


def test_backbone_quant_names_the_run_and_the_cache(monkeypatch):
    none, int8 = (make_params("quick", task="sst2", backbone="random-bert-tiny", max_train=8, max_eval=8,
                              backbone_quant=mode) for mode in ("none", "int8"))
    assert run_id(int8) != run_id(none)
    assert "backbone_quant" not in readlib.params.result_fields(none)  # run ids from before it existed stay
    real_key, fields = readlib.cache.cache_key, []
    monkeypatch.setattr(readlib.cache, "cache_key", lambda **kw: fields.append(kw) or real_key(**kw))
    for params in (none, int8):
        task, raw, info = readlib.train.load_data(params)
        readlib.train.build_caches(readlib.train.build_model(params, task, raw, info), progress=False)
    assert [f["split"] for f in fields] == ["train", "validation", "test"] * 2
    assert [f.get("quant") for f in fields] == [None] * 3 + ["int8"] * 3
    assert {real_key(**f) for f in fields[:3]}.isdisjoint({real_key(**f) for f in fields[3:]})


def test_a_saved_int8_model_predicts_its_runs_test_labels_on_an_int8_backbone(tmp_path):
    params = make_params("quick", task="sst2", backbone="random-bert-tiny", backbone_quant="int8", max_train=32,
                         max_eval=32, max_epochs=1, batch_size=16, micro_batch_size=16)
    record = readlib.train.fit(params, progress=False, save_dir=tmp_path)
    assert record["backbone_quant"] == "int8"
    assert record["total_params"] > 1_000_000  # the quantized backbone's weights count (random-bert-tiny: 2.0 M)
    model = serve.load(tmp_path, device="cpu")
    assert not any(isinstance(m, nn.Linear) for m in model.backbone.model.modules())
    rows = [dict(row) for row in data.load_task("sst2", max_train=32, max_eval=32)[0]["test"]]
    assert [a["label"] for a in model.predict(rows)] == record["test_examples"]["predictions"]
