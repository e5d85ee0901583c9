"""Typed, frozen configuration loaded from YAML with strict checks (no torch here)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _show(value: Any) -> str:
    """A bounded repr for error messages: a YAML alias bomb (a "billion laughs") is never expanded."""
    return _SHORT.repr(value)


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = "rope"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_placement: Literal["pre", "post"] = "pre"
    activation: Literal["gelu", "relu2"] = "relu2"
    tie_weights: bool = False
    bias: bool = False
    qk_norm: bool = True
    # 0 disables soft-capping; otherwise logits = cap * tanh(logits / cap).
    logit_softcap: float = 0.0
    # Output projections of attention and MLP start at zero, so each block starts as the identity.
    zero_init_proj: bool = True
    mlp_ratio: int = 4
    # Kernel width of a causal depthwise convolution on the input of each attention and MLP (0: none):
    # each channel also sees its own last short_conv values (model.ShortConv).
    short_conv: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class DataConfig:
    # Empty means the bundled tiny Shakespeare corpus in data/.
    path: str = ""
    val_fraction: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    max_iters: int = 2000
    optimizer: Literal["adamw", "muon"] = "muon"
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    # Learning rate of the Muon-updated matrices (the other parameters use learning_rate).
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    schedule: Literal["cosine", "wsd"] = "wsd"
    warmup_iters: int = 50
    # wsd: the final fraction of training over which the learning rate decays to min_lr,
    decay_fraction: float = 0.3
    # and how: "sqrt" falls as 1 - sqrt(the decay's progress), staying higher longer and dropping at the
    # end (0.0022-0.0033 lower loss than "linear" at 1,400 steps of the default, seeds 1337 and 7;
    # benchmarks/README.md), "linear" in a straight line.
    decay_shape: Literal["linear", "sqrt"] = "sqrt"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    # The first share of training (of max_iters, or of a time budget) reads windows of block_size / 2
    # at twice batch_size: the same characters a step, cheaper steps that learn faster early on.
    short_windows: float = 0.0
    # With a time budget that governs (no max_iters of the user's) and no short_windows of the user's:
    # read short windows for the first half of training when the budget affords fewer than
    # trainer.AUTO_SHORT_STEPS steps, as measured when the loop starts (`minigpt train --time-budget S`
    # sets it; benchmarks/README.md has the runs behind it).
    short_windows_auto: bool = False
    # epochs: every window of the text once per pass, shuffled; random: windows drawn independently.
    sampling: Literal["epochs", "random"] = "epochs"
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    seed: int = 1337
    # Seconds of wall clock for the whole command; 0 means no budget.
    time_budget: float = 0.0
    device: str = "auto"
    num_threads: int = 0
    deterministic: bool = False
    # Steps this invocation runs before it saves a checkpoint and exits (0: no limit). The schedule still
    # follows max_iters, so a run stopped this way and resumed matches an uninterrupted one step for step.
    stop_after: int = 0
    # Periodic evaluations score the whole validation split instead of eval_iters sampled batches.
    eval_full: bool = False
    # A run (directory or checkpoint folder) whose weights a new run starts from, with a fresh
    # optimizer and schedule; empty: start from random weights.
    init_from: str = ""
    # With init_from: characters of the new text that the run's vocabulary lacks get new embedding
    # and output rows (otherwise they are refused).
    extend_vocab: bool = False
    # Whole-split evaluations (the final one; periodic ones with eval_full) of a split with more characters
    # than this score a fixed sample of windows holding about this many; 0 scores the whole split always.
    eval_max_chars: int = 2_000_000
    # Whole-split evaluations score windows of block_size starting every eval_stride characters, each
    # window scoring only what no earlier one did: every character after the first window then sees at
    # least block_size - eval_stride characters of context (`minigpt eval`'s --stride). 0 is block_size:
    # windows that do not overlap, where a window's first characters see little context (the measure
    # of every figure in the README unless it says otherwise).
    eval_stride: int = 0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _nearest(name: str, options: typing.Iterable[str], prefix: str = "") -> str:
    options = list(options)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid: {', '.join(prefix + o for o in options)})"


def _convert(key: str, value: Any, annotation: Any) -> Any:
    """Check value against a field's type, converting what YAML leaves as text (e.g. '1e-3')."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise UserError(f"{key}: {_show(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise UserError(f"{key}: expected true or false, got {_show(value)}")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"{key}: expected an integer, got {_show(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
        raise UserError(f"{key}: expected an integer, got {_show(value)}")
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"{key}: expected a number, got {_show(value)}")
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise UserError(f"{key}: expected a number, got {_show(value)}") from None
        else:
            raise UserError(f"{key}: expected a number, got {_show(value)}")
        if not math.isfinite(number):
            raise UserError(f"{key}: expected a finite number, got {_show(value)}")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key}: expected text, got {_show(value)}")
    raise AssertionError(f"unhandled annotation {annotation!r} for {key}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(section: str, values: dict[str, Any], base: Any) -> Any:
    cls = SECTIONS[section]
    hints = _field_types(cls)
    changes = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown config key '{section}.{key}'" + _nearest(str(key), hints, f"{section}."))
        changes[key] = _convert(f"{section}.{key}", value, hints[key])
    return dataclasses.replace(base, **changes)


def _validate_windows(config: Config) -> None:
    """The windows training reads (train.short_windows) and its final evaluation scores (train.eval_stride)."""
    t, block = config.train, config.model.block_size
    if not 0.0 <= t.short_windows <= 1.0:
        raise UserError(f"train.short_windows must be a share of training from 0 to 1, got {t.short_windows}")
    if t.short_windows and block < 2:
        raise UserError("train.short_windows needs model.block_size of at least 2")
    if not 0 <= t.eval_stride <= block:
        raise UserError(f"train.eval_stride must be from 1 to model.block_size ({block}), or 0 for block_size "
                        f"(windows that do not overlap), got {t.eval_stride}")


def validate(config: Config) -> Config:
    """Reject impossible values, naming the key and what would be right."""
    m, d, t = config.model, config.data, config.train
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
        "model.block_size": m.block_size, "model.mlp_ratio": m.mlp_ratio,
        "train.batch_size": t.batch_size, "train.max_iters": t.max_iters,
        "train.grad_accum_steps": t.grad_accum_steps, "train.eval_interval": t.eval_interval,
        "train.eval_iters": t.eval_iters, "train.log_interval": t.log_interval,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{key} must be at least 1, got {value}")
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.pos_encoding == "rope" and m.head_dim % 2:
        raise UserError(f"rope needs an even head size, but n_embd / n_head = {m.head_dim}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.short_conv < 0 or m.short_conv > m.block_size:
        raise UserError(f"model.short_conv must be 0 (off) or a width from 1 to block_size ({m.block_size}), "
                        f"got {m.short_conv}")
    if m.logit_softcap < 0:
        raise UserError(f"model.logit_softcap must be 0 (off) or positive, got {m.logit_softcap}")
    if not 0.0 < d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1 (exclusive), got {d.val_fraction}")
    for key, value in {"train.learning_rate": t.learning_rate, "train.muon_lr": t.muon_lr}.items():
        if value <= 0:
            raise UserError(f"{key} must be positive, got {value}")
    for key, value in {
        "train.min_lr": t.min_lr, "train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip,
        "train.warmup_iters": t.warmup_iters, "train.time_budget": t.time_budget,
        "train.checkpoint_interval": t.checkpoint_interval, "train.num_threads": t.num_threads,
        "train.stop_after": t.stop_after, "train.eval_max_chars": t.eval_max_chars,
    }.items():
        if value < 0:
            raise UserError(f"{key} must be zero or positive, got {value}")
    _validate_windows(config)
    if t.min_lr > t.learning_rate:
        raise UserError(f"train.min_lr ({t.min_lr}) must not exceed train.learning_rate ({t.learning_rate})")
    for key, value in {"train.beta1": t.beta1, "train.beta2": t.beta2,
                       "train.muon_momentum": t.muon_momentum}.items():
        if not 0.0 <= value < 1.0:
            raise UserError(f"{key} must be in [0, 1), got {value}")
    if not 0.0 <= t.decay_fraction <= 1.0:
        raise UserError(f"train.decay_fraction must be in [0, 1], got {t.decay_fraction}")
    if not 0 <= t.seed < 2**63:
        raise UserError(f"train.seed must be in [0, 2**63), got {t.seed}")
    # Far past any model this tool is for (GPT-2 XL: 48 layers, 1600 wide, block 1024), so that a
    # mistyped size is refused at once instead of exhausting memory or hanging in allocation.
    for key, value, most in (("model.n_layer", m.n_layer, 1024), ("model.n_head", m.n_head, 1024),
                             ("model.n_embd", m.n_embd, 65536), ("model.block_size", m.block_size, 2**20),
                             ("train.num_threads", t.num_threads, 1024)):
        if value > most:
            raise UserError(f"{key} must be at most {most}, got {value}")
    return config


def from_dict(raw: Any, name: str = "config", base: Config | None = None) -> Config:
    config = base or Config()
    if raw is None:
        raise UserError(f"{name} is empty: expected the sections {', '.join(SECTIONS)}")
    if not isinstance(raw, dict):
        raise UserError(f"{name} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UserError(f"unknown config section '{section}'" + _nearest(str(section), SECTIONS))
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"config section '{section}' must be a mapping, got {_show(values)}")
        sections[section] = _build_section(section, values, getattr(config, section))
    return validate(dataclasses.replace(config, **sections, name=name))


def bundled_dir(kind: str) -> Path:
    """The shipped configs/ or data/ folder: inside the installed package, or at the repository top."""
    package = Path(__file__).resolve().parent
    inside = package / "_bundled" / kind
    if inside.is_dir():
        return inside
    return package.parent / kind


def default_data_path() -> Path:
    return bundled_dir("data") / "tinyshakespeare.txt"


def absolute_data_path(path: str) -> str:
    """data.path as a run stores it: absolute, so `eval` and `--resume` find the text from any working
    directory; "" (the bundled text) and "-" (stdin) stay as they are."""
    return path if path in ("", "-") else str(Path(path).expanduser().resolve())


def option_overrides(data: str | None = None, time_budget: float | None = None, device: str | None = None,
                     seed: int | None = None) -> list[str]:
    """The command-line options that stand for config keys (--data, --time-budget, --device, --seed), as
    --set flags; an option not given adds none."""
    flags = [] if data is None else [f"data.path={absolute_data_path(data)}"]
    for key, value in (("time_budget", time_budget), ("device", device), ("seed", seed)):
        if value is not None:
            flags.append(f"train.{key}={value}")
    return flags


# train.max_iters of a run whose time budget governs: no step limit a run could reach, so the budget
# ends it and the schedule's progress is the budget's (`minigpt train --time-budget 300` alone).
UNTIL_BUDGET = 10**9


WHOLE_SPLIT = "whole validation split"


def best_measure(eval_full: Any, eval_iters: Any) -> str:
    """What the periodic evaluations, and so the choice of the best checkpoint, measure."""
    return WHOLE_SPLIT if eval_full else f"{eval_iters} sampled batches"


def windows_measure(block_size: int, stride: int) -> str:
    """How a whole-split evaluation's windows score (train.eval_stride, eval's --stride; 0: block_size)."""
    if not stride or stride == block_size:
        return f"windows of {block_size} that do not overlap"
    return (f"windows of {block_size} every {stride}: each character with at least {block_size - stride} "
            f"of context")


def keys_set_by_file(name_or_path: str | None) -> set[str]:
    """The section.key names a user's own config file sets (none for a shipped config, whose values
    are a recipe's defaults, not the user's choice)."""
    path = resolve_config_path(name_or_path or "default")
    if path.parent == bundled_dir("configs"):
        return set()
    raw = yaml.safe_load(_read_config_text(path)) or {}
    return {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict) for key in values}


def budget_governs(config: Config, flags: typing.Sequence[str], config_name: str | None) -> Config:
    """A time budget with no step count of the user's (a --set, or their own config file) governs: the
    run trains until the budget and plans its schedule to end there. With both, the first reached ends
    the run. config_name: the config the user named (None: not a file of theirs)."""
    if config.train.max_iters >= UNTIL_BUDGET and not config.train.time_budget:
        raise UserError(f"train.max_iters {config.train.max_iters:,} stands for 'until the time budget' (a budgeted "
                        f"run's config.yaml), but no train.time_budget is set: give --time-budget S or a step count")
    if not config.train.time_budget:
        return config
    users = (keys_set_by_file(config_name) if config_name is not None else set()) | set(overridden(flags))
    if "train.max_iters" in users:
        return config
    # Nor a short_windows of theirs: the budget chooses it from the steps it affords.
    auto = not config.train.short_windows and "train.short_windows" not in users
    return dataclasses.replace(config, train=dataclasses.replace(config.train, max_iters=UNTIL_BUDGET,
                                                                  short_windows_auto=auto))


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in bundled_dir("configs").glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    shipped = bundled_dir("configs") / f"{name_or_path}.yaml"
    looks_like_a_path = path.suffix in (".yaml", ".yml") or "/" in name_or_path or os.sep in name_or_path
    # A bare name is a shipped config even when a file or folder of that name sits in the working
    # directory; write ./NAME to mean the file.
    if looks_like_a_path or (path.is_file() and not shipped.is_file()):
        if path.is_dir():
            raise UserError(f"{name_or_path} is a folder; a config is a YAML file")
        if not path.exists():
            raise UserError(f"config file not found: {name_or_path}")
        if not path.is_file():
            raise UserError(f"cannot read config {name_or_path}: not a regular file")
        return path
    if shipped.is_file():
        return shipped
    raise UserError(f"no config named '{name_or_path}'" + _nearest(name_or_path, shipped_configs()))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that also refuses duplicate keys, so a repeated key is not silently dropped."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise UserError(f"config key on line {key_node.start_mark.line + 1} is a {type(key).__name__}; "
                            f"keys are names such as n_layer")
        if key in mapping:
            raise UserError(f"duplicate config key '{key}' (line {key_node.start_mark.line + 1})")
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# Far above any real config (the shipped ones are under 2 KiB and 3 levels deep): a larger or deeper
# file is refused before YAML spends minutes and gigabytes on it.
CONFIG_MAX_BYTES = 2**20
CONFIG_MAX_DEPTH = 16


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def _read_config_text(path: Path) -> str:
    """The UTF-8 text of a regular file of at most CONFIG_MAX_BYTES (a FIFO is not waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UserError(f"cannot read config {path}: not a regular file")
            data = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise UserError(f"{path}: larger than {CONFIG_MAX_BYTES // 2**20} MiB; a config is a few lines of YAML")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


_NOT_STRUCTURE = re.compile(r"""'[^']*'|"(?:[^"\\]|\\.)*"|(?:^|\s)#.*$""")  # quoted text, comments


def _nesting(text: str) -> int:
    """An upper bound on the YAML's nesting, without parsing: rising indentation (a stack, so aligned
    lines at many columns are not many levels) or open brackets, whichever is deeper; quoted text and
    comments do not count."""
    deepest = brackets = 0
    indents: list[int] = []
    for line in text.splitlines():
        code = _NOT_STRUCTURE.sub("", line)
        if not code.strip():
            continue
        indent = len(code) - len(code.lstrip(" "))
        while indents and indents[-1] >= indent:
            indents.pop()
        indents.append(indent)
        for char in code:
            brackets += (char in "[{") - (char in "]}")
            deepest = max(deepest, brackets)
        deepest = max(deepest, len(indents))
    return deepest


def load_config(name_or_path: str | None = None) -> Config:
    """Load a YAML config (a path or the name of a shipped one); None gives the shipped default."""
    path = resolve_config_path(name_or_path or "default")
    text = _read_config_text(path)
    if _nesting(text) > CONFIG_MAX_DEPTH:
        raise UserError(f"{path}: nested deeper than {CONFIG_MAX_DEPTH} levels; a config is sections of keys")
    try:
        loader = _StrictLoader(text)  # a SafeLoader: no Python object tags
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}: invalid YAML{where}: {detail}") from None
    except (ValueError, RecursionError) as exc:  # an integer past Python's digit limit; nesting in flow style
        raise UserError(f"{path}: a value YAML cannot read ({_short(exc)})") from None
    if raw is None:
        raise UserError(f"{path} is empty: expected the sections {', '.join(SECTIONS)}")
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    # A run's config.yaml names the config it was made from, so that training it again names runs alike.
    name = raw.pop("name", None)
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise UserError(f"{path}: 'name' must be text, got {_show(name)}")
    return from_dict(raw, name=name.strip() if name else path.stem)


def to_yaml(config: Config, header: str = "") -> str:
    """The config as YAML that load_config reads back to an equal Config (name included)."""
    body = yaml.safe_dump({"name": config.name, **config.to_dict()}, sort_keys=False, allow_unicode=True)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + body


def parse_value(text: str) -> Any:
    """A --set value is read as a YAML scalar: 4 -> int, 1e-3 -> '1e-3' (converted per field), true -> bool."""
    if _nesting(text) > CONFIG_MAX_DEPTH:
        raise UserError(f"--set value must be a single value, got {text[:40]!r}...")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except (ValueError, RecursionError) as exc:  # an integer past Python's digit limit
        raise UserError(f"--set value {text[:40]!r}{'...' if len(text) > 40 else ''}: {_short(exc)}") from None
    if isinstance(value, (dict, list)):
        raise UserError(f"--set value must be a single value, got {text!r}")
    return "" if value is None else value


def overridden(overrides: typing.Sequence[str]) -> dict[str, str]:
    """The section.key names that --set overrides name, each with its value as typed (the last one
    given), read as apply_overrides reads them."""
    return {item.split("=", 1)[0].strip(): item.split("=", 1)[1] for item in overrides if "=" in item}


def apply_overrides(config: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply --set section.key=value overrides with the same checks as the YAML file."""
    raw: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects section.key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        if "." not in dotted:
            raise UserError(f"--set key must be section.key (e.g. model.n_layer), got {dotted!r}")
        section, key = dotted.strip().split(".", 1)
        # Text fields take the text as typed: YAML would read a path such as '-' or '~' as a list or null.
        is_text = section in SECTIONS and _field_types(SECTIONS[section]).get(key) is str
        raw.setdefault(section, {})[key] = text if is_text else parse_value(text)
    if not raw:
        return config
    return from_dict(raw, name=config.name, base=config)


def config_from_checkpoint_dict(raw: dict[str, Any], name: str = "checkpoint") -> Config:
    """Rebuild a Config stored in a checkpoint; keys added later keep their defaults, except those
    whose default changed what a run does: a run saved before train.sampling drew random windows (and
    before train.decay_shape decayed linearly), and resuming it keeps doing so."""
    train = raw.get("train")
    if isinstance(train, dict):
        # runs saved before these keys drew random windows and decayed in a straight line
        old = {key: value for key, value in (("sampling", "random"), ("decay_shape", "linear")) if key not in train}
        raw = {**raw, "train": {**train, **old}}
    return from_dict(raw, name=name)

