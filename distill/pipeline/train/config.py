"""Training configuration: built-in defaults, presets (``distill/configs/*.yaml``), YAML/JSON config
files and ``--set a.b=c`` overrides, merged in that order.

Changing ``student.name`` in a later layer drops the student options of earlier layers (they
belong to another architecture), so ``--preset cpu --student pruned --set student.teacher=...``
does not pass ViT widths to the pruned student.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from distill.core.cache.reader import DEFAULT_VERIFY, VERIFY_MODES
from distill.core.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

#: Losses of ``train.warmup_stage`` when it gives none.
WARMUP_STAGE_LOSSES = ["coma_reconstruct"]
WARMUP_STAGE_KEYS = ("steps", "losses", "weights")

#: The paper's full multiscale loss set. The recipe lives in each loss's defaults: contrastive_distill
#: with the caption-mean target for image->text (text_target: both), multi-positive terms and the
#: shared 8192-row teacher queue; relation_kl at its own temperature 0.07 with tau^2 scaling and the
#: queue as extra columns; student_clip multi-positive; one shared, least-squares-startable projection
#: per modality (train.embed_projection, train.init_projections). See docs of distill/losses/*.
DEFAULT_LOSSES = ["contrastive_distill", "feature_l1", "cosine", "token", "relation_kl", "triplet", "student_clip"]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": None,  # None: CUDA when available
    "out": "runs/distill",
    "plugins": [],
    "data": {
        "path": None,
        "split": None,  # None: the split recorded in the cache manifest
        "images_root": None,
        "cache": None,
        "use_views": True,
        "num_workers": 2,
        "on_nonfinite": "error",  # error | skip: a teacher target with NaN/Inf stops training, or its sample is dropped
        # student pixels: auto (the cache's stored pixels when it has them, else decode the images),
        # cache (require stored pixels) or decode (PIL decoding in the DataLoader workers)
        "pixels": "auto",
        # Integrity check of the teacher cache: none | size | lazy (sha256 of each array file on
        # its first read) | full (sha256 of everything at start) | auto (lazy when cheap, else
        # size); see distill/cache.py.
        "verify_cache": DEFAULT_VERIFY,
    },
    "student": {"name": "vit"},
    "train": {
        "steps": None,  # optimizer steps; None: derived from epochs
        "epochs": 1,
        "batch_size": 64,  # global batch per micro-step (split over ranks)
        "accum_steps": 1,
        "lr": 5.0e-4,
        "min_lr_ratio": 0.0,
        "warmup_steps": 0.05,  # linear LR warm-up: an int >= 0 is steps, a float in [0, 1) a fraction of train.steps
        "weight_decay": 0.05,
        "betas": [0.9, 0.98],
        "eps": 1.0e-6,
        "grad_clip": 1.0,  # 0 disables clipping
        "precision": "fp32",  # fp32 | bf16 | fp16 (fp16 only on CUDA)
        "deterministic": False,
        "find_unused_parameters": True,
        "log_every": 1,
        "checkpoint_every": 500,
        "keep_checkpoints": 3,  # 0 keeps every checkpoint
        # Optional first stage (e.g. CoMa compression warm-up): {steps: N, losses: [{name, cfg}],
        # weights: {name: w}}; its losses alone (fixed weights, default 1) train the first N steps.
        "warmup_stage": None,
        # Least-squares start of the student's projection heads on this many training samples
        # (0: off); see distill/projection_init.py.
        "init_projections": 0,
        # The Distiller's shared student->teacher embedding projections: auto (identity when the
        # widths match) | linear (always a learned map); see distill/losses/projection.py.
        "embed_projection": "auto",
        # SyncBatchNorm for students with trainable BatchNorm under DDP on CUDA: auto | true | false
        # (auto: on when world_size > 1 on CUDA and the student has trainable BatchNorm layers).
        "sync_bn": "auto",
        "compile": False,  # torch.compile the student's encode_image / encode_text
        "channels_last": False,  # channels_last memory format for the student and its input pixels
    },
    "losses": [{"name": n, "cfg": {}} for n in DEFAULT_LOSSES],
    "balancer": {"name": "dynamic", "cfg": {}},
    "eval": {"data": None, "split": "val", "every": 0, "batch_size": 64, "images_root": None},
}


def presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot parse config: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_preset(name: str) -> dict[str, Any]:
    """A built-in preset by name (``cpu``, ``gpu``)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(presets())}")
    return load_config_file(path)


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b=c"`` -> ``{"a": {"b": c}}`` with ``c`` parsed as a YAML scalar/flow value
    (``1e-3`` -> float, ``true`` -> bool, ``[1,2]`` -> list, ``null`` -> None)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r}: {e}") from e
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``layer`` into a copy of ``base`` (mappings merge, anything else replaces).
    A layer that sets a different ``student.name`` replaces the whole ``student`` section."""
    out = copy.deepcopy(base)
    for key, value in layer.items():
        if key == "student" and isinstance(value, dict) and "name" in value \
                and value["name"] != out.get("student", {}).get("name"):
            out["student"] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config(preset: str | None = None, files: Iterable[str | Path] = (), flags: dict[str, Any] | None = None,
                   overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults <- preset <- config files <- CLI flags (dotted keys, ``None`` = not given) <- ``--set``."""
    cfg = copy.deepcopy(DEFAULTS)
    if preset:
        cfg = merge(cfg, load_preset(preset))
    for f in files:
        cfg = merge(cfg, load_config_file(f))
    for key, value in (flags or {}).items():
        if value is not None:
            cfg = merge(cfg, _nest(key, value))
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def validate(cfg: dict[str, Any]) -> None:
    """Reject unknown top-level/section keys and malformed loss/balancer entries early."""
    for key in cfg:
        if key not in DEFAULTS:
            raise ConfigError(f"unknown config key {key!r}; known: {', '.join(DEFAULTS)}")
    for section in ("data", "train", "eval"):
        if not isinstance(cfg[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        for key in cfg[section]:
            if key not in DEFAULTS[section]:
                raise ConfigError(f"unknown config key {section}.{key}; known: {', '.join(DEFAULTS[section])}")
    if not isinstance(cfg["student"], dict) or not cfg["student"].get("name"):
        raise ConfigError("student must be a mapping with a name")
    _check_losses(cfg["losses"], "losses")
    bal = cfg["balancer"]
    if not isinstance(bal, dict) or "name" not in bal:
        raise ConfigError(f"balancer must be {{name, cfg}}, got {bal!r}")
    bal.setdefault("cfg", {})
    if cfg["data"]["pixels"] not in ("auto", "cache", "decode"):
        raise ConfigError(f"data.pixels must be auto, cache or decode, not {cfg['data']['pixels']!r}")
    if cfg["data"]["verify_cache"] not in VERIFY_MODES:
        raise ConfigError(f"data.verify_cache must be one of {', '.join(VERIFY_MODES)}, got {cfg['data']['verify_cache']!r}")
    train = cfg["train"]
    if train["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, not {train['precision']!r}")
    check_settings(cfg)
    if train["warmup_stage"] is not None:
        _check_warmup_stage(train)
    if train["sync_bn"] not in ("auto", True, False):
        raise ConfigError(f"train.sync_bn must be auto, true or false, got {train['sync_bn']!r}")
    for key in ("compile", "channels_last", "deterministic"):
        if not isinstance(train[key], bool):
            raise ConfigError(f"train.{key} must be true or false, got {train[key]!r}")


# -- value checks -------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Setting:
    """One value rule: ``key`` (dotted), ``ok(value)`` after coercion, the ``need`` text of the error
    message, ``kind`` (``"int"``, ``"float"``, ``"bool"`` or ``"choice"``), the CLI ``flag`` that
    sets it (named in the error), and whether ``None`` is allowed."""

    key: str
    kind: str
    ok: Callable[[Any], bool]
    need: str
    flag: str | None = None
    nullable: bool = False



def _betas(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)


#: Every numeric/enumerated setting of the config, checked by :func:`check_settings` when the
#: config is resolved (so a bad value fails before any data is loaded).
SETTINGS: tuple[Setting, ...] = (
    Setting("seed", "int", lambda v: v >= 0, "an integer >= 0", "--seed"),
    Setting("data.num_workers", "int", lambda v: v >= 0, "an integer >= 0", "--num-workers"),
    Setting("data.use_views", "bool", lambda v: True, "true or false"),
    Setting("data.on_nonfinite", "choice", lambda v: v in ("error", "skip"), "error or skip"),
    Setting("train.steps", "int", lambda v: v >= 1, "an integer >= 1 (or null: derived from train.epochs)", "--steps",
            nullable=True),
    Setting("train.epochs", "float", lambda v: v > 0, "a number > 0", "--epochs"),
    Setting("train.batch_size", "int", lambda v: v >= 1, "an integer >= 1", "--batch-size"),
    Setting("train.accum_steps", "int", lambda v: v >= 1, "an integer >= 1"),
    Setting("train.lr", "float", lambda v: v > 0, "a number > 0", "--lr"),
    Setting("train.min_lr_ratio", "float", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    Setting("train.warmup_steps", "float", lambda v: v >= 0 if _is_int(v) else 0 <= v < 1,
            "a step count >= 0 or a fraction of train.steps in [0, 1)"),
    Setting("train.weight_decay", "float", lambda v: v >= 0, "a number >= 0"),
    Setting("train.betas", "betas", _betas, "two numbers in [0, 1), e.g. [0.9, 0.98]"),
    Setting("train.eps", "float", lambda v: v > 0, "a number > 0"),
    Setting("train.grad_clip", "float", lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    Setting("train.deterministic", "bool", lambda v: True, "true or false"),
    Setting("train.find_unused_parameters", "bool", lambda v: True, "true or false"),
    Setting("train.log_every", "int", lambda v: v >= 1, "an integer >= 1"),
    Setting("train.checkpoint_every", "int", lambda v: v >= 1, "an integer >= 1"),
    Setting("train.keep_checkpoints", "int", lambda v: v >= 0, "an integer >= 0 (0 keeps every checkpoint)"),
    Setting("train.embed_projection", "choice", lambda v: v in ("auto", "linear"), "auto or linear"),
    Setting("train.init_projections", "int", lambda v: v >= 0, "a number of samples >= 0"),
    Setting("eval.every", "int", lambda v: v >= 0, "an integer >= 0 (0: evaluate once at the end)"),
    Setting("eval.batch_size", "int", lambda v: v >= 1, "an integer >= 1"),
)


def coerce_value(value: Any, kind: str) -> Any:
    """``value`` as ``kind`` (a numeric string such as YAML's ``1e-3`` becomes a float, an integral
    float an int); returns ``value`` unchanged when it does not convert (the rule then fails)."""
    if kind in ("float", "int") and isinstance(value, str) and _looks_like_float(value):
        value = float(value)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def check_value(name: str, value: Any, kind: str, ok: Callable[[Any], bool], need: str) -> Any:
    """The coerced ``value`` if it is a ``kind`` satisfying ``ok``; else :class:`ConfigError`
    ``"<name> must be <need>, got <value>"``."""
    value = coerce_value(value, kind)
    typed = {"int": _is_int, "float": _is_num, "bool": lambda v: isinstance(v, bool)}.get(kind, lambda v: True)
    try:
        good = typed(value) and bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{name} must be {need}, got {value!r}")
    return value


def check_settings(cfg: dict[str, Any], rules: Iterable[Setting] = SETTINGS, by_flag: bool = False) -> None:
    """Check (and coerce in place) every setting of ``rules`` present in ``cfg``; errors name
    ``key (flag)``, or only the flag with ``by_flag``."""
    for rule in rules:
        *parents, leaf = rule.key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        if leaf not in node or (rule.nullable and node[leaf] is None):
            continue
        name = (rule.flag if by_flag else f"{rule.key} ({rule.flag})") if rule.flag else rule.key
        node[leaf] = check_value(name, node[leaf], rule.kind, rule.ok, rule.need)


def check_args(args: Any, rules: Iterable[Setting]) -> None:
    """:func:`check_settings` for an ``argparse.Namespace`` (rule keys are attribute names)."""
    check_settings(vars(args), rules, by_flag=True)


def _check_losses(losses: Any, where: str) -> None:
    """Normalise a loss list in place to ``[{name, cfg}]`` (bare names allowed) with distinct names."""
    if not isinstance(losses, list) or not losses:
        raise ConfigError(f"{where} must be a non-empty list of {{name, cfg}}")
    for i, item in enumerate(losses):
        if isinstance(item, str):
            losses[i] = item = {"name": item, "cfg": {}}
        if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "cfg"}:
            raise ConfigError(f"{where}[{i}] must be {{name, cfg}}, got {item!r}")
        item.setdefault("cfg", {})
    names = [item["name"] for item in losses]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} must have distinct names, got {names}")


def _check_warmup_stage(train: dict[str, Any]) -> None:
    """Validate ``train.warmup_stage`` in place, filling the default losses and weights."""
    stage = train["warmup_stage"]
    if not isinstance(stage, dict):
        raise ConfigError(f"train.warmup_stage must be a mapping {{steps, losses, weights}} or null, got {stage!r}")
    unknown = sorted(set(stage) - set(WARMUP_STAGE_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key train.warmup_stage.{unknown[0]}; known: {', '.join(WARMUP_STAGE_KEYS)}")
    steps = stage.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"train.warmup_stage.steps must be a positive integer, got {steps!r}")
    if stage.get("losses") is None:
        stage["losses"] = [{"name": n, "cfg": {}} for n in WARMUP_STAGE_LOSSES]
    _check_losses(stage["losses"], "train.warmup_stage.losses")
    weights = stage.get("weights") or {}
    names = [item["name"] for item in stage["losses"]]
    if not isinstance(weights, dict) or set(weights) - set(names):
        raise ConfigError(f"train.warmup_stage.weights must map stage loss names {names} to numbers, got {weights!r}")
    stage["weights"] = weights


def warmup_steps(value: int | float, total: int) -> int:
    """LR warm-up steps of ``train.warmup_steps`` for a run of ``total`` steps: an int is a step
    count, a float in [0, 1) a fraction of the run (at least 1 step when positive)."""
    if isinstance(value, float):
        return max(1, round(value * total)) if value > 0 else 0
    return int(value)


def save_config(cfg: dict[str, Any], path: str | Path) -> None:
    """Write the resolved config as YAML (round-trips through :func:`load_config_file`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
