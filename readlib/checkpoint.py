"""A trained model on disk: what the method trained, and everything needed to rebuild the rest.

A model folder holds

- ``trained.safetensors``: every parameter the method trains (the best validation checkpoint), by its name in the
  method's model — all of the model for full fine-tuning, a few megabytes for READ;
- ``readlib.json``: the method and its hyperparameters, the backbone (name, source, revision, the seed of random
  weights, its quantization ``backbone_quant``), the task and its label names, the formulation and text-to-text
  target format, the maximum length, the seed the model was built with, and the run's result record;
- ``tokenizer/``: the backbone's tokenizer (``save_pretrained``);
- ``peft/`` (LoRA, and prompt tuning on T5): the same adapter in peft's own format, so
  ``PeftModel.from_pretrained(base_model, "<folder>/peft")`` and ``push_to_hub`` work without readlib.

The frozen backbone is not copied: ``load_model`` loads it again by name and revision (random-weight backbones
from their seed), builds the method on it exactly as the run did and loads the trained parameters over it. Written
here because no library stores a side network next to a reference to its frozen backbone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from readlib import backbones, data, methods, quantize
from readlib.errors import ConfigError

FORMAT = 1  # readlib.json's layout version
META, WEIGHTS, TOKENIZER, PEFT = "readlib.json", "trained.safetensors", "tokenizer", "peft"


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _save_peft(model: nn.Module, path: Path, base: str | None) -> bool:
    """Write the peft adapter inside ``model`` (if any) in peft's format under ``path``; whether there was one."""
    # heavy (seconds to import): only when a model is saved
    from peft import PeftModel, get_peft_model_state_dict

    for module in model.modules():
        if isinstance(module, PeftModel):
            module.save_pretrained(path)
            return True
        config = getattr(module, "peft_config", None)
        if isinstance(config, dict) and "default" in config:  # an adapter injected into a transformers model
            adapter = dataclasses.replace(config["default"], base_model_name_or_path=base, inference_mode=True)
            path.mkdir(parents=True, exist_ok=True)
            adapter.save_pretrained(path)
            # named as a PeftModel wrapping the base model names them, so PeftModel.from_pretrained finds them
            tensors = {f"base_model.model.{k}": v.detach().contiguous().cpu()
                       for k, v in get_peft_model_state_dict(module).items()}
            save_file(tensors, path / "adapter_model.safetensors")
            return True
    return False


def save(model: nn.Module, backbone: backbones.Backbone, meta: dict[str, Any], record: dict,
         path: str | Path) -> dict[str, Any]:
    """Write ``model``'s trained parameters and how to rebuild it under ``path`` (created; files replaced).

    ``meta``: method, method_args, task, seed, max_length, target_format (see ``describe``). Returns what the
    record's ``saved`` entry says: the folder, its bytes on disk and the trained weights' bytes.
    """
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    trained = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, path / WEIGHTS, metadata={"format": str(FORMAT)})
    backbone.tokenizer.save_pretrained(path / TOKENIZER)
    hub = backbone.source.removeprefix("hub:") if backbone.source.startswith("hub:") else None
    has_peft = _save_peft(model, path / PEFT, hub)
    saved = {"dir": str(path), "weights_bytes": (path / WEIGHTS).stat().st_size}
    content = {"format": FORMAT, **meta, "peft": has_peft, "record": record | {"saved": saved}}
    (path / META).write_text(json.dumps(content, indent=2, default=float) + "\n")
    saved["bytes"] = folder_bytes(path)
    return saved


def describe(params, backbone: backbones.Backbone, task: data.TaskSpec) -> dict[str, Any]:
    """What ``load_model`` needs besides the weights, from a run's parameters (a ``RunParams``)."""
    return {
        "task": task.name, "label_names": list(task.label_names), "num_labels": task.num_labels,
        "method": params.method,
        "method_args": dataclasses.asdict(methods.make_config(params.method, params.method_args)),
        "backbone": params.backbone, "backbone_source": backbone.source, "backbone_revision": backbone.revision,
        "weights_seed": None if backbone.pretrained else params.seed, "seed": params.seed,
        "formulation": backbone.formulation,
        "target_format": params.target_format if backbone.formulation != "classification" else None,
        "max_length": params.max_length, "micro_batch_size": params.micro_batch_size, "precision": params.precision,
        "backbone_quant": params.backbone_quant,
    }


def read_meta(path: str | Path) -> dict[str, Any]:
    """``readlib.json`` of a model folder, checked; ConfigError in one line when it is no readable model folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model folder '{path}' does not exist")
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise ConfigError(f"'{path}' is not a readlib model folder (needs {META} and {WEIGHTS}; write one with "
                          "--save_dir)")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"corrupt model folder '{path}': {META} is not JSON ({err})") from err
    missing = [k for k in ("format", "task", "method", "method_args", "backbone", "seed", "formulation",
                           "max_length") if k not in meta]
    if missing:
        raise ConfigError(f"corrupt model folder '{path}': {META} lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise ConfigError(f"model folder '{path}' has format {meta['format']}; this readlib reads format {FORMAT}")
    data.get_task(meta["task"])
    methods.make_config(meta["method"], meta["method_args"])
    try:  # the header and the file's length, without reading the tensors
        with safe_open(path / WEIGHTS, framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path / WEIGHTS, err) from err
    return meta


def _unreadable(file: Path, err: Exception) -> ConfigError:
    return ConfigError(f"corrupt model folder: {file} cannot be read ({str(err).splitlines()[0]})")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a model folder; ConfigError in one line for a corrupt or truncated file."""
    file = Path(path).expanduser() / WEIGHTS
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(file, err) from err


def build_backbone(meta: dict[str, Any]) -> backbones.Backbone:
    """The frozen backbone a model folder was trained on, at its revision; ConfigError when what loads is another
    version (e.g. another release of the bundled MiniLM package): the trained parameters would not fit it."""
    backbone = backbones.load(meta["backbone"], seed=meta.get("weights_seed") or 0, formulation=meta["formulation"],
                              revision=meta.get("backbone_revision"))
    saved = meta.get("backbone_revision")
    if saved is not None and backbone.revision != saved:
        raise ConfigError(f"the model was trained on backbone '{meta['backbone']}' at {saved}, but {backbone.revision} "
                          "is what loads here; install or pass that version")
    return backbone


def load_model(path: str | Path, backbone: backbones.Backbone | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on the CPU, readlib.json) of a model folder.

    ``backbone``: an already loaded frozen backbone to build on (several READ models can share one; methods that
    change the backbone in place need their own). The model is built exactly as the run built it — same seed,
    same hyperparameters — and its trained parameters are replaced by the saved ones; a folder whose tensors do
    not fit that model (another method, task or backbone layout) is a one-line ConfigError.
    """
    meta = read_meta(path)
    weights = load_weights(path)
    torch.manual_seed(meta["seed"])  # train.set_seed's torch part: the same initial state of anything untrained
    backbone = backbone or build_backbone(meta)
    model = methods.build(meta["method"], backbone, meta.get("num_labels") or data.get_task(meta["task"]).num_labels,
                          meta["method_args"])
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(expected) or any(weights[n].shape != p.shape for n, p in expected.items()):
        extra, missing = sorted(set(weights) - set(expected)), sorted(set(expected) - set(weights))
        wrong = sorted(n for n in set(weights) & set(expected) if weights[n].shape != expected[n].shape)
        raise ConfigError(f"model folder '{path}' does not fit a {meta['method']} model for {meta['task']} on "
                          f"{meta['backbone']}: {len(missing)} tensors missing, {len(extra)} unexpected, "
                          f"{len(wrong)} of another shape (first: {(missing + extra + wrong)[0]})")
    model.load_state_dict(weights, strict=False)
    quantize.quantize(backbone, meta.get("backbone_quant", "none"), torch.device("cpu"))  # as the run did, after build
    return model.eval(), meta
