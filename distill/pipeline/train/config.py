"""Training configuration: a typed, declarative schema (:class:`TrainRunConfig` and its sections)
built from one merged dict: built-in defaults <- preset (``distill/configs/*.yaml``) <- YAML/JSON
config files <- Python layers <- CLI flags <- ``--set a.b=c`` overrides, merged in that order.

Each section is a dataclass whose fields carry their defaults and value rules (:data:`SETTINGS`,
checked with one-line :class:`ConfigError` messages naming the key). Training runs in
:class:`StageConfig` stages (``stages: [{name, steps, losses, balancer}]``, as in torchdistill's
multi-stage configs): every stage but the last trains ``steps`` optimizer steps with its own losses
and balancer, the last one runs until ``train.steps``. Without ``stages`` the old keys make them:
``losses`` + ``balancer`` one stage, preceded by ``train.warmup_stage`` (the CoMa warm-up) when set.

Changing ``student.name`` in a later layer drops the student options of earlier layers (they
belong to another architecture), so ``--preset cpu --student pruned --set student.teacher=...``
does not pass ViT widths to the pruned student.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from distill.core.cache.schema import DEFAULT_VERIFY, VERIFY_MODES
from distill.core.data.pixels import PIXEL_MODES
from distill.core.errors import ConfigError
from distill.pipeline.train.options import check_config_options
from distill.pipeline.settings import Setting, check_settings, check_value, is_int, is_num, looks_like_float

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

#: Losses of ``train.warmup_stage`` when it gives none.
WARMUP_STAGE_LOSSES = ["coma_reconstruct"]
WARMUP_STAGE_KEYS = ("steps", "losses", "weights")
#: Keys of one ``stages`` entry.
STAGE_KEYS = ("name", "steps", "losses", "balancer")

#: The default recipe, chosen by ``benchmarks/recipe_study.py`` (Flickr8k, CPU profile): contrastive
#: distillation against the teacher's embeddings (caption-mean target for image->text, multi-positive,
#: the shared 8192-row teacher queue), cosine on the embeddings and the student's own contrastive loss,
#: one shared, least-squares-startable projection per modality (train.embed_projection,
#: train.init_projections). See docs of distill/losses/*.
DEFAULT_LOSSES = ["contrastive_distill", "cosine", "student_clip"]
#: The default balancer: ``dynamic`` with gradient-norm references (scale: grad) taken after a
#: 200-step start-up transient (ref_after), see distill/balance/dynamic.py.
DEFAULT_BALANCER = {"name": "dynamic", "cfg": {"scale": "grad", "ref_after": 200}}
#: The paper's full multiscale loss set (preset ``multiscale``, with the loss-value ``dynamic``
#: balancer): the default before the recipe study; token, relation_kl, triplet and feature_l1 did not
#: pay on Flickr8k at the CPU budget (README, Results). Kept to reproduce the paper.
MULTISCALE_LOSSES = ["contrastive_distill", "feature_l1", "cosine", "token", "relation_kl", "triplet", "student_clip"]


def _rule(default: Any, kind: str, ok: Any, need: str, flag: str | None = None, nullable: bool = False) -> Any:
    """A dataclass field with ``default`` whose value rule (:class:`Setting`) is in its metadata."""
    meta = {"rule": (kind, ok, need, flag, nullable)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _any(v: Any) -> bool:
    return True


def _betas(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(is_num(b) and 0 <= b < 1 for b in v)


# -- sections -------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """``data``: the dataset, its teacher cache and how the loader reads them."""

    path: str | None = None
    split: str | None = None  # None: the split recorded in the cache manifest
    images_root: str | None = None
    cache: str | None = None
    use_views: bool = _rule(True, "bool", _any, "true or false")
    # Only the first N cached views (view 0 is the clean image, then the random crops, then the mixup
    # views); null: all of them. data.use_views=false is max_views=1.
    max_views: int | None = _rule(None, "int", lambda v: v >= 1, "an integer >= 1 (or null: every cached view)",
                                  nullable=True)
    num_workers: int = _rule(2, "int", lambda v: v >= 0, "an integer >= 0", "--num-workers")
    # error | skip: a teacher target with NaN/Inf stops training, or its sample is dropped
    on_nonfinite: str = _rule("error", "choice", lambda v: v in ("error", "skip"), "error or skip")
    # student pixels: auto (the cache's stored pixels when it has them, else decode the images),
    # cache (require stored pixels) or decode (PIL decoding in the DataLoader workers)
    pixels: str = _rule("auto", "choice", lambda v: v in PIXEL_MODES, "auto, cache or decode")
    # Integrity check of the teacher cache: none | size | lazy (sha256 of each array file on its first
    # read) | full (sha256 of everything at start) | auto (lazy when cheap, else size)
    verify_cache: str = _rule(DEFAULT_VERIFY, "choice", lambda v: v in VERIFY_MODES, f"one of {', '.join(VERIFY_MODES)}")


@dataclass
class StudentConfig:
    """``student``: the registry ``name`` and the keyword arguments of ``create_student``."""

    name: str = "vit"
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StudentConfig":
        return cls(str(d["name"]), {k: copy.deepcopy(v) for k, v in d.items() if k != "name"})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **copy.deepcopy(self.options)}


@dataclass
class TrainConfig:
    """``train``: optimizer, schedule, precision, loop and checkpoint settings."""

    steps: int | None = _rule(None, "int", lambda v: v >= 1, "an integer >= 1 (or null: derived from train.epochs)",
                              "--steps", nullable=True)  # optimizer steps; None: derived from epochs
    epochs: float = _rule(1, "float", lambda v: v > 0, "a number > 0", "--epochs")
    batch_size: int = _rule(64, "int", lambda v: v >= 1, "an integer >= 1", "--batch-size")  # global, per micro-step
    accum_steps: int = _rule(1, "int", lambda v: v >= 1, "an integer >= 1")
    lr: float = _rule(5.0e-4, "float", lambda v: v > 0, "a number > 0", "--lr")
    min_lr_ratio: float = _rule(0.0, "float", lambda v: 0 <= v <= 1, "a number in [0, 1]")
    # linear LR warm-up: an int >= 0 is steps, a float in [0, 1) a fraction of train.steps
    warmup_steps: int | float = _rule(0.05, "float", lambda v: v >= 0 if is_int(v) else 0 <= v < 1,
                                      "a step count >= 0 or a fraction of train.steps in [0, 1)")
    weight_decay: float = _rule(0.05, "float", lambda v: v >= 0, "a number >= 0")
    betas: list[float] = _rule([0.9, 0.98], "betas", _betas, "two numbers in [0, 1), e.g. [0.9, 0.98]")
    eps: float = _rule(1.0e-6, "float", lambda v: v > 0, "a number > 0")
    grad_clip: float = _rule(1.0, "float", lambda v: v >= 0, "a number >= 0 (0 disables clipping)")
    precision: str = _rule("fp32", "choice", lambda v: v in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16")  # fp16: CUDA only
    deterministic: bool = _rule(False, "bool", _any, "true or false")
    find_unused_parameters: bool = _rule(True, "bool", _any, "true or false")
    log_every: int = _rule(1, "int", lambda v: v >= 1, "an integer >= 1")
    # Every N optimizer steps, log each loss term's share of the gradient (0: never); one extra
    # backward pass per term on those steps; see distill/pipeline/train/grad_share.py.
    grad_share_every: int = _rule(0, "int", lambda v: v >= 0, "an integer >= 0 (0: off)")
    checkpoint_every: int = _rule(500, "int", lambda v: v >= 1, "an integer >= 1")
    keep_checkpoints: int = _rule(3, "int", lambda v: v >= 0, "an integer >= 0 (0 keeps every checkpoint)")
    # Optional first stage (e.g. CoMa compression warm-up): {steps: N, losses: [{name, cfg}], weights:
    # {name: w}}; its losses alone (fixed weights, default 1) train the first N steps. Made a stage
    # (TrainRunConfig.effective_stages); the general form is the top-level ``stages`` list.
    warmup_stage: dict[str, Any] | None = None
    # Least-squares start of the student's projection heads on this many training samples (0: off);
    # see distill/pipeline/train/projection_init.py.
    init_projections: int = _rule(0, "int", lambda v: v >= 0, "a number of samples >= 0")
    # The Distiller's shared student->teacher embedding projections: auto (identity when the widths
    # match) | linear (always a learned map); see distill/losses/projection.py.
    embed_projection: str = _rule("auto", "choice", lambda v: v in ("auto", "linear"), "auto or linear")
    # SyncBatchNorm for students with trainable BatchNorm under DDP on CUDA: auto | true | false
    # (auto: on when world_size > 1 on CUDA and the student has trainable BatchNorm layers).
    sync_bn: str | bool = _rule("auto", "choice", lambda v: v == "auto" or isinstance(v, bool), "auto, true or false")
    compile: bool = _rule(False, "bool", _any, "true or false")  # torch.compile the student's encoders
    channels_last: bool = _rule(False, "bool", _any, "true or false")  # for the student and its pixels


@dataclass
class NamedSpec:
    """A registry ``name`` and the keyword arguments ``cfg`` its ``create_*`` factory gets."""

    name: str
    cfg: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NamedSpec":
        return cls(str(d["name"]), copy.deepcopy(dict(d.get("cfg") or {})))


@dataclass
class LossSpec(NamedSpec):
    """One loss term: ``name`` and ``cfg`` of ``create_loss``."""


@dataclass
class BalancerSpec(NamedSpec):
    """The balancer of a stage: ``name`` and ``cfg`` of ``create_balancer``."""


@dataclass
class StageConfig:
    """One training stage: ``losses`` combined by ``balancer`` for ``steps`` optimizer steps
    (``None``: the last stage, until ``train.steps``); ``name`` labels it on the console."""

    steps: int | None
    losses: list[LossSpec]
    balancer: BalancerSpec
    name: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageConfig":
        return cls(d.get("steps"), [LossSpec.from_dict(x) for x in d["losses"]], BalancerSpec.from_dict(d["balancer"]),
                   d.get("name"))

    def to_dict(self) -> dict[str, Any]:
        """``{name, steps, losses, balancer}`` (what :func:`distill.distiller.build_distiller` takes)."""
        return {"name": self.name, "steps": self.steps, "losses": [asdict(x) for x in self.losses],
                "balancer": asdict(self.balancer)}


@dataclass
class EvalConfig:
    """``eval``: retrieval evaluation on a validation split during / after training."""

    data: str | None = None
    split: str | None = "val"
    every: int = _rule(0, "int", lambda v: v >= 0, "an integer >= 0 (0: evaluate once at the end)")
    batch_size: int = _rule(64, "int", lambda v: v >= 1, "an integer >= 1")
    images_root: str | None = None


@dataclass
class TrainRunConfig:
    """A whole training run. :meth:`from_dict` validates a (possibly partial) config dict;
    :meth:`to_dict` gives the dict back (what ``OUT/config.yaml`` and checkpoints store)."""

    seed: int = _rule(0, "int", lambda v: v >= 0, "an integer >= 0", "--seed")
    device: str | None = None  # None: CUDA when available
    out: str = "runs/distill"
    plugins: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    losses: list[LossSpec] = field(default_factory=lambda: [LossSpec(n) for n in DEFAULT_LOSSES])
    balancer: BalancerSpec = field(default_factory=lambda: BalancerSpec.from_dict(DEFAULT_BALANCER))
    # None: one stage of ``losses`` + ``balancer`` (after ``train.warmup_stage`` when set)
    stages: list[StageConfig] | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "TrainRunConfig":
        """Validate ``cfg`` (merged over :data:`DEFAULTS`, so a partial dict is a layer) and build
        the typed config; raises :class:`ConfigError` naming the first bad key."""
        cfg = merge(DEFAULTS, dict(cfg))
        validate(cfg)
        return cls(seed=cfg["seed"], device=cfg["device"], out=str(cfg["out"]), plugins=list(cfg["plugins"]),
                   data=DataConfig(**cfg["data"]), student=StudentConfig.from_dict(cfg["student"]),
                   train=TrainConfig(**cfg["train"]), losses=[LossSpec.from_dict(x) for x in cfg["losses"]],
                   balancer=BalancerSpec.from_dict(cfg["balancer"]),
                   stages=None if cfg["stages"] is None else [StageConfig.from_dict(s) for s in cfg["stages"]],
                   eval=EvalConfig(**cfg["eval"]))

    @classmethod
    def resolve(cls, preset: str | None = None, files: Iterable[str | Path] = (), flags: dict[str, Any] | None = None,
                overrides: Iterable[str] = (), layers: Iterable[Mapping[str, Any]] = ()) -> "TrainRunConfig":
        """:func:`resolve_config` as a typed config."""
        return cls.from_dict(resolve_config(preset, files, flags, overrides, layers))

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "device": self.device, "out": self.out, "plugins": list(self.plugins),
                "data": asdict(self.data), "student": self.student.to_dict(), "train": asdict(self.train),
                "losses": [asdict(x) for x in self.losses], "balancer": asdict(self.balancer),
                "stages": None if self.stages is None else [s.to_dict() for s in self.stages],
                "eval": asdict(self.eval)}

    def effective_stages(self) -> list[StageConfig]:
        """The stages the run trains: ``stages`` as configured, else ``losses`` + ``balancer``
        preceded by the ``train.warmup_stage`` (its losses under a ``fixed`` balancer)."""
        if self.stages is not None:
            return copy.deepcopy(self.stages)
        main = StageConfig(None, copy.deepcopy(self.losses), copy.deepcopy(self.balancer))
        warm = self.train.warmup_stage
        if not warm:
            return [main]
        return [StageConfig(int(warm["steps"]), [LossSpec.from_dict(x) for x in warm["losses"]],
                            BalancerSpec("fixed", {"weights": dict(warm.get("weights") or {})}), "warm-up stage"), main]

    def check_stage_steps(self, total: int) -> None:
        """Refuse stages before the last that take the whole run of ``total`` optimizer steps."""
        before = sum(s.steps or 0 for s in self.effective_stages()[:-1])
        if before and before >= total:
            if self.stages is None:
                raise ConfigError(f"train.warmup_stage.steps ({before}) must be smaller than the number of optimizer "
                                  f"steps ({total})")
            raise ConfigError(f"stages: the stages before the last take {before} optimizer steps, which must be fewer "
                              f"than the number of optimizer steps ({total})")


def _section_rules(prefix: str, cls: type) -> list[Setting]:
    return [Setting(f"{prefix}{f.name}", *f.metadata["rule"]) for f in fields(cls) if "rule" in f.metadata]


#: Every numeric/enumerated setting of the config (the rules of the dataclass fields), checked by
#: :func:`validate` when the config is resolved (so a bad value fails before any data is loaded).
SETTINGS: tuple[Setting, ...] = tuple(_section_rules("", TrainRunConfig) + _section_rules("data.", DataConfig)
                                      + _section_rules("train.", TrainConfig) + _section_rules("eval.", EvalConfig))

#: The built-in defaults as a config dict.
DEFAULTS: dict[str, Any] = TrainRunConfig().to_dict()


# -- config layers --------------------------------------------------------------------------------
def presets(pattern: str | None = None) -> list[str]:
    """Sorted names of the built-in presets (``pattern``: an fnmatch filter)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if pattern is None or fnmatchcase(p.stem, pattern))


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
    """A built-in preset by name (``cpu``, ``gpu``, ``puma``)."""
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
    if isinstance(value, str) and looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string
    return _nest(key, value)


def merge(base: dict[str, Any], layer: dict[str, Any], replace_named: bool = True) -> dict[str, Any]:
    """Deep-merge ``layer`` into a copy of ``base`` (mappings merge, anything else replaces).
    With ``replace_named``, a layer that sets a different ``student.name`` or ``balancer.name``
    replaces the whole section (another class takes other options)."""
    out = copy.deepcopy(base)
    for key, value in layer.items():
        if replace_named and key in ("student", "balancer") and isinstance(value, dict) and "name" in value \
                and value["name"] != (out.get(key) or {}).get("name"):
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, replace_named)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config(preset: str | None = None, files: Iterable[str | Path] = (), flags: dict[str, Any] | None = None,
                   overrides: Iterable[str] = (), layers: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Defaults <- preset <- config files <- ``layers`` (dicts, from Python) <- CLI flags (dotted
    keys, ``None`` = not given) <- ``--set``; returns the validated dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if preset:
        cfg = merge(cfg, load_preset(preset))
    for f in files:
        cfg = merge(cfg, load_config_file(f))
    for layer in layers:
        cfg = merge(cfg, dict(layer))
    given: dict[str, Any] = {}  # flags and --set overrides: one layer, whatever their order
    for key, value in (flags or {}).items():
        if value is not None:
            given = merge(given, _nest(key, value), replace_named=False)
    for text in overrides:
        given = merge(given, parse_override(text), replace_named=False)
    cfg = merge(cfg, given)
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


def save_config(cfg: dict[str, Any], path: str | Path) -> None:
    """Write the resolved config as YAML (round-trips through :func:`load_config_file`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


# -- validation -----------------------------------------------------------------------------------
def validate(cfg: dict[str, Any]) -> None:
    """Reject unknown keys, bad values, malformed loss/balancer/stage entries and unknown or bad
    options of the student, losses and balancers early (before any data is opened); normalises
    ``cfg`` in place (values coerced, bare loss names expanded, stage defaults filled in)."""
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
    _check_balancer(cfg["balancer"], "balancer")
    check_settings(cfg, SETTINGS)
    if cfg["train"]["warmup_stage"] is not None:
        _check_warmup_stage(cfg["train"])
    if cfg["stages"] is not None:
        _check_stages(cfg)
    check_config_options(cfg)  # the options of the student, losses and balancers (options.py)


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


def _check_balancer(bal: Any, where: str) -> None:
    if not isinstance(bal, dict) or "name" not in bal:
        raise ConfigError(f"{where} must be {{name, cfg}}, got {bal!r}")
    bal.setdefault("cfg", {})


def _check_warmup_stage(train: dict[str, Any]) -> None:
    """Validate ``train.warmup_stage`` in place, filling the default losses and weights."""
    stage = train["warmup_stage"]
    if not isinstance(stage, dict):
        raise ConfigError(f"train.warmup_stage must be a mapping {{steps, losses, weights}} or null, got {stage!r}")
    unknown = sorted(set(stage) - set(WARMUP_STAGE_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key train.warmup_stage.{unknown[0]}; known: {', '.join(WARMUP_STAGE_KEYS)}")
    steps = stage.get("steps")
    if not is_int(steps) or steps < 1:
        raise ConfigError(f"train.warmup_stage.steps must be a positive integer, got {steps!r}")
    if stage.get("losses") is None:
        stage["losses"] = [{"name": n, "cfg": {}} for n in WARMUP_STAGE_LOSSES]
    _check_losses(stage["losses"], "train.warmup_stage.losses")
    weights = stage.get("weights") or {}
    names = [item["name"] for item in stage["losses"]]
    if not isinstance(weights, dict) or set(weights) - set(names):
        raise ConfigError(f"train.warmup_stage.weights must map stage loss names {names} to numbers, got {weights!r}")
    stage["weights"] = weights


def _check_stages(cfg: dict[str, Any]) -> None:
    """Validate ``stages`` in place: every entry a ``{name, steps, losses, balancer}`` mapping,
    ``steps`` >= 1 on all but the last (which runs until ``train.steps``), missing ``losses`` /
    ``balancer`` taken from the top-level keys."""
    stages = cfg["stages"]
    if cfg["train"]["warmup_stage"] is not None:
        raise ConfigError("train.warmup_stage and stages exclude each other: make the warm-up the first entry of stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"stages must be a non-empty list of {{name, steps, losses, balancer}} or null, got {stages!r}")
    last = len(stages) - 1
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise ConfigError(f"{where} must be a mapping {{name, steps, losses, balancer}}, got {stage!r}")
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(f"unknown config key {where}.{unknown[0]}; known: {', '.join(STAGE_KEYS)}")
        steps = stage.get("steps")
        if i < last:
            steps = check_value(f"{where}.steps", steps, "int", lambda v: v >= 1,
                                "an integer >= 1 (every stage but the last trains a set number of steps)")
        elif steps is not None:
            raise ConfigError(f"{where}.steps must be left out: the last stage runs until train.steps, got {steps!r}")
        name = stage.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{where}.name must be a string, got {name!r}")
        losses = copy.deepcopy(cfg["losses"]) if stage.get("losses") is None else stage["losses"]
        _check_losses(losses, f"{where}.losses")
        balancer = copy.deepcopy(cfg["balancer"]) if stage.get("balancer") is None else stage["balancer"]
        _check_balancer(balancer, f"{where}.balancer")
        stages[i] = {"name": name, "steps": steps, "losses": losses, "balancer": balancer}
