"""Files shipped inside the package so that `rankfed coordinator serve` works with no flags.

`all-minilm-l6-v2.manifest.json` is the model manifest of all-MiniLM-L6-v2 with a 5-label
head (BBC News) and LoRA on query and value: the model and task of `rankfed demo`, and what
`rankfed edge run` uses when given no --model. Regenerate it (after a change to the
manifest format or the demo model) with:

    python -m rankfed edge manifest --model "$(python -c 'from rankfed.demo.data import model_dir; print(model_dir())')" \
        --task sequence-classification --num-labels 5 --target-modules query,value \
        --model-id all-MiniLM-L6-v2 --out rankfed/coordinator/bundled/all-minilm-l6-v2.manifest.json

tests/coordinator/test_defaults.py checks it against the installed model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_MANIFEST_NAME = "all-minilm-l6-v2.manifest.json"


def demo_manifest_path() -> Path:
    """Path of the bundled demo model manifest (a real file inside the installed package)."""
    return Path(str(resources.files(__name__).joinpath(DEMO_MANIFEST_NAME)))


def manifest_path(configured: str) -> Path:
    """The manifest file for `model.manifest`: the configured path, or the bundled demo one when empty."""
    return Path(configured) if configured else demo_manifest_path()
