import dataclasses

import pytest
import yaml

from readlib import backbones, params
from readlib.errors import ConfigError
from readlib.params import RunParams, load_profile, make_params

RUN_FIELDS = ("task, method, backbone, backbone_quant, lr, max_epochs, patience, batch_size, micro_batch_size, "
              "max_length, formulation, target_format, split_recipe, weight_decay, lr_schedule, warmup_steps, "
              "precision, gradient_checkpointing, seed, split_seed, max_train, max_eval, data_dir, cache, cache_dtype, "
              "device, energy_interval, profile")


def error(**overrides) -> str:
    profile = overrides.pop("profile", "quick")
    with pytest.raises(ConfigError) as e:
        make_params(profile, **overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_quick_profile_values():
    p = make_params("quick")
    # params/quick.yaml, the notebooks' defaults
    assert (p.max_train, p.max_eval, p.max_epochs, p.patience) == (256, 128, 2, 1)
    assert (p.batch_size, p.micro_batch_size, p.max_length) == (32, 32, 64)
    # everything else from RunParams' defaults
    assert (p.task, p.method, p.backbone, p.lr, p.seed, p.split_seed) == ("mrpc", "read", "minilm", None, 0, 42)
    assert (p.weight_decay, p.device, p.data_dir, p.method_args) == (0.0, "auto", None, {})
    assert p.profile == "quick"
    assert p.learning_rate == 1e-3  # READ's default


@pytest.mark.parametrize("profile", params.PROFILES)
def test_profiles_are_what_the_yaml_says(profile):
    text = (params.PROFILE_DIR / f"{profile}.yaml").read_text()
    values = yaml.safe_load(text)
    sweep = values.pop("sweep")
    values.pop("method_defaults", None)  # per method: test_profile_method_defaults_apply_to_their_method_only
    p = make_params(profile)
    assert values and all(getattr(p, k) == v for k, v in values.items())
    assert params.load_sweep(profile) == {"runs": {}} | sweep and {"lr_rounds", "seeds"} <= set(sweep)
    untouched = {f.name for f in dataclasses.fields(RunParams)} - set(values) - {"profile", "formulation"}
    assert all(getattr(p, k) == getattr(RunParams(), k) for k in untouched)
    assert p.formulation == values.get("formulation", backbones.default_formulation(p.backbone))  # resolved


def test_default_and_paper_profiles():
    d, paper = make_params("default"), make_params("paper")
    assert (d.max_train, d.max_eval, d.max_epochs, d.patience, d.batch_size) == (4000, None, 3, 2, 32)
    # READ Appendix C: batch 96, up to 30 epochs, stop at the first epoch without improvement, T5-base
    assert (paper.batch_size, paper.max_epochs, paper.patience, paper.backbone) == (96, 30, 1, "t5-base")
    assert paper.max_train is None and paper.max_eval is None and paper.cache == "off"


def test_overrides():
    p = make_params("quick", task="cola", method="full", lr=3e-4, max_epochs=5, seed=7, max_train=None)
    assert (p.task, p.method, p.lr, p.learning_rate, p.max_epochs, p.seed) == ("cola", "full", 3e-4, 3e-4, 5, 7)
    assert p.max_train == 256  # None keeps the profile's value
    assert make_params("quick", method="full").learning_rate == 5e-5  # full's default


def test_null_sets_none_and_lifts_the_profiles_value():
    p = make_params("quick", max_train=params.NULL, max_eval=None, lr=params.NULL, data_dir=params.NULL)
    assert (p.max_train, p.max_eval, p.lr, p.data_dir) == (None, 128, None, None)  # quick.yaml: 256, 128
    assert make_params("quick", formulation=params.NULL, backbone="random-t5-tiny").formulation == "text-to-text"
    assert params.NULLABLE == ("lr", "formulation", "max_train", "max_eval", "data_dir")
    assert error(max_epochs=params.NULL) == "max_epochs cannot be null; only lr, formulation, max_train, max_eval, " \
                                            "data_dir can"


def test_every_field_says_what_it_means():
    assert [f.name for f in dataclasses.fields(RunParams) if not f.metadata.get("help")] == []


def test_method_hyperparameters_go_to_method_args():
    p = make_params("quick", rnn="lstm", hidden="128", dropout=None)
    assert p.method_args == {"rnn": "lstm", "hidden": "128"}
    p = make_params("quick", method_args={"hidden": 64, "dropout": 0.0}, rnn="rnn")
    assert p.method_args == {"hidden": 64, "dropout": 0.0, "rnn": "rnn"}
    assert not hasattr(p, "rnn")


def case_id(values: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


BAD_VALUES = [
    (dict(task="glue"), ["'glue'", "cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb"]),
    (dict(method="lora-ish"), ["'lora-ish'", "full", "read"]),
    (dict(backbone="bert-nonsense"), ["'bert-nonsense'", "minilm", "t5-base", "random-t5-"]),
    (dict(profile="fast"), ["'fast'", "quick, default, paper"]),
    (dict(lr=0.0), ["lr", "(0, 1)", "got 0.0"]),
    (dict(lr=-1e-3), ["lr", "(0, 1)", "got -0.001"]),
    (dict(lr=1.5), ["lr", "(0, 1)", "got 1.5"]),
    (dict(max_epochs=0), ["max_epochs", ">= 1", "got 0"]),
    (dict(batch_size=0), ["batch_size", ">= 1", "got 0"]),
    (dict(micro_batch_size=-2), ["micro_batch_size", ">= 1", "got -2"]),
    (dict(patience=0), ["patience", ">= 1", "got 0"]),
    (dict(max_eval=0), ["max_eval", ">= 1 or null", "got 0"]),
    (dict(weight_decay=-0.1), ["weight_decay", ">= 0", "got -0.1"]),
    (dict(device="tpu"), ["'tpu'", "auto, cpu, cuda, cuda:N"]),
    (dict(hidden="0"), ["read.hidden", "got 0"]),
    (dict(rnn="lstm2"), ["'lstm2'", "rnn, lstm, gru"]),
    (dict(lr_schedule="cosine"), ["lr_schedule", "'cosine'", "constant, linear_warmup"]),
    (dict(warmup_steps=-1), ["warmup_steps", ">= 0", "got -1"]),
    (dict(precision="fp8"), ["precision", "'fp8'", "fp32, bf16, fp16"]),
    (dict(target_format="names"), ["target_format", "'names'", "lst, t5"]),
    (dict(split_recipe="sklearn"), ["split_recipe", "'sklearn'", "lst, numpy"]),
    (dict(gradient_checkpointing="maybe"), ["gradient_checkpointing", "true or false", "'maybe'"]),
    (dict(gradient_checkpointing=True), ["gradient checkpointing", "not to 'read'", "full", "lora"]),
]


@pytest.mark.parametrize("overrides, needles", BAD_VALUES, ids=[case_id(case) for case, _ in BAD_VALUES])
def test_bad_values_name_value_and_choices(overrides, needles):
    msg = error(**overrides)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_unknown_key_lists_both_parameter_kinds():
    assert error(foo=3).startswith(f"unknown parameter 'foo'; run parameters: {RUN_FIELDS}; "
                                   "'read' parameters: rnn, hidden, dropout, drop_layers, joiner")
    # a READ hyperparameter is unknown to full fine-tuning
    assert error(method="full", rnn="gru").endswith("'full' parameters: dropout")


def test_unknown_yaml_field(tmp_path, monkeypatch):
    (tmp_path / "quick.yaml").write_text("epochs: 3\nmax_length: 16\n")
    monkeypatch.setattr(params, "PROFILE_DIR", tmp_path)
    with pytest.raises(ConfigError) as e:
        load_profile("quick")
    msg = str(e.value)
    assert "params/quick.yaml" in msg and "['epochs']" in msg and "'max_epochs'" in msg


@pytest.mark.parametrize("overrides", [dict(max_epochs=2.5), dict(batch_size="sixteen"), dict(lr="fast")])
def test_wrong_types_are_config_errors(overrides):
    (name, value), = overrides.items()
    with pytest.raises(ConfigError, match=f"{name} must be a .*{value}"):
        make_params("quick", **overrides)


def test_numeric_strings_are_parsed():
    # papermill and YAML may hand numbers over as strings; they are parsed, then range-checked
    assert make_params("quick", batch_size="16", lr="3e-4").batch_size == 16
    assert make_params("quick", lr="3e-4").lr == 3e-4


def test_paper_profile_sweep_is_section_3_3():
    assert params.load_sweep("paper") == {"lr_rounds": 32, "seeds": 3, "runs": {}}
    with pytest.raises(ConfigError, match="unknown profile"):
        params.load_sweep("fast")


def test_a_method_refuses_a_formulation_before_loading_anything():
    with pytest.raises(ConfigError, match="'selective' does not train text-to-text"):
        make_params("quick", method="selective", backbone="random-t5-tiny")
    params = make_params("quick", method="selective", backbone="random-t5-tiny", formulation="classification")
    assert params.method == "selective"


# --- params -----------------------------------------------------------------------------------------


def test_params_reject_unknown_cache_mode_and_dtype():
    with pytest.raises(ConfigError, match=r"unknown cache 'ram'; choose one of: off, memory, disk"):
        make_params("quick", cache="ram")
    with pytest.raises(ConfigError, match=r"unknown cache_dtype 'int8'; choose one of: float32, float16"):
        make_params("quick", cache_dtype="int8")
    assert (RunParams().cache, RunParams().cache_dtype) == ("memory", "float32")
    assert make_params("quick", cache="disk", cache_dtype="float16").cache_dtype == "float16"


def test_profile_method_defaults_apply_to_their_method_only():
    lst = make_params("paper", task="rte", method="lst")
    assert lst.method_args == {"drop_every": 0}  # READ Table 4's LST: every side block kept
    assert make_params("paper", task="rte", method="lst", drop_every=4).method_args == {"drop_every": 4}
    assert make_params("paper", task="rte", method="read").method_args == {}
    assert make_params("default", task="rte", method="lst").method_args == {}
    paper = load_profile("paper")
    assert (paper["lr_schedule"], paper["warmup_steps"]) == ("linear_warmup", 500)  # LST's GLUE scripts
