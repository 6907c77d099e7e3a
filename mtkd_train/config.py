"""`TrainConfig`: every setting of a distillation run, validated at the edge.

Built from a TOML/YAML file and/or CLI flags (flags win); components receive flat, typed
arguments taken from it. Each error names the config key / CLI flag, the value and what was
expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtkd_train.aggregate import AGGREGATORS
from mtkd_train.losses import KERNELS, LOSS_KINDS

__all__ = ["FEATURE_KINDS", "RUN_ONLY_KEYS", "ConfigError", "FeatureSpec", "TrainConfig", "load_config_file",
           "parse_features"]

RUN_ONLY_KEYS = ("out", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_cache", "eval_every", "eval_max_samples",
                 "mc_samples", "tensorboard", "verify_cache", "num_workers", "device", "progress", "trust_factory",
                 "find_unused_parameters", "lanes", "merge_lora", "kernels", "merge_in")
"""Keys that do not change what a training step computes: left out of `TrainConfig.fingerprint`."""
_FEATURE_DEFAULTS = {"feature_aggregate": "per_teacher", "feature_tau": 0.05, "student_pooling": "auto"}
FEATURE_KINDS = ("mse", "cosine", "similarity", "contrastive")  # = losses.FEATURE_LOSS_KINDS
_FEATURE_OPTIONS = ("layer", "student_layer", "beta", "kind", "projection")


class ConfigError(ValueError):
    """A configuration key has a value that cannot be used."""


@dataclass(frozen=True)
class FeatureSpec:
    """One teacher's feature-matching term, parsed from `features` (see :func:`parse_features`).

    Attributes:
        teacher: Teacher name.
        layer: The teacher's cached hidden-state layer (HF index, as given at precompute).
        student_layer: The student's hidden-state layer matched to it (HF index; -1 = last).
        beta: Weight of the term (>= 0).
        kind: ``"mse"``, ``"cosine"``, or relational ``"similarity"`` / ``"contrastive"``.
        projection: A learned ``Linear(student width, teacher width)`` before matching; None = the
            recipe's default (on with logits, off for feature-only teachers).
    """

    teacher: str
    layer: int = -1
    student_layer: int = -1
    beta: float = 1.0
    kind: str = "mse"
    projection: bool | None = None


def _layer(teacher: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"`features`: {teacher}.{key} is {value!r}; expected an integer layer index")
    return value


def _feature(teacher: str, options: Any) -> FeatureSpec:
    if not isinstance(options, Mapping):
        raise ConfigError(f"`features`: the options of teacher {teacher!r} are {options!r}; expected a mapping "
                          f"such as {{\"layer\": -1, \"beta\": 1.0}}")
    unknown = sorted(set(options) - set(_FEATURE_OPTIONS))
    if unknown:
        raise ConfigError(f"`features`: teacher {teacher!r} has unknown option(s) {unknown}; valid options are "
                          f"{list(_FEATURE_OPTIONS)}")
    beta = options.get("beta", 1.0)
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta >= 0:
        raise ConfigError(f"`features`: {teacher}.beta is {beta!r}; expected a number >= 0")
    kind = options.get("kind", "mse")
    if kind not in FEATURE_KINDS:
        raise ConfigError(f"`features`: {teacher}.kind is {kind!r}; expected one of {list(FEATURE_KINDS)}")
    projection = options.get("projection")
    if projection is not None and not isinstance(projection, bool):
        raise ConfigError(f"`features`: {teacher}.projection is {projection!r}; expected true or false")
    return FeatureSpec(teacher, _layer(teacher, "layer", options.get("layer", -1)),
                       _layer(teacher, "student_layer", options.get("student_layer", -1)), float(beta), kind,
                       projection)


def parse_features(features: Mapping[str, Any], teachers: Sequence[str]) -> tuple[FeatureSpec, ...]:
    """Validate the `features` mapping; the one place it is read.

    Args:
        features: Teacher name -> options (``layer``, ``student_layer``, ``beta``, ``kind``).
        teachers: The run's teachers; every key of ``features`` must be one of them.

    Returns:
        One :class:`FeatureSpec` per configured teacher, in the order of ``teachers``.

    Raises:
        ConfigError: an unknown teacher or option, a bad value, or mixed kinds.
    """
    unknown = sorted(set(features) - set(teachers))
    if unknown:
        raise ConfigError(f"`features` names teachers {unknown} that are not in `teachers` {list(teachers)}")
    specs = tuple(_feature(t, features[t]) for t in teachers if t in features)
    kinds = sorted({s.kind for s in specs})
    if len(kinds) > 1:
        raise ConfigError(f"`features`: use one kind ({', '.join(FEATURE_KINDS)}) for all teachers, got {kinds}")
    return specs


def _flag(key: str) -> str:
    return f"`{key}` (--{key.replace('_', '-')})"


@dataclass(frozen=True)
class TrainConfig:
    """A distillation run. Every field is also a CLI flag (`--field-name`) and a config-file key."""

    cache: str = ""
    """Training cache path or fsspec URL."""
    teachers: tuple[str, ...] = ()
    """Teacher names in the cache to distil from."""
    student: str = ""
    """Student: HF folder (config.json, with or without weights) or `package.module:function`."""
    out: str = "runs/mtkd"
    """Run folder: checkpoints, metrics.jsonl, the final student."""
    student_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for a student factory."""
    aggregate: str = "entropy"
    """Aggregation operator (a name of `mtkd_train.aggregate.AGGREGATORS`): mean, loglinear, entropy, confidence,
    label_aware, gate, routing, mtbkd; or auto: score them on held-out cached positions (the eval cache if
    given, else the end of the cache) before step 0 and use the best (see mtkd-score)."""
    aggregate_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Operator options, e.g. {weights = [0.5, 0.5]}, {tau = 1.0}, {domain_to_teacher = {0 = 1}}."""
    loss: str = "forward_kl"
    """KD divergence (a name of `mtkd_train.losses.LOSS_KINDS`): forward_kl, reverse_kl, js, tv, skew_kl,
    skew_reverse_kl."""
    tail_mode: str = "bucket"
    """How each teacher's tail mass enters the loss: bucket (one extra outcome) or spread."""
    alpha: float = 0.5
    """loss = alpha * KD + (1 - alpha) * CE on hard labels."""
    loss_impl: str = "auto"
    """How alpha * KD + (1 - alpha) * CE is computed: auto (forward_kl: fused_head if the student allows it, else
    fused; other losses: reference), fused (closed-form gradient in row chunks, forward_kl only), fused_head (also
    fused with the LM head: the logits are never built; causal-LM students) or reference (autograd)."""
    kernels: str = "auto"
    """The fused loss's two dense row loops at T = 1: native (the package's C++ kernel for float32 CPU logits,
    built on first use; other dtypes compiled), compiled (torch.compile: C++ on the CPU, Triton on CUDA; the first
    step compiles), eager (PyTorch's kernels) or auto (native on the CPU where the C++ kernel builds, else compiled
    where torch.compile works, else eager with a warning; $MTKD_KERNELS overrides auto, MTKD_NATIVE=0 turns the
    C++ kernel off). Same values up to summation order."""
    temperature: float = 1.0
    """KD temperature T (loss scaled by T^2)."""
    features: Mapping[str, Any] = field(default_factory=dict)
    """Feature distillation: {teacher = {layer = -1, student_layer = -1, beta = 1.0, kind = "mse", projection}}; each
    teacher's cached `layer` is matched to the student's `student_layer`; kind mse, cosine, or relational
    similarity / contrastive; other keys are refused. Only feature-only teachers: no KD or CE term."""
    feature_aggregate: str = "per_teacher"
    """Several feature teachers: `per_teacher` (one term and projection each) or `mean` (one mean target)."""
    feature_tau: float = 0.05
    """Softmax temperature of the `contrastive` feature loss."""
    student_pooling: str = "auto"
    """Feature-only teachers with pooled features: the student's sentence pooling (`auto` = the teachers',
    else e.g. `mean`, `cls`, `mean+normalize`); saved beside the student as 1_Pooling/config.json."""
    gate_entropy: float = 0.01
    """Weight of the gate's entropy regulariser (gate aggregator only)."""
    batch_size: int = 8
    """Samples per step per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 100
    """Optimizer steps to run. The LR schedule is fixed when a run starts: a --resume with another
    --max-steps continues that schedule (the LR stays at its minimum past the original end)."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps before cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    clip_grad: float = 1.0
    """Max gradient norm (0 disables clipping)."""
    seed: int = 0
    """Seed of model init, data order and dropout."""
    shuffle_chunks: int = 4
    """Chunks mixed in the shuffle window (bounded shuffle buffer)."""
    lanes: int | None = None
    """Lanes of the data order (interleaved disjoint chunk sets): with R ranks, each rank decodes only its
    L/R lanes' chunks when R divides L and L divides batch_size * R. Default: the world size. A --resume keeps
    the checkpoint's value (exact on any world size; disjoint where it still divides)."""
    num_workers: int = 2
    """DataLoader workers decoding the next batches while the step runs (0: decode in the training
    process). The batch order, and so the losses, are the same for any value."""
    merge_in: str = "auto"
    """Where the teachers' targets are merged (operator weights, union, mixture) for the fused loss: loader (in
    the DataLoader workers, so the step runs only the student and the loss), step (inside the training step) or
    auto (loader when training on the CPU, step on CUDA, where the GPU merges faster than a CPU worker). The gate
    reads the student, so it always merges in the step. Same values either way on the same device
    (mtkd_train.teacher_side)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    amp: str = "auto"
    """auto (bf16 on CUDA, off on CPU), bf16, fp16, off."""
    checkpoint_every: int = 50
    """Save a checkpoint every N optimizer steps (0: only on SIGTERM); always at the end of the run."""
    keep_checkpoints: int = 3
    """Keep the newest N checkpoints mtkd wrote in out/checkpoints and delete older ones (0: keep all)."""
    log_every: int = 1
    """Write metrics every N steps."""
    eval_cache: str | None = None
    """Held-out cache (same tokenizer) for perplexity/accuracy and ECE."""
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """fsspec options for remote caches (e.g. {client_kwargs = {endpoint_url = "http://..."}}). Never written
    to config.json, checkpoints or logs: pass them again on --resume (or use environment credentials)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    eval_max_samples: int | None = None
    """Cap on evaluated samples."""
    mc_samples: int = 0
    """MC-dropout passes at evaluation for predictive uncertainty (MT-BKD); 0 disables."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the tensorboard package)."""
    verify_cache: bool = False
    """Run a full checksum verification of the cache before training."""
    min_alignment: float = 0.5
    """Refuse a teacher on another tokenizer aligned with fewer than this share of the student's positions."""
    progress: bool = True
    """Show a tqdm progress bar."""
    find_unused_parameters: bool = False
    """DDP's find_unused_parameters: set it only for a student whose forward leaves some parameters
    without a gradient (DDP then says so); it costs a graph traversal per step."""
    trust_factory: bool = False
    """Let a --student folder's factory.json import and run the Python factory it names (code from
    that folder's author). Naming a factory as --student pkg.mod:fn needs no flag."""
    lora_r: int = 0
    """LoRA rank: > 0 freezes the (pretrained) student and trains low-rank adapters instead (needs
    the optional extra `mtkd[lora]`, i.e. peft; docs/INSTRUCTION.md). 0: full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapter update is alpha / r * B A."""
    lora_targets: str = ""
    """Comma-separated module names to adapt (e.g. q_proj,v_proj); empty: peft's default for the architecture."""
    merge_lora: bool = False
    """Save the final student with the adapters merged into its weights (a plain HF model) instead of the adapters."""

    def __post_init__(self) -> None:
        if not self.cache:
            raise ConfigError(f"{_flag('cache')} is required: the cache to train from")
        if not self.teachers:
            raise ConfigError(f"{_flag('teachers')} is required: e.g. --teachers a,b")
        if not self.student:
            raise ConfigError(f"{_flag('student')} is required: an HF config folder or package.module:function")
        self._check_lora()
        if self.aggregate not in AGGREGATORS and self.aggregate != "auto":
            raise ConfigError(f"{_flag('aggregate')} is {self.aggregate!r}; expected auto or one of {sorted(AGGREGATORS)}")
        if self.aggregate == "auto" and self.aggregate_kwargs:
            raise ConfigError(f"{_flag('aggregate')} auto chooses the options itself; drop `aggregate_kwargs` "
                              f"{dict(self.aggregate_kwargs)} or name an operator")
        if self.loss not in LOSS_KINDS:
            raise ConfigError(f"{_flag('loss')} is {self.loss!r}; expected one of {list(LOSS_KINDS)}")
        if self.loss_impl not in ("auto", "fused", "fused_head", "reference"):
            raise ConfigError(f"{_flag('loss_impl')} is {self.loss_impl!r}; expected auto, fused, fused_head or "
                              f"reference")
        if self.merge_in not in ("auto", "loader", "step"):
            raise ConfigError(f"{_flag('merge_in')} is {self.merge_in!r}; expected auto, loader or step")
        if self.kernels not in KERNELS:
            raise ConfigError(f"{_flag('kernels')} is {self.kernels!r}; expected {', '.join(KERNELS[:-1])} or {KERNELS[-1]}")
        if self.loss_impl in ("fused", "fused_head") and self.loss != "forward_kl":
            raise ConfigError(f"{_flag('loss_impl')} {self.loss_impl} needs --loss forward_kl, got {self.loss!r}; use auto or "
                              f"reference for the other divergences (docs/LOSSES.md says why they are not fused)")
        if self.tail_mode not in ("bucket", "spread"):
            raise ConfigError(f"{_flag('tail_mode')} is {self.tail_mode!r}; expected 'bucket' or 'spread'")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{_flag('alpha')} is {self.alpha}; expected a value in [0, 1]")
        if not self.temperature > 0:
            raise ConfigError(f"{_flag('temperature')} is {self.temperature}; expected a value > 0")
        if self.lanes is not None and self.lanes < 1:
            raise ConfigError(f"{_flag('lanes')} is {self.lanes}; expected an integer >= 1")
        for key in ("batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{_flag(key)} is {getattr(self, key)}; expected an integer >= 1")
        for key in ("lr", "weight_decay", "clip_grad", "gate_entropy", "warmup_steps", "eval_every", "mc_samples",
                    "num_workers", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{_flag(key)} is {getattr(self, key)}; expected a value >= 0")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"{_flag('amp')} is {self.amp!r}; expected auto, bf16, fp16 or off")
        if len(set(self.teachers)) != len(self.teachers):
            raise ConfigError(f"{_flag('teachers')} lists a teacher twice: {list(self.teachers)}")
        parse_features(self.features, self.teachers)
        if self.feature_aggregate not in ("per_teacher", "mean"):
            raise ConfigError(f"{_flag('feature_aggregate')} is {self.feature_aggregate!r}; expected per_teacher or mean")
        if not self.feature_tau > 0:
            raise ConfigError(f"{_flag('feature_tau')} is {self.feature_tau}; expected a value > 0")

    @property
    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        """`features`, parsed and validated (teacher order)."""
        return parse_features(self.features, self.teachers)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {cls.keys()}")
        d = dict(d)
        if isinstance(d.get("teachers"), str):
            d["teachers"] = tuple(t.strip() for t in d["teachers"].split(",") if t.strip())
        elif "teachers" in d:
            d["teachers"] = tuple(d["teachers"])
        for key, f in ((f.name, f) for f in dataclasses.fields(cls)):
            if key in d and d[key] is not None and f.type in ("int", "float") and not isinstance(d[key], (int, float)):
                raise ConfigError(f"config key {_flag(key)} is {d[key]!r}; expected a number")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["teachers"] = list(self.teachers)
        d["student_kwargs"] = dict(self.student_kwargs)
        d["aggregate_kwargs"] = dict(self.aggregate_kwargs)
        d["features"] = dict(self.features)
        d.pop("storage_options")  # may hold credentials: never stored, logged or fingerprinted
        return d

    def _check_lora(self) -> None:
        from mtkd_train.lora import PEFT_FIX, peft_available

        if self.lora_r < 0 or self.lora_alpha <= 0:
            raise ConfigError(f"{_flag('lora_r')} must be >= 0 and {_flag('lora_alpha')} > 0; got {self.lora_r} "
                              f"and {self.lora_alpha}")
        if self.lora_r == 0 and (self.lora_targets or self.merge_lora):
            raise ConfigError(f"{_flag('lora_targets')} and {_flag('merge_lora')} need {_flag('lora_r')} > 0")
        if self.lora_r > 0 and not peft_available():
            raise ConfigError(f"{_flag('lora_r')} needs the peft package, which is not installed; {PEFT_FIX}")

    def fingerprint(self) -> str:
        """Hash of the fields that change what a step computes (not run length, logging, paths)."""
        d = self.to_dict()
        for volatile in RUN_ONLY_KEYS:
            d.pop(volatile)
        for key, default in _FEATURE_DEFAULTS.items():  # runs from before these keys keep their fingerprint
            if d.get(key) == default:
                d.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {str(p)!r} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {str(p)!r} is not valid TOML: {e}") from e
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"--config {str(p)!r} must hold a mapping of keys")
        return value
    raise ConfigError(f"--config {str(p)!r}: use a .toml, .yaml or .yml file")
