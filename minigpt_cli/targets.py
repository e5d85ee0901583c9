"""What bench and inspect look at: a run directory (its checkpoint) or a config (no weights).

Both commands take the same RUN-or-CONFIG argument, so they resolve it here, below them both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from minigpt_cli import checkpoint as ckpt
from minigpt_cli.config import Config, UserError, apply_overrides, load_config
from minigpt_cli.corpus import scan_vocabulary


@dataclass
class Target:
    kind: str  # "run" or "config"
    name: str  # run directory or config name
    config: Config
    vocab_size: int
    loaded: ckpt.LoadedCheckpoint | None = None
    # Where vocab_size came from: the run's vocabulary, the config's text, or --vocab-size.
    vocab_source: str = "characters of the text"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "config": self.config.name, "vocab_size": self.vocab_size,
                "vocab_source": self.vocab_source}


def _is_run(path: Path) -> bool:
    if path.is_dir():
        return any((path / name).exists() for name in ("latest.json", "best.json", "checkpoints",
                                                       ckpt.META_FILE, ckpt.MODEL_FILE))
    return path.name in (ckpt.META_FILE, ckpt.MODEL_FILE)


def config_vocab_size(config: Config) -> int:
    """vocab_size is never configured: it is the number of distinct characters in the config's text."""
    if config.data.path == "-":
        raise UserError("the config reads its text from stdin (data.path: -); the vocabulary size needs the "
                        "text, so give a data.path (e.g. --set data.path=my.txt)")
    return scan_vocabulary(config.data.path or None)


def resolve_target(arg: str | None, overrides: Sequence[str] = (), which: str = "latest",
                   fallback_to_config: bool = True, vocab_size: int | None = None) -> Target:
    """RUN or CONFIG: a directory holding a checkpoint is a run; anything else is a config path or name.

    With no argument: the newest run under ./runs, else (fallback_to_config) the shipped default config.
    vocab_size (--vocab-size) sizes a config's model for another vocabulary than its text's characters,
    e.g. GPT-2's 50,257 tokens; a run keeps the vocabulary it was trained with.
    """
    if vocab_size is not None and vocab_size < 1:
        raise UserError(f"--vocab-size must be at least 1, got {vocab_size}")
    target = _resolve_target(arg, overrides, which, fallback_to_config)
    if vocab_size is None:
        return target
    if target.kind == "run":
        raise UserError(f"--vocab-size sizes a CONFIG's model; the run {target.name} keeps its own vocabulary "
                        f"of {target.vocab_size} characters")
    return Target("config", target.name, target.config, vocab_size, vocab_source="--vocab-size")


def _resolve_target(arg: str | None, overrides: Sequence[str], which: str, fallback_to_config: bool) -> Target:
    if arg is None:
        try:
            run = ckpt.newest_run()
        except UserError:
            if not fallback_to_config:
                raise
            config = apply_overrides(load_config(None), overrides)
            return Target("config", config.name, config, config_vocab_size(config))
        arg = str(run)
    path = Path(arg).expanduser()
    if not path.exists() and ("/" in arg or path.suffix not in (".yaml", ".yml", "")):
        raise UserError(f"{arg}: no such run directory or config file")
    if _is_run(path):
        if overrides:
            raise UserError("--set changes a CONFIG; a run keeps the config it was trained with")
        loaded = ckpt.load_checkpoint(path, which=which)
        return Target("run", str(loaded.run_dir), loaded.config, loaded.tokenizer.vocab_size, loaded,
                      vocab_source="the run's characters")
    if path.is_dir():
        raise UserError(f"{path} is a directory without a checkpoint: expected a run directory or a config")
    config = apply_overrides(load_config(arg), overrides)
    return Target("config", config.name, config, config_vocab_size(config))
