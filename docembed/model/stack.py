"""Modules: a sentence-transformers model folder read without importing sentence-transformers.

A sentence-transformers folder is a transformer followed by modules named in ``modules.json``
(pooling, dense layers, normalisation), each configured by a JSON file in its subfolder. Importing
sentence-transformers to read them costs seconds of start-up on every worker and launcher (it pulls in
scikit-learn, its training stack and every modality), so docembed reads the same files itself:

- ``read_stack(folder, entries, hidden_size)``: the modules as plain ``Spec``s (JSON only: no torch), for the launcher's
  description of a model and its fingerprint;
- ``build_module(spec, folder)``: the torch module for one spec, on a worker.

The modules computed are those of ``sentence_transformers`` 6 (``Pooling``'s six modes, ``Dense``,
``Normalize``), and the description string of each equals what that library's ``get_config_dict``
gives, so fingerprints of outputs written before are unchanged. sentence-transformers stays the
reference the tests compare vectors against. Any other module type is refused with its name.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

from docembed.errors import ModelError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' legacy boolean pooling keys, in its concatenation order.
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
SUPPORTED = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One module of the stack: its kind (one of ``SUPPORTED``), subfolder and configuration."""

    kind: str
    path: str
    config: dict

    def describe(self) -> str:
        """``Kind{config}`` as sentence-transformers' ``get_config_dict`` would give it: the fingerprint's
        pooling string is these joined by " > "."""
        return f"{self.kind}{json.dumps(self.config, sort_keys=True)}"

    @property
    def dimension(self) -> int | None:
        if self.kind == "Pooling":
            modes = self.config["pooling_mode"]
            return self.config["embedding_dimension"] * (1 if isinstance(modes, str) else len(modes))
        if self.kind == "Dense":
            return self.config["out_features"]
        return None


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc


def read_stack(folder: str | Path, entries: list[dict] | None, hidden_size: int) -> list[Spec]:
    """The modules of the model in ``folder``, transformer first, from ``entries`` (its ``modules.json``).
    A plain transformers folder (no ``modules.json``) gets mean pooling, as sentence-transformers gives it."""
    folder = Path(folder)
    if entries is None:
        return [Spec("Transformer", "", {}), Spec("Pooling", "", _pooling_config({}, hidden_size))]
    specs = []
    for entry in entries:
        kind = entry.get("type", "").rsplit(".", 1)[-1]
        if kind not in SUPPORTED:
            raise ModelError(f"the model in {folder} has a module docembed cannot run: {entry.get('type')!r} "
                             f"(supported: {', '.join(SUPPORTED)})")
        config = read_json(folder / entry.get("path", "") / "config.json") or {}
        if kind == "Pooling":
            config = _pooling_config(config, hidden_size)
        elif kind == "Dense":
            config = _dense_config(config)
        else:
            config = {}
        specs.append(Spec(kind, entry.get("path", ""), config))
    if not specs or specs[0].kind != "Transformer":
        raise ModelError(f"the model in {folder} does not start with a Transformer module (modules.json)")
    return specs


def _pooling_config(raw: dict, hidden_size: int) -> dict:
    """sentence-transformers' Pooling configuration, legacy boolean keys converted as it converts them."""
    mode = raw.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING.items() if raw.get(key)] or ["mean"]
        mode = modes[0] if len(modes) == 1 else modes
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if len(mode) == 1 else list(mode)
    for m in [mode] if isinstance(mode, str) else mode:
        if m not in POOLING_MODES:
            raise ModelError(f"unknown pooling mode {m!r} (known: {', '.join(POOLING_MODES)})")
    return {"embedding_dimension": raw.get("embedding_dimension", raw.get("word_embedding_dimension", hidden_size)),
            "include_prompt": raw.get("include_prompt", True), "pooling_mode": mode}


def _dense_config(raw: dict) -> dict:
    """sentence-transformers' Dense configuration, with its defaults, ``use_residual`` left out when off."""
    config = {"in_features": raw["in_features"], "out_features": raw["out_features"], "bias": raw.get("bias", True),
              "activation_function": raw.get("activation_function", "torch.nn.modules.activation.Tanh"),
              "module_input_name": raw.get("module_input_name", "sentence_embedding"),
              "module_output_name": raw.get("module_output_name") or raw.get("module_input_name", "sentence_embedding")}
    if raw.get("use_residual"):
        config["use_residual"] = True
    return config


def build_module(spec: Spec, folder: str | Path, prompt_length: int = 0):
    """The torch module computing ``spec`` (Pooling, Dense; Normalize is applied by the Embedder),
    mapping a features dict to a features dict as sentence-transformers' modules do."""
    if spec.kind == "Pooling":
        return _classes()["Pooling"](spec.config, prompt_length)
    if spec.kind == "Dense":
        return _dense(spec, Path(folder) / spec.path)
    raise ModelError(f"no module to build for {spec.kind}")


def _dense(spec: Spec, folder: Path):
    import torch

    config = spec.config
    name = config["activation_function"]
    module_name, _, class_name = name.rpartition(".")
    activation = getattr(importlib.import_module(module_name), class_name, None) if name.startswith("torch.") else None
    if not (isinstance(activation, type) and issubclass(activation, torch.nn.Module)):
        raise ModelError(f"Dense activation {name!r} is not a torch.nn module; docembed runs only those")
    dense = _classes()["Dense"](config, activation())
    weights = _read_weights(folder)
    missing = dense.load_state_dict(weights, strict=False).missing_keys
    if missing:
        raise ModelError(f"the Dense module in {folder} has no weights for {missing}")
    return dense


def _read_weights(folder: Path) -> dict:
    import torch

    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelError(f"the Dense module in {folder} has no model.safetensors or pytorch_model.bin")


_BUILT: dict = {}


def _classes() -> dict:
    """The torch modules, defined on first use so that importing this module does not import torch."""
    if _BUILT:
        return _BUILT
    import torch

    class _Pooling(torch.nn.Module):
        def __init__(self, config: dict, prompt_length: int = 0):
            super().__init__()
            mode = config["pooling_mode"]
            self.modes = (mode,) if isinstance(mode, str) else tuple(mode)
            self.prompt_length = 0 if config["include_prompt"] else prompt_length

        def forward(self, features: dict) -> dict:
            tokens, mask = features["token_embeddings"], features["attention_mask"]
            features["sentence_embedding"] = torch.cat([pool(mode, tokens, mask, self.prompt_length)
                                                        for mode in self.modes], dim=-1)
            return features

    class _Dense(torch.nn.Module):
        def __init__(self, config: dict, activation):
            super().__init__()
            self.config = config
            self.linear = torch.nn.Linear(config["in_features"], config["out_features"], bias=config["bias"])
            self.activation_function = activation
            if config.get("use_residual") and config["in_features"] != config["out_features"]:
                self.residual = torch.nn.Linear(config["in_features"], config["out_features"], bias=False)

        def forward(self, features: dict) -> dict:
            x = features[self.config["module_input_name"]]
            out = self.activation_function(self.linear(x))
            if self.config.get("use_residual"):
                out = out + (self.residual(x) if hasattr(self, "residual") else x)
            features[self.config["module_output_name"]] = out
            return features

    _BUILT.update(Pooling=_Pooling, Dense=_Dense)
    return _BUILT


def pool(mode: str, tokens, mask, prompt_length: int = 0):
    """One pooling mode over (batch, length, dim) token embeddings and their (batch, length) mask,
    computed as sentence-transformers computes it (fp16/bf16 sums accumulated in fp32). Every tensor
    is made on the inputs' device: a CPU tensor beside CUDA inputs fails, or is copied every batch."""
    import torch

    original = mask
    if prompt_length:
        mask = _without_prompt(mask, prompt_length)
    wide = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.dtype
    if mode == "cls":
        return _token_at(tokens, mask.to(torch.int).argmax(dim=1))
    if mode == "max":
        return tokens.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        total = (tokens * weights).sum(dim=1, dtype=wide)
        count = torch.clamp(weights.sum(dim=1, dtype=wide), min=1e-9)
        return (total / (count if mode == "mean" else torch.sqrt(count))).to(tokens.dtype)
    if mode == "weightedmean":
        positions = torch.arange(1, tokens.shape[1] + 1, dtype=wide, device=tokens.device).view(1, -1, 1)
        positions = positions - original.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
        weights = mask.unsqueeze(-1).to(wide) * positions
        return ((tokens * weights).sum(dim=1) / torch.clamp(weights.sum(dim=1), min=1e-9)).to(tokens.dtype)
    # lasttoken: the last position the mask keeps
    length = tokens.shape[1]
    values, flipped = mask.flip(1).max(1)
    last = length - 1 - torch.where(values == 0, length - 1, flipped)
    return _token_at(tokens * mask.unsqueeze(-1).to(tokens.dtype), last)


def _token_at(tokens, index):
    """Row i's token at position ``index[i]``: a gather on the device, where indexing by row numbers
    would need a tensor of them made per batch."""
    expanded = index.view(-1, 1, 1).expand(-1, 1, tokens.shape[-1])
    return tokens.gather(1, expanded).squeeze(1)


def _without_prompt(mask, prompt_length: int):
    """The mask with the prompt's positions (after any left padding) zeroed; masked_fill, not boolean
    indexing, so that nothing waits on the device for the count of positions."""
    import torch

    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    start = mask.to(torch.int32).argmax(dim=1).unsqueeze(1)
    return mask.masked_fill(positions < start + prompt_length, 0)
