"""Where the embedded model zoo lives, so every command has a working default."""

import os
from pathlib import Path

MODELS_DIR_ENV = "SPECFLEET_MODELS"


def models_dir() -> Path:
    """The zoo folder: $SPECFLEET_MODELS, else `models/` at the repository root."""
    override = os.environ.get(MODELS_DIR_ENV)
    return Path(override) if override else Path(__file__).resolve().parent.parent / "models"


def default_target() -> Path:
    return models_dir() / "target-xl"  # the zoo's largest (best) target


def default_drafter() -> Path:
    return models_dir() / "drafter"  # the sorted multi-exit drafter; its deepest exit by default
