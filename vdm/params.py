"""params.yaml: the one place hyperparameters live, validated up front.

Each section is a frozen dataclass. Loading checks every key: unknown keys (typos),
missing keys, wrong types and out-of-range values all fail at once with a
`ParamError` naming the key, the value and what is allowed. There are no defaults
in code: params.yaml states every value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from pathlib import Path

import yaml

from vdm.errors import ParamError, UserError

SOURCE_NAMES = ("auto", "kaggle", "pokeapi", "synthetic")


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ParamError(key, value, allowed)


def _exists(path: str) -> bool:
    """Whether a path exists; a name the OS cannot even look up (too long, a NUL byte) does not."""
    try:
        return Path(os.path.expanduser(path)).exists()
    except (OSError, ValueError):
        return False


def _check_seed(key: str, seed: int) -> None:
    """Seeds that torch's and numpy's generators both take, with room for per-step offsets."""
    _require(0 <= seed < 2**63, key, seed, "an integer from 0 to 2**63 - 1")


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
    count: int  # number of images drawn (two variants per species)
    seed: int

    def check(self, p: str) -> None:
        _require(2 <= self.count <= 1_000_000, f"{p}.count", self.count, "an integer from 2 to 1000000")
        _check_seed(f"{p}.seed", self.seed)


@dataclasses.dataclass(frozen=True)
class SplitParams:
    train: float  # fractions of Pokémon groups (not of images) in each split
    val: float
    test: float
    seed: int

    def check(self, p: str) -> None:
        for name in ("train", "val", "test"):
            v = getattr(self, name)
            _require(0 < v < 1, f"{p}.{name}", v, "a fraction strictly between 0 and 1 (no split may be empty)")
        total = self.train + self.val + self.test
        _require(
            math.isclose(total, 1.0, abs_tol=1e-6),
            f"{p}.train/val/test",
            (self.train, self.val, self.test),
            f"the three fractions must sum to 1 (they sum to {total:.6g})",
        )
        _check_seed(f"{p}.seed", self.seed)


@dataclasses.dataclass(frozen=True)
class LimitParams:
    max_files: int  # caps on what a download or archive may unpack
    max_mb: int

    def check(self, p: str) -> None:
        _require(self.max_files >= 1, f"{p}.max_files", self.max_files, "an integer >= 1")
        _require(self.max_mb >= 1, f"{p}.max_mb", self.max_mb, "an integer >= 1 (megabytes)")


@dataclasses.dataclass(frozen=True)
class DataParams:
    source: str
    synthetic: SyntheticParams
    limits: LimitParams
    image_size: int
    split: SplitParams
    preview: int

    def check(self, p: str) -> None:
        names = ", ".join(SOURCE_NAMES)
        _require(bool(self.source.strip()), f"{p}.source", self.source, f"one of {names}, or a path")
        if self.source not in SOURCE_NAMES:
            _require(
                _exists(self.source),
                f"{p}.source",
                self.source,
                f"one of {names}, or the path of an existing folder or .zip/.tar/.tar.gz archive "
                "(no such file or folder)",
            )
        _require(8 <= self.image_size <= 512, f"{p}.image_size", self.image_size, "an integer from 8 to 512")
        _require(0 <= self.preview <= 1024, f"{p}.preview", self.preview, "an integer from 0 to 1024")


@dataclasses.dataclass(frozen=True)
class ModelParams:
    schedule: typing.Literal["fixed_linear", "learned_linear", "learned_nn"]
    gamma_min: float  # initial (or fixed) gamma at t = 0 and t = 1
    gamma_max: float
    channels: int  # UNet width at the first level
    channel_mult: list[int]  # one entry per resolution level
    num_res_blocks: int  # per level
    attention_resolutions: list[int]  # feature-map sizes with self-attention
    dropout: float
    patch_size: int  # space-to-depth stem: 1, 2 or 4
    fourier_min: int  # Fourier features 2^n * 2pi for n in [fourier_min, fourier_max]
    fourier_max: int
    checkpointing: bool  # recompute activations in backward: less memory, ~1/3 more compute
    antithetic: bool  # antithetic (low-discrepancy) time sampling
    timesteps: int  # 0 = continuous-time loss, else T discrete steps
    prediction: typing.Literal["eps", "v", "x"]  # what the UNet outputs (v = alpha eps - sigma x)
    x_skip_noise: float  # prediction x: below this noise-to-signal ratio x_hat defaults to z_t / alpha_t
    loss_weighting: typing.Literal[
        "elbo", "sigmoid", "min_snr", "edm"
    ]  # weighting of the diffusion term the net trains on
    sigmoid_bias: float  # sigmoid weighting w = sigmoid(gamma_t + bias)
    self_condition: bool  # the net also sees its previous estimate of x (see vdm/diffusion.py)
    seed: int  # weight initialisation

    def check(self, p: str) -> None:
        _require(
            -30 <= self.gamma_min < self.gamma_max <= 30,
            f"{p}.gamma_min/gamma_max",
            (self.gamma_min, self.gamma_max),
            "gamma_min < gamma_max, both within [-30, 30]",
        )
        _require(1 <= self.channels <= 1024, f"{p}.channels", self.channels, "an integer from 1 to 1024")
        _require(
            1 <= len(self.channel_mult) <= 6 and all(1 <= m <= 16 for m in self.channel_mult),
            f"{p}.channel_mult",
            list(self.channel_mult),
            "1 to 6 integers from 1 to 16",
        )
        _require(1 <= self.num_res_blocks <= 16, f"{p}.num_res_blocks", self.num_res_blocks, "an integer from 1 to 16")
        _require(0 <= self.dropout < 1, f"{p}.dropout", self.dropout, "a number in [0, 1)")
        _require(self.patch_size in (1, 2, 4), f"{p}.patch_size", self.patch_size, "1, 2 or 4")
        _require(
            0 <= self.fourier_min <= 12 and self.fourier_min - 1 <= self.fourier_max <= 12,
            f"{p}.fourier_min/fourier_max",
            (self.fourier_min, self.fourier_max),
            "0 <= fourier_min <= fourier_max <= 12 (or fourier_max = fourier_min - 1 for none)",
        )
        _require(0 <= self.timesteps <= 100_000, f"{p}.timesteps", self.timesteps, "0 (continuous) or a step count")
        _require(0 <= self.x_skip_noise <= 1, f"{p}.x_skip_noise", self.x_skip_noise, "a number in [0, 1]")
        _require(-20 <= self.sigmoid_bias <= 20, f"{p}.sigmoid_bias", self.sigmoid_bias, "a number in [-20, 20]")
        _check_seed(f"{p}.seed", self.seed)


@dataclasses.dataclass(frozen=True)
class TrainParams:
    steps: int
    batch_size: int  # per process (x world size under torchrun)
    lr: float  # peak learning rate (AdamW)
    warmup_steps: int  # linear warm-up from 0
    cosine_decay: bool  # after warm-up: cosine decay to lr * final_lr_fraction (else constant)
    final_lr_fraction: float
    weight_decay: float
    grad_clip: float  # max gradient norm; 0 = off
    ema_decay: float  # EMA decay after warm-up: min(ema_decay, (1 + n)/(10 + n))
    hflip: bool  # mirror a random half of every batch left-right (sprites face both ways)
    fit_gamma_0: bool  # after training, set gamma_0 where the bound of training images is lowest
    log_every: int  # steps between logged loss rows (and non-finite checks)
    eval_every: int  # steps between validation bits/dim (EMA weights); 0 = only at the end
    eval_images: int  # validation (and train) images in each bits/dim estimate
    sample_every: int  # steps between sample grids; 0 = only at the end
    sample_count: int
    sample_steps: int
    checkpoint_every: int  # steps between resumable checkpoints (outside DVC outs)
    seed: int
    device: str  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    compile: bool  # torch.compile the UNet (CUDA)
    num_workers: int  # DataLoader worker processes
    wandb: typing.Literal["offline", "online", "disabled"]

    def check(self, p: str) -> None:
        def positive(name: str, v, what="an integer >= 1"):
            _require(v >= 1, f"{p}.{name}", v, what)

        positive("steps", self.steps)
        positive("batch_size", self.batch_size)
        _require(0 < self.lr <= 1, f"{p}.lr", self.lr, "a learning rate in (0, 1]")
        _require(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(0 <= self.final_lr_fraction <= 1, f"{p}.final_lr_fraction", self.final_lr_fraction, "in [0, 1]")
        _require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "a number >= 0")
        _require(self.grad_clip >= 0, f"{p}.grad_clip", self.grad_clip, "a number >= 0 (0 = off)")
        _require(0 <= self.ema_decay < 1, f"{p}.ema_decay", self.ema_decay, "a number in [0, 1)")
        positive("log_every", self.log_every)
        for name in ("eval_every", "sample_every"):
            _require(getattr(self, name) >= 0, f"{p}.{name}", getattr(self, name), "an integer >= 0 (0 = at the end)")
        positive("eval_images", self.eval_images)
        _require(0 <= self.sample_count <= 1024, f"{p}.sample_count", self.sample_count, "an integer from 0 to 1024")
        positive("sample_steps", self.sample_steps)
        positive("checkpoint_every", self.checkpoint_every)
        _check_seed(f"{p}.seed", self.seed)
        _check_device(f"{p}.device", self.device)
        _require(0 <= self.num_workers <= 64, f"{p}.num_workers", self.num_workers, "an integer from 0 to 64")


@dataclasses.dataclass(frozen=True)
class SampleParams:
    count: int  # sprites generated (EMA weights)
    sampler: typing.Literal["ancestral", "ddim", "dpmpp_2m"]  # see vdm/samplers.py
    steps: int  # network evaluations per sprite
    spacing: typing.Literal["t", "logsnr"]  # steps uniform in t (the learned schedule) or in log-SNR
    batch_size: int
    seed: int
    strip_rows: int  # samples shown in the denoising strip
    strip_points: int  # z_t snapshots per row, evenly spaced from t = 1 to 0
    clip_denoised: bool  # clip each step's prediction of x to the data range [-1, 1]
    denoise_last: bool  # the image is x_hat(z_0) (one more network call), not z_0 / alpha_0 rounded
    device: str  # auto | cpu | cuda | cuda:N | mps

    def check(self, p: str) -> None:
        _require(1 <= self.count <= 100_000, f"{p}.count", self.count, "an integer from 1 to 100000")
        _require(1 <= self.steps <= 100_000, f"{p}.steps", self.steps, "an integer from 1 to 100000")
        _require(1 <= self.batch_size <= 4096, f"{p}.batch_size", self.batch_size, "an integer from 1 to 4096")
        _check_seed(f"{p}.seed", self.seed)
        _require(0 <= self.strip_rows <= self.count, f"{p}.strip_rows", self.strip_rows, "0 to sample.count")
        _require(2 <= self.strip_points <= 64, f"{p}.strip_points", self.strip_points, "an integer from 2 to 64")
        _check_device(f"{p}.device", self.device)


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    time_samples: int  # K time samples per test image for bits/dim
    batch_size: int
    seed: int
    inception_weights: str  # path to torch-fidelity's Inception weights; "" = torch hub cache only
    closest_pairs: int  # sample/nearest-training-image pairs drawn in eval/closest_pairs.png
    swd_repeats: int  # bootstrap repeats of the sliced Wasserstein distance (its standard error)
    device: str

    def check(self, p: str) -> None:
        _require(2 <= self.swd_repeats <= 1000, f"{p}.swd_repeats", self.swd_repeats, "an integer from 2 to 1000")
        _require(1 <= self.time_samples <= 1000, f"{p}.time_samples", self.time_samples, "an integer from 1 to 1000")
        _require(1 <= self.batch_size <= 4096, f"{p}.batch_size", self.batch_size, "an integer from 1 to 4096")
        _check_seed(f"{p}.seed", self.seed)
        _require(0 <= self.closest_pairs <= 256, f"{p}.closest_pairs", self.closest_pairs, "0 to 256")
        _check_device(f"{p}.device", self.device)


# Spelled exactly, ASCII digits only (str.isdigit() also accepts "²").
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|mps|cuda:[0-9]+")


def _check_device(key: str, dev: str) -> None:
    _require(
        DEVICE_PATTERN.fullmatch(dev) is not None,
        key,
        dev,
        "auto, cpu, cuda, cuda:N or mps",
    )


@dataclasses.dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    train: TrainParams
    sample: SampleParams
    evaluate: EvaluateParams


def _convert(value: object, tp: object, key: str) -> object:
    """Check (and where lossless, convert) one value against a type annotation."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        _require(isinstance(value, bool), key, value, "true or false")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            key,
            value,
            "a finite number",
        )
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, value, "a string")
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        _require(value in choices, key, value, "one of " + ", ".join(map(str, choices)))
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp)
        _require(isinstance(value, list), key, value, "a list")
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this file, not user input


def _build(cls: type, raw: object, prefix: str) -> object:
    _require(isinstance(raw, dict), prefix or "params.yaml", raw, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for k in raw:
        _require(k in names, join(k), raw[k], f"unknown key; allowed keys here: {', '.join(names)}")
    values = {}
    for name in names:
        _require(name in raw, join(name), "<missing>", "this key is required in params.yaml")
        values[name] = _convert(raw[name], hints[name], join(name))
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(prefix)
    return obj


def parse_params(raw: object) -> Params:
    """Validate a params mapping (as read from YAML) into typed, frozen params."""
    return _build(Params, raw, "")


def parse_section(cls: type, raw: object, prefix: str):
    """Validate one section (e.g. ModelParams from a saved model's config)."""
    return _build(cls, raw, prefix)


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


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    return parse_params(read_yaml(path))


def as_dict(obj: object) -> dict:
    """Params (or a section) as plain dicts, e.g. for logging."""
    return dataclasses.asdict(obj)
