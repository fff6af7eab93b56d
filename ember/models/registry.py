"""Models imported under a name (`ember models import NAME PATH`), as Ollama users expect: the name then
works wherever a model is named (`ember serve --model NAME`, `LLM(model=NAME)`, the API's `model`).

An imported model is an entry under `<ember cache>/models/NAME/`: a link to (or a copy of) a local HF
directory, or a directory holding one link to (or copy of) a GGUF file. The directory is the registry,
so there is no index to keep in step with it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ember.paths import ember_cache_dir

# Names the API's `model` field and a file name both take: no '/', so a name never reads as a repo id.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ImportedModel:
    name: str
    entry: Path  # under the registry
    source: Path  # what it points at (itself, for a copy)
    kind: str  # "hf" or "gguf"

    @property
    def weights(self) -> Path:
        """What catalog.resolve_model loads: the HF directory, or the GGUF file to convert."""
        return self.entry if self.kind == "hf" else _gguf_in(self.entry)


def registry_dir() -> Path:
    return ember_cache_dir() / "models"


def imported_models() -> list[ImportedModel]:
    root = registry_dir()
    if not root.is_dir():
        return []
    found = (lookup(p.name) for p in sorted(root.iterdir()))
    return [m for m in found if m is not None]


def lookup(name: str) -> ImportedModel | None:
    """The imported model called `name`, or None (also for a name no import could have made)."""
    if not NAME.match(name):
        return None
    entry = registry_dir() / name
    if (entry / "config.json").is_file():
        return ImportedModel(name, entry, entry.resolve(), "hf")
    if entry.is_dir() and _gguf_in(entry) is not None:
        return ImportedModel(name, entry, _gguf_in(entry).resolve(), "gguf")
    return None


def import_model(
    name: str, path: str | Path, *, copy: bool = False, taken: tuple[str, ...] = ()
) -> ImportedModel:
    """Register the HF directory or GGUF file at `path` as `name`: linked (the default; moving the source
    breaks it) or copied. `taken` are names that would shadow it (the catalog's)."""
    if not NAME.match(name):
        raise ValueError(
            f"model name '{name}' is not usable: letters, digits, '.', '_' and '-' only, starting with a "
            "letter or digit (no '/')"
        )
    if name in taken:
        raise ValueError(f"'{name}' is a catalog model's name; pick another")
    src = Path(path).expanduser().resolve()
    if src.is_dir():
        if not (src / "config.json").is_file() or not any(src.glob("*.safetensors")):
            raise ValueError(f"{src} is not an HF model directory (config.json and *.safetensors)")
    elif src.is_file():
        if src.suffix != ".gguf":
            raise ValueError(f"{src} is not a .gguf file; pass a .gguf file or an HF model directory")
    else:
        raise ValueError(f"{src} does not exist")
    entry = registry_dir() / name
    if entry.exists() or entry.is_symlink():
        raise ValueError(
            f"a model named '{name}' is already imported ({entry}); `ember models remove {name}` first"
        )
    entry.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        if copy:
            shutil.copytree(src, entry)
        else:
            entry.symlink_to(src, target_is_directory=True)
    else:
        entry.mkdir()
        target = entry / src.name
        if copy:
            shutil.copy2(src, target)
        else:
            target.symlink_to(src)
    found = lookup(name)
    assert found is not None, entry  # made just above in a shape lookup reads
    return found


def remove_model(name: str) -> None:
    found = lookup(name)
    if found is None:
        raise ValueError(f"no imported model named '{name}'")
    if found.entry.is_symlink():
        found.entry.unlink()
    else:
        shutil.rmtree(found.entry)  # a copy, or a directory of one GGUF link: the sources stay


def disk_size(path: Path) -> int:
    """Bytes under `path`, links followed (an imported model is mostly links to what it occupies)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path, followlinks=True):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:  # a dangling link
                continue
    return total


def _gguf_in(entry: Path) -> Path | None:
    files = sorted(entry.glob("*.gguf"))
    return files[0] if files else None
