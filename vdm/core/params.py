"""params.yaml: the one place hyperparameters live, validated up front.

Each section is a frozen pydantic model: unknown keys (typos), missing keys, wrong types and
out-of-range values are all found in one pass and reported together, one line each, naming the
key, the value and what is allowed (`description` of the field). Types are strict: a bool is not
an integer, "7" is not a number (except YAML's 3e-4, which PyYAML reads as a string), and
nothing is coerced. There are no defaults in code for the pipeline's settings: params.yaml
states every value. A key that chooses a registry entry (model.loss_weighting, sample.sampler) is
checked here to be a name and against its registry by vdm.core.registry.check_params, which the
validate stage and the stages that use the registry call: this module imports nothing above
vdm/core, so the download and preprocess stages depend on no model or sampling code.
A preset (presets/NAME.yaml, a few settings) is laid over params.yaml here (read_preset,
load_params(path, preset)), each of its keys checked to be one of params.yaml's.
"""

import copy
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from vdm.core.errors import ParamError, ParamErrors, UserError, short_repr

SOURCE_NAMES = ("auto", "kaggle", "pokeapi", "synthetic")  # auto and vdm/data/sources.py's SOURCES (a test checks)
SPLITS = ("train", "val", "test")  # data.split's fractions; data/processed/<split>.npy
# Spelled exactly, ASCII digits only (str.isdigit() also accepts "²").
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|mps|cuda:[0-9]+")
# the network's compute dtype (vdm/core/runtime.py: resolve_precision); the bound is always fp32
PRECISIONS = ("auto", "fp32", "bf16")


PARAM_ERROR = "{key} = {shown} is invalid: {allowed}"  # a "param" error's message (ctx: key, shown, allowed)


def invalid(value: object, allowed: str, key: str = "") -> PydanticCustomError:
    """A check's failure, for a validator to raise: `key` names the keys involved (relative to the
    section; "" for the field being checked), `allowed` says what would pass. Outside validation
    (a ValueError) it reads as one line: "KEY = VALUE is invalid: ALLOWED"."""
    ctx = {"key": key, "value": value, "allowed": allowed, "shown": short_repr(value)}
    return PydanticCustomError("param", PARAM_ERROR, ctx)


def _yaml_float(v: object) -> object:
    """YAML reads 3e-4 (no dot) as a string: take it as the number it spells."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _list_as_tuple(v: object) -> object:
    return tuple(v) if isinstance(v, list) else v


def Int(allowed: str, **bounds) -> object:
    return Annotated[int, Field(description=allowed, **bounds)]


def Num(allowed: str, **bounds) -> object:
    return Annotated[float, BeforeValidator(_yaml_float), Field(description=allowed, allow_inf_nan=False, **bounds)]


def _one_of(*choices: int):
    def check(v: int) -> int:
        if v not in choices:
            raise invalid(v, " or ".join(", ".join(map(str, choices)).rsplit(", ", 1)))
        return v

    return AfterValidator(check)


def _device(v: str) -> str:
    if DEVICE_PATTERN.fullmatch(v) is None:
        raise invalid(v, "auto, cpu, cuda, cuda:N or mps")
    return v


Seed = Int("an integer from 0 to 2**63 - 1", ge=0, lt=2**63)  # what torch and numpy take, with room for offsets
Device = Annotated[str, AfterValidator(_device), Field(description="auto, cpu, cuda, cuda:N or mps")]
Positive = Int("an integer >= 1", ge=1)
# a registry entry's name: which names exist is the registry's to say (vdm.core.registry.check_params)
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", description="a name: lowercase letters, digits and _")]
IntList = Annotated[tuple[int, ...], BeforeValidator(_list_as_tuple), Field(description="a list of integers")]
_SPAN = "two numbers [a, b] with 0 <= a < b <= 1 (the walk's t: 1 is pure noise, 0 the image)"


def _pair(v: object) -> object:
    """A YAML list (or a tuple) of two numbers 0 <= a < b <= 1 as a tuple; anything else fails here,
    whole, with the value as it was written (a list stays a list in the message)."""
    if not isinstance(v, (list, tuple)):
        return v
    items = tuple(map(_yaml_float, v))
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items)
    if len(items) != 2 or (numbers and not 0 <= items[0] < items[1] <= 1):
        raise invalid(v, _SPAN)
    return items


# a part of the walk, [a, b] in t (the learned schedule's time: gamma(t) from gamma(0) to gamma(1))
Span = Annotated[
    tuple[float, float],
    BeforeValidator(_pair),
    Field(description=_SPAN),
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SyntheticParams(Section):
    count: Int("an integer from 2 to 1000000", ge=2, le=1_000_000)  # images drawn (two variants per species)
    seed: Seed


_FRACTION = "a fraction strictly between 0 and 1 (no split may be empty)"


class SplitParams(Section):
    train: Num(_FRACTION, gt=0, lt=1)  # fractions of Pokémon groups (not of images) in each split
    val: Num(_FRACTION, gt=0, lt=1)
    test: Num(_FRACTION, gt=0, lt=1)
    seed: Seed

    @model_validator(mode="after")
    def _sum_to_one(self):
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            fractions = (self.train, self.val, self.test)
            raise invalid(fractions, f"the three fractions must sum to 1 (they sum to {total:.6g})", "train/val/test")
        return self


class LimitParams(Section):
    max_files: Positive  # caps on what a download or archive may unpack
    max_mb: Int("an integer >= 1 (megabytes)", ge=1)


def _exists(path: str) -> bool:
    """Whether a path exists; a name the OS cannot even look up (too long, a NUL byte) does not."""
    try:
        return Path(os.path.expanduser(path)).exists()
    except (OSError, ValueError):
        return False


def _source(v: str) -> str:
    names = ", ".join(SOURCE_NAMES)
    if not v.strip():
        raise invalid(v, f"one of {names}, or a path")
    if v not in SOURCE_NAMES and not _exists(v):
        raise invalid(
            v,
            f"one of {names}, or the path of an existing folder or .zip/.tar/.tar.gz archive (no such file or folder)",
        )
    return v


class DataParams(Section):
    source: Annotated[
        str, AfterValidator(_source), Field(description="one of auto, kaggle, pokeapi, synthetic, or a path")
    ]
    synthetic: SyntheticParams
    limits: LimitParams
    image_size: Int("an integer from 8 to 512", ge=8, le=512)
    split: SplitParams
    preview: Int("an integer from 0 to 1024", ge=0, le=1024)


class ModelParams(Section):
    schedule: Literal["fixed_linear", "learned_linear", "learned_nn"]
    gamma_min: Num("a finite number")  # initial (or fixed) gamma at t = 0 and t = 1
    gamma_max: Num("a finite number")
    gamma_1_cap: Num("a finite number")  # a learned gamma_1 is held at or below this (vdm/model/schedules.py)
    channels: Int("an integer from 1 to 1024", ge=1, le=1024)  # UNet width at the first level
    channel_mult: Annotated[  # one entry per resolution level
        tuple[Annotated[int, Field(ge=1, le=16)], ...],
        BeforeValidator(_list_as_tuple),
        Field(min_length=1, max_length=6, description="1 to 6 integers from 1 to 16"),
    ]
    num_res_blocks: Int("an integer from 1 to 16", ge=1, le=16)  # per level
    attention_resolutions: IntList  # feature-map sizes with self-attention
    qk_norm: bool  # attention logits sqrt(d) cos(q, k): unit-length queries and keys, bounded logits
    magnitude_preserving: bool  # EDM2's layers: normalised weights, no GroupNorm or biases (vdm/model/magnitude.py)
    dropout: Num("a number in [0, 1)", ge=0, lt=1)
    patch_size: Annotated[int, _one_of(1, 2, 4), Field(description="1, 2 or 4")]  # space-to-depth stem
    fourier_min: Int("an integer from 0 to 12", ge=0, le=12)  # Fourier features 2^n * 2pi, n in [min, max]
    fourier_max: Int("an integer from -1 to 12", ge=-1, le=12)
    checkpointing: bool  # recompute activations in backward: less memory, ~1/3 more compute
    antithetic: bool  # antithetic (low-discrepancy) time sampling
    timesteps: Int("0 (continuous) or a step count", ge=0, le=100_000)  # 0 = continuous-time loss, else T steps
    prediction: Literal["eps", "v", "x"]  # what the UNet outputs (v = alpha eps - sigma x)
    x_skip_noise: Num("a number in [0, 1]", ge=0, le=1)  # prediction x: below this noise/signal, x_hat ~ z_t / alpha_t
    loss_weighting: Name  # weighting of the diffusion term the net trains on (registry: vdm/model/weightings.py)
    sigmoid_bias: Num("a number in [-20, 20]", ge=-20, le=20)  # sigmoid weighting w = sigmoid(gamma_t + bias)
    weight_floor: Num("a number in [0, 1]", ge=0, le=1)  # w(gamma) at least this (0: none): trains low noise
    self_condition: bool  # the net also sees its previous estimate of x (see vdm/model/diffusion.py)
    # colour classes read from each image (vdm/model/colour.py): hue bins and grey; 0 = unconditioned.
    # Defaults, so a model folder saved before these keys existed still loads.
    colour_classes: Int("0 (none) or an integer from 2 to 64", ge=0, le=64) = 0
    colour_drop: Num("a number in (0, 1)", gt=0, lt=1) = 0.1  # share of training images shown no class
    seed: Seed  # weight initialisation

    @model_validator(mode="after")
    def _ranges(self):
        if not -30 <= self.gamma_min < self.gamma_max <= 30:
            raise invalid(
                (self.gamma_min, self.gamma_max), "gamma_min < gamma_max, both within [-30, 30]", "gamma_min/gamma_max"
            )
        if not self.gamma_max <= self.gamma_1_cap <= 30:
            raise invalid(self.gamma_1_cap, f"a number from gamma_max ({self.gamma_max}) to 30", "gamma_1_cap")
        if self.colour_classes == 1:
            raise invalid(self.colour_classes, "0 (none) or an integer from 2 to 64", "colour_classes")
        if not self.fourier_min - 1 <= self.fourier_max:
            raise invalid(
                (self.fourier_min, self.fourier_max),
                "0 <= fourier_min <= fourier_max <= 12 (or fourier_max = fourier_min - 1 for none)",
                "fourier_min/fourier_max",
            )
        return self


def unet_sizes(model: ModelParams, image_size: int, in_channels: int = 3) -> list[int]:
    """The side of the UNet's feature maps at each level (vdm/model/unet.py) for image_size x image_size
    images: the one home of the net's shape rules. The net is built from them and params.yaml is
    checked against them (Params), so a value the net cannot take is refused before any stage runs.
    A value that breaks them raises `invalid`, keyed from the top of params.yaml."""
    p, levels = model.patch_size, len(model.channel_mult)
    if image_size % p:
        fits = " or ".join(str(q) for q in (1, 2, 4) if image_size % q == 0)
        raise invalid(p, f"a stem that divides data.image_size = {image_size}: {fits}", "model.patch_size")
    need = in_channels * p * p
    if model.channels < need:
        raise invalid(
            model.channels,
            f"at least {need} with model.patch_size = {p}: {model.channels} is too few for a {p}x{p} stem (each "
            f"position carries {need} values of z_t, which the first level passes through)",
            "model.channels",
        )
    sizes = [image_size // p]
    while len(sizes) < levels:
        if sizes[-1] % 2:
            raise invalid(
                list(model.channel_mult),
                f"at most {len(sizes)} level{'s' if len(sizes) > 1 else ''} for data.image_size = {image_size} with "
                f"model.patch_size = {p}: the {sizes[-1]}x{sizes[-1]} feature map of level {len(sizes) - 1} cannot "
                "be halved",
                "model.channel_mult",
            )
        sizes.append(sizes[-1] // 2)
    bad = [r for r in model.attention_resolutions if r not in sizes]
    if bad:
        raise invalid(
            list(model.attention_resolutions),
            f"sizes from {sizes} (data.image_size / model.patch_size / 2^level), or [] for none "
            f"(not feature-map sizes of this UNet: {', '.join(map(str, bad))})",
            "model.attention_resolutions",
        )
    return sizes


def batch_split(batch_size: int, processes: int) -> str:
    """Why train.batch_size cannot be split evenly over `processes` training processes ("" if it can)."""
    if batch_size % processes:
        return f"a multiple of {processes}: the global batch is split evenly over {processes} training processes"
    return ""


class TrainParams(Section):
    steps: Positive
    batch_size: Positive  # the global batch: each of train.processes takes batch_size / processes
    lr: Num("a learning rate in (0, 1]", gt=0, le=1)  # peak learning rate (AdamW)
    warmup_steps: Int("an integer >= 0", ge=0)  # linear warm-up from 0
    cosine_decay: bool  # after warm-up: cosine decay to lr * final_lr_fraction (else constant)
    final_lr_fraction: Num("in [0, 1]", ge=0, le=1)
    decay_steps: Int("an integer >= 0 (0 = every step after the warm-up)", ge=0)  # the cosine's length
    weight_decay: Num("a number >= 0", ge=0)
    adam_beta2: Num("a number in (0, 1)", gt=0, lt=1)  # AdamW's second-moment decay
    adam_eps: Num("a number in (0, 0.01]", gt=0, le=0.01)  # AdamW's epsilon, added to sqrt(v)
    deep_lr_scale: Num("a number in (0, 1]", gt=0, le=1)  # the smallest feature map's blocks train at lr x this
    schedule_lr_scale: Num("a number in (0, 1]", gt=0, le=1)  # the learned noise schedule trains at lr x this
    update_clip: Num("a number >= 0 (0 = off: plain AdamW)", ge=0)  # per tensor, AdamW's rate divided by
    #   the update's RMS / this where above 1 (vdm/training/optim.py)
    grad_clip: Num("a number >= 0 (0 = off)", ge=0)  # max gradient norm
    ema_decay: Num("a number in [0, 1)", ge=0, lt=1)  # EMA decay after warm-up: min(ema_decay, (1 + n)/(10 + n))
    hflip: bool  # mirror a random half of every batch left-right (sprites face both ways)
    decay_balance: Num("a number in [0, 1]", ge=0, le=1)  # from the decay's start, an image's chance x (its
    #   Pokémon's image count)^-this (1: every Pokémon alike)
    fit_gamma_0: bool  # after training, set gamma_0 where the bound of training images is lowest
    fit_eps_scale: bool  # after training, scale the bound's eps estimate per gamma (least squares, training images)
    fit_images: Positive  # training images the two fits above see
    log_every: Positive  # steps between logged loss rows (and non-finite checks)
    eval_every: Int("an integer >= 0 (0 = at the end)", ge=0)  # validation bits/dim (EMA weights)
    eval_images: Positive  # validation (and train) images in each bits/dim estimate
    sample_every: Int("an integer >= 0 (0 = at the end)", ge=0)  # steps between sample grids
    sample_count: Int("an integer from 0 to 1024", ge=0, le=1024)
    sample_steps: Positive
    checkpoint_every: Positive  # steps between resumable checkpoints (outside DVC outs)
    seed: Seed
    device: Device  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    processes: Annotated[  # auto (one per CUDA device, else 1) | N: the train stage launches them itself
        Annotated[int, Field(ge=1, le=64)] | Literal["auto"], Field(description="auto or an integer from 1 to 64")
    ]
    precision: Literal[PRECISIONS]  # the network's dtype: auto (bf16 where fast) | fp32 | bf16
    compile: bool  # torch.compile the UNet (CUDA)
    num_workers: Int("an integer from 0 to 64", ge=0, le=64)  # DataLoader worker processes
    wandb: Literal["offline", "online", "disabled"]

    @model_validator(mode="after")
    def _decay_fits(self):
        room = self.steps - self.warmup_steps
        if self.decay_steps > max(0, room):
            raise invalid(
                self.decay_steps,
                f"at most train.steps - train.warmup_steps = {room} (the decay follows the warm-up), or 0",
                "decay_steps",
            )
        return self

    @model_validator(mode="after")
    def _processes_fit(self):
        if self.processes == "auto":
            return self  # how many: known on the machine only (stages/validate.py checks it there)
        if self.processes > 1 and self.device.startswith("cuda:"):
            raise invalid(
                self.processes,
                f"1 with train.device = {self.device} (every process would share one GPU), or set train.device = "
                "cuda for one GPU per process",
                "processes",
            )
        if why := batch_split(self.batch_size, self.processes):
            raise invalid(self.batch_size, f"{why} (train.processes)", "batch_size")
        return self


def _as_line_error(err: dict) -> dict:
    """A pydantic error (from ValidationError.errors()) as a line error to raise again, as it was."""
    if err["type"] == "missing":
        return {"type": "missing", "loc": err["loc"], "input": err["input"]}
    text = PARAM_ERROR if err["type"] == "param" else err["msg"].replace("{", "{{").replace("}", "}}")
    return {"type": PydanticCustomError(err["type"], text, err.get("ctx")), "loc": err["loc"], "input": err["input"]}


class SamplingOptions(Section):
    """How sprites are drawn: the walk and its batch. One frozen object, checked here, passed whole
    from the sample stage, the `vdm` command, the API, the demo server, the training grid and the
    benchmarks down to the samplers (vdm/sampling/samplers.py). Its defaults are params.yaml's
    sample section (a test holds them equal): the one place a caller without params.yaml takes
    them from. A caller changes fields with `replace`, which checks them again."""

    sampler: Name = "ancestral"  # a registered sampler (vdm/sampling/steps.py)
    steps: Int("an integer from 1 to 100000", ge=1, le=100_000) = 64  # network evaluations per sprite
    spacing: Literal["t", "logsnr"] = "t"  # steps uniform in t (the learned schedule) or in log-SNR
    batch_size: Int("an integer from 1 to 4096", ge=1, le=4096) = 32  # sprites per network call
    clip_denoised: bool = True  # clip each step's prediction of x to the data range [-1, 1]
    denoise_last: bool = True  # the image is x_hat(z_0) (one more network call), not z_0 / alpha_0 rounded
    temperature: Num("a number above 0 and at most 1", gt=0, le=1) = 0.8  # scales the ancestral steps' fresh noise
    # a colour-conditioned model's guidance: x_none + w (x_class - x_none); 1 = the class alone, 0 = none
    colour_guidance: Num("a number from 0 to 10", ge=0, le=10) = 1.0
    # the part of the walk that colour guidance acts on; elsewhere the class alone (weight 1, one call)
    colour_guidance_interval: Span = (0.0, 1.0)

    def replace(self, **changes) -> "SamplingOptions":
        """These options with `changes` (None: keep the value), checked: a bad value is a UserError
        "KEY = VALUE is invalid: ALLOWED" (no params.yaml in it: the caller passed the value)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        for key, value in changes.items():  # a caller's "0.5" is no number (params.yaml's 3e-4 is)
            field = SamplingOptions.model_fields.get(key)
            if isinstance(value, str) and field is not None and field.annotation in (int, float):
                raise UserError(f"{key} = {value!r} is invalid: {field.description}")
        try:
            return parse_section(SamplingOptions, {**self.model_dump(), **changes})
        except ParamError as e:
            errors = e.errors if isinstance(e, ParamErrors) else [e]
            raise UserError(
                "; ".join(f"{x.key} = {short_repr(x.value)} is invalid: {x.allowed}" for x in errors)
            ) from None


class SampleParams(SamplingOptions):
    """The sample section: the sampling options, every one stated in params.yaml, and the run's own."""

    count: Int("an integer from 1 to 100000", ge=1, le=100_000)  # sprites generated (EMA weights)
    seed: Seed
    strip_rows: Int("0 to sample.count", ge=0)  # samples shown in the denoising strip
    strip_points: Int("an integer from 2 to 64", ge=2, le=64)  # z_t snapshots per row, from t = 1 to 0
    precision: Literal[PRECISIONS]  # the network's dtype: auto (bf16 where fast) | fp32 | bf16
    device: Device

    @model_validator(mode="wrap")
    @classmethod
    def _every_option_stated(cls, raw, handler):
        """No default from code here: each sampling option missing from params.yaml is an error,
        reported with every other error of the section (one pass, one line each)."""
        missing = [k for k in SamplingOptions.model_fields if isinstance(raw, dict) and k not in raw]
        errors = [{"type": "missing", "loc": (k,), "input": raw} for k in missing]
        try:
            section = handler(raw)
        except ValidationError as e:
            errors += [_as_line_error(err) for err in e.errors()]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return section

    @model_validator(mode="after")
    def _strip_within_count(self):
        if self.strip_rows > self.count:
            raise invalid(self.strip_rows, "0 to sample.count", "strip_rows")
        return self

    @property
    def options(self) -> SamplingOptions:
        return SamplingOptions(**{k: getattr(self, k) for k in SamplingOptions.model_fields})


class EvaluateParams(Section):
    time_samples: Int("an integer from 1 to 1000", ge=1, le=1000)  # K time samples per test image for bits/dim
    batch_size: Int("an integer from 1 to 4096", ge=1, le=4096)
    seed: Seed
    inception_weights: str  # path to torch-fidelity's Inception weights; "" = torch hub cache only
    closest_pairs: Int("0 to 256", ge=0, le=256)  # sample/nearest-training-image pairs in eval/closest_pairs.png
    swd_repeats: Int("an integer from 2 to 1000", ge=2, le=1000)  # bootstrap repeats of the SWD (its s.e.)
    c2st_repeats: Int("0 (off) to 10", ge=0, le=10)  # seeds the classifier two-sample test averages
    filter_colours: Int("0 to 64", ge=0, le=64)  # figures of the samples reduced to this many colours; 0 = none
    device: Device


class Params(Section):
    data: DataParams
    model: ModelParams
    train: TrainParams
    sample: SampleParams
    evaluate: EvaluateParams

    @model_validator(mode="after")
    def _net_fits_the_images(self):
        unet_sizes(self.model, self.data.image_size)
        return self


def _allowed_by_type(tp: object) -> str:
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return "a valid value"


def _error(err: dict, cls: type[Section], raw: object, prefix: str) -> ParamError:
    """One pydantic error as a ParamError: the key as params.yaml spells it (a list's items fold
    into the list's key), the value given there, and what the field allows."""
    node, value, keys, field = cls, raw, [prefix] if prefix else [], None
    loc = list(err["loc"])
    while loc and isinstance(node, type) and issubclass(node, Section) and loc[0] in node.model_fields:
        name = loc.pop(0)
        keys.append(name)
        field = node.model_fields[name]
        node = field.annotation
        value = value.get(name, "<missing>") if isinstance(value, dict) else value
    if loc and err["type"] == "extra_forbidden":  # an unknown key, inside the section `node`
        keys.append(str(loc[0]))
        return ParamError(
            ".".join(keys), err["input"], f"unknown key; allowed keys here: {', '.join(node.model_fields)}"
        )
    key = ".".join(keys) or "params.yaml"
    if err["type"] == "param":
        ctx = err["ctx"]
        key = ".".join([*keys, ctx["key"]]) if ctx["key"] else key
        return ParamError(key, ctx["value"], ctx["allowed"])
    if err["type"] == "missing":
        return ParamError(key, "<missing>", "this key is required in params.yaml")
    if isinstance(node, type) and issubclass(node, Section):
        return ParamError(key, value, "a mapping of keys to values")
    return ParamError(key, value, (field.description if field else None) or _allowed_by_type(node))


def parse_section(cls: type[Section], raw: object, prefix: str = "") -> Section:
    """Validate a mapping (as read from YAML) into the typed, frozen section `cls`; every problem
    found is reported at once (ParamErrors: one line each; its key, value, allowed: the first's)."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        errors, seen = [], set()
        for err in e.errors():
            pe = _error(err, cls, raw, prefix)
            if pe.key not in seen:  # several items of one list: one line for the list
                seen.add(pe.key)
                errors.append(pe)
        raise (errors[0] if len(errors) == 1 else ParamErrors(errors)) from None


def parse_params(raw: object) -> Params:
    """Validate a params mapping (as read from YAML) into typed, frozen params."""
    return parse_section(Params, raw)


MAX_YAML_BYTES = 1 << 20  # params.yaml is ~7 KB; a megabyte is no parameter file


class StrictLoader(yaml.SafeLoader):
    """Safe YAML without anchors, aliases or duplicate keys: what is written is what is read,
    so a small file cannot expand into a huge value (an alias bomb), and a key given twice is
    an error, as DVC makes it, not silently the last one."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.YAMLError(
                f"line {event.start_mark.line + 1}: anchors and aliases (&{event.anchor} / *{event.anchor}) "
                "are not allowed: write the value out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
            seen.add(key) if isinstance(key, typing.Hashable) else None
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike, what: str = "params.yaml") -> object:
    """A YAML file through StrictLoader, at most MAX_YAML_BYTES; errors as one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run the stage from the project root, where {what} lives")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise UserError(f"{path} is {size} bytes, more than {MAX_YAML_BYTES} allowed for {what}")
    try:
        return yaml.load(path.read_bytes(), Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise UserError(f"{path} is not valid YAML: {detail[:300]}") from None


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: the keys `dvc exp run -S` takes."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def overlay(raw: dict, settings: dict, what: str, base: str = "params.yaml") -> dict:
    """A copy of raw params with every setting laid over it; a key raw lacks is a UserError."""
    out = copy.deepcopy(raw)
    for key, value in flatten(settings).items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise UserError(f"{what}: {key} is not a key of {base}")
        node[leaf] = copy.deepcopy(value)
    return out


def read_preset(name: str, params_path: str | os.PathLike = "params.yaml") -> tuple[dict, dict]:
    """presets/NAME.yaml (beside params.yaml): its own settings, and params.yaml with them laid over."""
    params_path = Path(params_path)
    presets = params_path.parent / "presets"
    path = presets / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in presets.glob("*.yaml"))) or "none"
        raise UserError(f"no preset {path}; presets: {known}")
    preset = read_yaml(path, "a preset") or {}
    if not isinstance(preset, dict):
        raise UserError(f"{path} is not a mapping of params.yaml's sections")
    return preset, overlay(read_yaml(params_path), preset, f"preset {path}", str(params_path))


def load_params(path: str | os.PathLike = "params.yaml", preset: str | None = None) -> Params:
    """params.yaml, validated; with presets/PRESET.yaml laid over it where one is named."""
    return parse_params(read_preset(preset, path)[1] if preset else read_yaml(path))


def as_dict(obj: Section) -> dict:
    """Params (or a section) as plain dicts, e.g. for logging and the config hash."""
    return obj.model_dump()
