"""A LoRA adapter in PEFT's format, read and checked against the base model before anything uses it.

PEFT saves `adapter_config.json` and `adapter_model.safetensors`, whose tensors are named
`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`, A [r, in] and B [out, r].
The delta a module adds is `scaling * B @ A @ x`, with scaling `lora_alpha / r` (`lora_alpha / sqrt(r)`
under rsLoRA). Everything that could go wrong at request time is checked here instead: the format (no
pickles), the target modules, every shape against the base, the rank against the configured maximum.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ember.models.config import ModelConfig
from ember.models.projections import HF_MODULES, hf_shapes

# The LoRA-able modules are the HF parts of the fused projections, in the table's order.
MODULES = tuple(HF_MODULES)
ATTENTION_MODULES = tuple(m for m, (group, _) in HF_MODULES.items() if group == "self_attn")
MLP_MODULES = tuple(m for m, (group, _) in HF_MODULES.items() if group == "mlp")
MAX_CONFIG_BYTES = 2**20  # an adapter_config.json larger than this is refused before it is read
MAX_ADAPTER_BYTES = 2**30  # a weights file larger than this is refused before it is read, whatever the base
# target_modules as a regex (PEFT matches it in full against module paths) is untrusted input: only a
# subset that cannot backtrack badly is taken, no nested or grouped repetition: name characters, '\.',
# '.', '.*', '\d+' and groups of alternative names, as PEFT-made configs write them (`.*\.(q_proj|v_proj)`).
_NAME = r"(?:[A-Za-z0-9_-]|\\\.)+"
_SAFE_REGEX = re.compile(rf"\^?(?:[A-Za-z0-9_-]|\\\.|\\d\+?|\.\*|\.|\((?:\?:)?{_NAME}(?:\|{_NAME})*\))+\$?")
_MAX_REGEX_CHARS = 512
_MAX_REGEX_REPEATS = 4  # '.*' and '\d+': matching costs up to (path length) ** this, per path
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
_PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message says why (the server answers 400)."""


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA-able module of the base model."""
    return hf_shapes(cfg)


@dataclass
class LoRAAdapter:
    name: str
    path: Path
    rank: int
    scaling: float
    # (layer, module) -> (A [r, in], B [out, r] with the scaling folded in), on the host in fp32.
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    base_model: str | None = None
    uid: str = ""  # its content digest (manager.content_id): the prefix cache keys on it

    @property
    def modules(self) -> set[str]:
        return {m for _, m in self.weights}

    @property
    def num_bytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values()
        )

    @classmethod
    def load(cls, name: str, path: str | Path, cfg: ModelConfig, max_rank: int) -> LoRAAdapter:
        config_file, weights_file = _files(name, Path(path).expanduser())
        size, cap = weights_file.stat().st_size, max_weights_bytes(cfg, max_rank)
        if size > cap:
            raise AdapterError(
                f"adapter '{name}': adapter_model.safetensors is {size} bytes; an adapter of rank up to "
                f"{max_rank} for this base model holds at most {cap}"
            )
        config = _read_config(name, config_file)
        rank, scaling, targets = _check_config(name, config, max_rank)
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"adapter '{name}': cannot read adapter_model.safetensors ({exc})") from None
        weights = _collect(name, tensors, cfg, rank, scaling, targets)
        return cls(
            name, Path(path).expanduser(), rank, scaling, weights, config.get("base_model_name_or_path")
        )


def precheck(name: str, path: str | Path) -> None:
    """What can be checked without the base model: the files, their sizes, adapter_config.json. The
    server runs this before an adapter reaches the engine, so no untrusted file is parsed on its step loop
    first (`load` checks it all again)."""
    config_file, weights_file = _files(name, Path(path).expanduser())
    if weights_file.stat().st_size > MAX_ADAPTER_BYTES:
        raise AdapterError(
            f"adapter '{name}': adapter_model.safetensors is {weights_file.stat().st_size} bytes, more than "
            f"the {MAX_ADAPTER_BYTES} any adapter may have"
        )
    _check_config(name, _read_config(name, config_file), None)


def max_weights_bytes(cfg: ModelConfig, max_rank: int) -> int:
    """The largest weights file an acceptable adapter can have: A and B of every module of every layer
    at `max_rank`, 8 bytes an element (float64), plus 1 MiB for the names and header; at most
    MAX_ADAPTER_BYTES."""
    per_layer = sum(out + inp for out, inp in module_shapes(cfg).values())
    return min(MAX_ADAPTER_BYTES, 8 * max_rank * per_layer * cfg.num_hidden_layers + 2**20)


def _files(name: str, path: Path) -> tuple[Path, Path]:
    """adapter_config.json and adapter_model.safetensors of the adapter directory `path`."""
    if not path.is_dir():
        raise AdapterError(f"adapter '{name}': {path} is not a directory")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"adapter '{name}': no adapter_config.json in {path}")
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        pickled = [p for p in _PICKLES if (path / p).exists()]
        if pickled:
            raise AdapterError(
                f"adapter '{name}': {pickled[0]} is a pickle, which ember never loads (it can run code); "
                "save the adapter with safetensors (PEFT's default)"
            )
        raise AdapterError(f"adapter '{name}': no adapter_model.safetensors in {path}")
    return config_file, weights_file


def _read_config(name: str, config_file: Path) -> dict:
    size = config_file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterError(
            f"adapter '{name}': adapter_config.json is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed"
        )
    try:
        # Read no more than the cap, even if the file grew since the stat.
        with config_file.open("rb") as f:
            config = json.loads(f.read(MAX_CONFIG_BYTES + 1).decode())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as exc:
        raise AdapterError(f"adapter '{name}': cannot read adapter_config.json ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter '{name}': adapter_config.json must hold a JSON object")
    return config


def _regex_targets(name: str, pattern: str) -> list[str]:
    """The module names a target_modules regex can mean, for regexes in the safe subset only."""
    repeats = pattern.count("*") + pattern.count("+")
    if len(pattern) > _MAX_REGEX_CHARS or repeats > _MAX_REGEX_REPEATS or not _SAFE_REGEX.fullmatch(pattern):
        raise AdapterError(
            f"adapter '{name}': target_modules regex {pattern[:80]!r} is not one ember accepts: use a list of "
            "module names, or a regex of name characters, '\\.', '.', '.*', '\\d+' and groups of names "
            f"such as '.*\\.(q_proj|v_proj)' (at most {_MAX_REGEX_REPEATS} of '.*' and '\\d+', "
            f"{_MAX_REGEX_CHARS} characters)"
        )
    compiled = re.compile(pattern)  # the subset is always a valid regex
    # The names it can mean on some layer (the tensors in the file then say which layers): in the subset,
    # the slowest pattern takes ~50 ms over all of these.
    return sorted(
        m
        for m in MODULES
        if any(compiled.fullmatch(f"model.layers.{layer}.{HF_MODULES[m][0]}.{m}") for layer in range(64))
    )


def _check_config(name: str, config: dict, max_rank: int | None) -> tuple[int, float, set[str]]:
    """rank, scaling and target module names; `max_rank` None: any rank (checked again when loaded)."""

    def refuse(why: str) -> AdapterError:
        return AdapterError(f"adapter '{name}': {why}")

    if str(config.get("peft_type", "")).upper() != "LORA":
        raise refuse(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise refuse(f"r must be a positive integer (got {rank!r})")
    if max_rank is not None and rank > max_rank:
        raise refuse(f"rank {rank} exceeds this server's maximum LoRA rank ({max_rank}; see --max-lora-rank)")
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise refuse(f"lora_alpha must be a positive number (got {alpha!r})")
    for key, why in (
        ("use_dora", "DoRA"),
        ("fan_in_fan_out", "fan_in_fan_out weights"),
        ("rank_pattern", "per-module ranks (rank_pattern)"),
        ("alpha_pattern", "per-module alphas (alpha_pattern)"),
        ("modules_to_save", "fully trained extra modules (modules_to_save)"),
    ):
        if config.get(key):
            raise refuse(f"{why} are not supported")
    if config.get("bias", "none") != "none":
        raise refuse(f"bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if targets == "all-linear":  # PEFT's shorthand: every linear layer of the blocks
        targets = list(MODULES)
    elif isinstance(targets, str):
        targets = _regex_targets(name, targets)
    if not targets or not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise refuse("target_modules must be a non-empty list of module names (or a regex)")
    unknown = sorted({t.rsplit(".", 1)[-1] for t in targets} - set(MODULES))
    if unknown:
        raise refuse(f"target modules {unknown} are not LoRA-able here; known: {', '.join(MODULES)}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling), {t.rsplit(".", 1)[-1] for t in targets}


def _collect(
    name: str,
    tensors: dict[str, torch.Tensor],
    cfg: ModelConfig,
    rank: int,
    scaling: float,
    targets: set[str],
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    shapes = module_shapes(cfg)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(
                f"adapter '{name}': unexpected tensor '{key}' (not a LoRA weight of a decoder layer)"
            )
        layer, group, module, half = int(m[1]), m[2], m[3], m[4]
        if module not in shapes or HF_MODULES[module][0] != group:
            raise AdapterError(f"adapter '{name}': '{key}' names no module of this base model")
        if layer >= cfg.num_hidden_layers:
            raise AdapterError(
                f"adapter '{name}': '{key}' is for layer {layer}; the base model has {cfg.num_hidden_layers}"
            )
        if not tensor.is_floating_point():
            raise AdapterError(f"adapter '{name}': '{key}' has dtype {tensor.dtype}, not a float type")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"adapter '{name}': '{key}' holds NaN or infinite values")
        pair = halves.setdefault((layer, module), {})
        if half in pair:
            raise AdapterError(f"adapter '{name}': layer {layer} {module} has two lora_{half} tensors")
        pair[half] = tensor
    if not halves:
        raise AdapterError(f"adapter '{name}': adapter_model.safetensors holds no LoRA weights")
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise AdapterError(
                f"adapter '{name}': {where} has lora_{'A' if 'A' in pair else 'B'} without its pair"
            )
        if module not in targets:
            raise AdapterError(f"adapter '{name}': {where} has weights but is not in target_modules")
        a, b = pair["A"], pair["B"]
        out, inp = shapes[module]
        if tuple(a.shape) != (rank, inp) or tuple(b.shape) != (out, rank):
            raise AdapterError(
                f"adapter '{name}': {where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; this base "
                f"model needs ({rank}, {inp}) and ({out}, {rank}) — is it an adapter for another model?"
            )
        weights[(layer, module)] = (a.float().contiguous(), (b.float() * scaling).contiguous())
    return weights
