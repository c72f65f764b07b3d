"""Model files and resumable checkpoints.

models/ (a DVC output):   model.pt, ema.pt (state dicts: tensors only), config.json
checkpoints/ (not DVC):   <config hash>.pt, written atomically every train.checkpoint_every
                          steps and on SIGINT/SIGTERM; removed when training completes.

The checkpoint's name is a hash of everything that decides the trained weights (model and
train params, image size, the processed data's manifest), so a run with other params or
data never resumes from it, and never overwrites it either. Everything is loaded with
torch.load(weights_only=True): no pickled code ever runs.

load_model is the one loader of a model folder (the API, the CLI, the demo server, the sample and
evaluate stages and the benchmarks use it): config.json and the weights file are each checked
before use (missing, empty, cut short, not JSON, unknown or missing keys, wrong types, values
params.yaml's rules refuse, weights whose shapes are not the config's model, non-finite values),
and each problem is one UserError line naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import ConfigDict

from vdm.core.atomic import atomic_dir, atomic_path, write_bytes, write_json
from vdm.core.errors import ParamError, ParamErrors, UserError, short_repr
from vdm.core.params import DataParams, ModelParams, Params, Section, as_dict, parse_section
from vdm.core.runtime import resolve_precision

# train keys that do not change what a run computes, so not part of the config hash: a checkpoint
# resumes across them (processes: the global batch and its draws are the same whatever the count,
# to float rounding; fit_images: the post-training fits' sample, drawn after the last checkpoint)
NOT_HASHED = ("wandb", "num_workers", "device", "compile", "processes", "fit_images")


def data_id(processed: str | os.PathLike) -> str:
    """The processed data's identity: its manifest's hash ("none" without one)."""
    manifest = Path(processed) / "manifest.csv"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else "none"


def config_hash(params: Params, processed: str | os.PathLike) -> str:
    train = {k: v for k, v in as_dict(params.train).items() if k not in NOT_HASHED}
    blob = {"model": as_dict(params.model), "train": train, "image_size": params.data.image_size}
    blob = json.dumps(blob | {"data": data_id(processed)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def save(obj: dict, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically, then its checksum file (see the module docstring).

    Serialised in memory first: the bytes are hashed without reading the file back, the zip's
    inner folder is always "archive" (saving to a path names it after the temporary file, so
    identical weights gave different bytes), and a full disk is an OSError from a plain write.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    side = checksum_path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        side.unlink(missing_ok=True)  # before the rename: a stale checksum never sits beside a new file
    write_bytes(side, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())


def _read_verified(path: Path, what: str, fix: str) -> bytes:
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file. {fix}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found. {fix}") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror or e}). {fix}") from None
    if not data:
        raise UserError(f"{what} {path} is empty (0 bytes: a copy or a write that stopped at its start). {fix}")
    side = checksum_path(path)
    if not side.is_file():
        print(
            f"note: {path} has no checksum file {side.name} (written before checksums existed, or the run "
            "stopped between the two writes): checked by loading only",
            file=sys.stderr,
        )
        return data
    expected = (side.read_text(errors="replace").split() or ["<empty>"])[0]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise UserError(
            f"{what} {path} is damaged (truncated or changed on disk after it was written): its sha256 is "
            f"{actual} but {side.name} records {expected}. Both files are left in place. {fix}"
        )
    return data


def load(path: str | os.PathLike, what: str, fix: str = "Delete or move it to start over") -> dict:
    path = Path(path)
    data = _read_verified(path, what, fix)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL \S+", str(e))
        if found is None:
            raise UserError(f"{what} {path} cannot be loaded ({_first_line(e)}). It is left in place. {fix}") from None
        raise UserError(
            f"{what} {path} holds pickled Python objects, not only tensors ({found.group(0).rstrip('.')}): refusing "
            f"to load it, and nothing in it was run. This pipeline never writes such files; it is left in place. {fix}"
        ) from None
    except Exception as e:  # truncated zip, bad pickle opcode, ...
        raise UserError(f"{what} {path} cannot be loaded ({_first_line(e)}). It is left in place. {fix}") from None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


# what a training checkpoint holds (vdm.training.loop: save_checkpoint), and of which type
CHECKPOINT_KEYS = {
    "model": dict,
    "ema": dict,
    "optimizer": dict,
    "scheduler": dict,
    "step": int,
    "train_rows": list,
    "val_rows": list,
}


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, key: str):
        self.dir, self.key = Path(directory), key
        self.path = self.dir / f"{key}.pt"
        self.grids = self.dir / f"{key}-samples"  # the run's sample grids until they move to plots/samples

    def others(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.pt") if p != self.path) if self.dir.is_dir() else []

    def load(self) -> dict | None:
        # Temporary files of this config's checkpoint left by a killed run (SIGKILL cannot clean
        # up). Safe: only the training run that owns this config writes them, and it has not yet.
        for tmp in self.dir.glob(f".{self.key}.pt*.tmp") if self.dir.is_dir() else ():
            tmp.unlink(missing_ok=True)
        if not self.path.exists():
            return None
        fix = "Delete or move it (and its .sha256) to start over from step 0"
        state = load(self.path, "checkpoint", fix)
        if not isinstance(state, dict) or state.get("config_hash") != self.key:
            raise UserError(f"checkpoint {self.path} belongs to another config; delete it to start over")
        for key, tp in CHECKPOINT_KEYS.items():
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, tp) or (key == "step" and value < 0):
                if key not in state:
                    what = f"it has no {key!r}"
                elif isinstance(value, tp) and not isinstance(value, bool):
                    what = f"its {key!r} is {value}"
                else:
                    what = f"its {key!r} is a {type(value).__name__}, not a {tp.__name__}"
                raise UserError(
                    f"checkpoint {self.path} is not a complete training checkpoint: {what}. It is left in place. {fix}"
                )
        return state

    def save(self, state: dict) -> None:
        save({**state, "config_hash": self.key}, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        checksum_path(self.path).unlink(missing_ok=True)
        shutil.rmtree(self.grids, ignore_errors=True)


def write_model(directory: Path, model: torch.nn.Module, ema: torch.nn.Module, config: dict) -> None:
    """model.pt, ema.pt and config.json into an (empty, staged) directory."""
    save(model.state_dict(), directory / "model.pt")
    save(ema.state_dict(), directory / "ema.pt")
    write_json(directory / "config.json", config)


def save_model(models_dir: str | os.PathLike, model: torch.nn.Module, ema: torch.nn.Module, config: dict) -> None:
    """models/ is replaced whole: a failure (a full disk) leaves the previous model files intact and matching."""
    with atomic_dir(models_dir) as tmp:
        write_model(tmp, model, ema, config)


# --- the model folder: every file checked before use ---------------------------------------------
#
# models/ (and each scaling snapshot) holds config.json and weights files named <which>.pt: ema.pt
# and model.pt, always written by the train stage, and optional others loaded by name (guide.pt:
# the same net's EMA weights from earlier in training, for autoguidance). Each file is checked
# before it is used; every problem is one UserError line naming the file and what to do.

MODEL_FIX = "Restore it with `dvc checkout models`, or retrain with `dvc repro -f train`"
MAX_CONFIG_BYTES = 1 << 20  # the train stage's config.json is ~2 KB
CONFIG_KEYS = {"params": dict, "steps": int, "config_hash": str, "run_name": str}  # all written by the train stage
WEIGHTS = ("ema", "model")  # always there; any other <name>.pt is optional
WEIGHTS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
# keys added to the model section since a model was saved: a model saved without them takes the
# behaviour from before them
MODEL_KEYS_ADDED = {
    "self_condition": False,
    "weight_floor": 0.0,
    "qk_norm": False,
    "magnitude_preserving": False,
    "gamma_1_cap": 30.0,  # the largest gamma_max there was: no cap
}
# state-dict entries added since a model was saved: a model saved without them takes the fresh
# model's value (eps_scale: all ones, the network's own eps estimate)
STATE_KEYS_ADDED = ("eps_scale",)


class _SavedData(Section):
    """What the loader reads of config.json's params.data (the rest records the run)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    image_size: Annotated[int, DataParams.model_fields["image_size"]]


@dataclass(frozen=True)
class ModelConfig:
    """A model folder's config.json, checked: the folder, the file, what it holds (`raw`), the model
    it describes, the image size, and the shapes and dtypes of that model's network weights."""

    folder: Path
    path: Path
    raw: dict
    model: ModelParams
    image_size: int
    net: dict[str, tuple[tuple[int, ...], torch.dtype]]


def model_folder(models_dir: str | os.PathLike) -> Path:
    d = Path(models_dir)
    if not d.exists():
        raise UserError(
            f"model directory {d} not found: train one (`dvc repro train`), or `dvc checkout models` to restore "
            "the committed one"
        )
    if not d.is_dir():
        raise UserError(f"{d} is a file, not a model directory (config.json, ema.pt, model.pt): name the folder")
    return d


def read_json(path: Path, fix: str, limit: int = MAX_CONFIG_BYTES) -> object:
    """A small JSON file another stage wrote: missing, not a file, empty, over `limit` bytes, not
    UTF-8, cut short or not JSON is one UserError naming the file, then `fix`."""
    if not path.exists():
        raise UserError(f"{path} not found. {fix}")
    if not path.is_file():
        raise UserError(f"{path} is not a file. {fix}")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes: a copy or a write that stopped at its start). {fix}")
    if size > limit:
        raise UserError(f"{path} is {size} bytes, more than such a file can be ({limit} bytes). {fix}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}). {fix}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not text (byte {data[e.start]:#04x} at offset {e.start}): damaged or replaced. {fix}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):  # the text ends mid-value
            raise UserError(
                f"{path} is cut short: its JSON stops unfinished after {len(data)} bytes (an interrupted copy or a "
                f"full disk). {fix}"
            ) from None
        raise UserError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}). {fix}") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting thousands deep
        raise UserError(f"{path} is not valid JSON ({_first_line(e)}). {fix}") from None


def _type_name(tp: type | tuple) -> str:
    names = {dict: "an object", int: "a whole number", float: "a number", str: "a string", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in (tp if isinstance(tp, tuple) else (tp,)))


def _json_type(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def check_keys(path: Path, obj: dict, types: dict, required, fix: str, where: str = "") -> None:
    """Unknown keys, missing `required` keys and values not of their type (`types`: key -> type
    or tuple of types; a JSON true/false is no number unless bool is named) in a JSON object: one
    line, then `fix`."""
    for key in obj:
        if key not in types:
            raise UserError(
                f"{path}: {where}{short_repr(key)} is not a key this version of vdm knows (known: "
                f"{', '.join(types)}). {fix}"
            )
    for key in required:
        if key not in obj:
            raise UserError(f"{path}: {where}{key} is missing. {fix}")
    for key, value in obj.items():
        tp = types[key]
        tps = tp if isinstance(tp, tuple) else (tp,)
        if not isinstance(value, tps) or (isinstance(value, bool) and bool not in tps and object not in tps):
            raise UserError(
                f"{path}: {where}{key} = {short_repr(value)} is {_json_type(value)}, expected {_type_name(tp)}. {fix}"
            )


def _param_error(path: Path, e: ParamError) -> UserError:
    """A params rule's refusal of a config.json value, as one line naming config.json's key."""
    errors = e.errors if isinstance(e, ParamErrors) else [e]
    first = errors[0]
    if first.value == "<missing>":
        what = "is missing"
    elif first.allowed.startswith("unknown key"):
        what = "is not a key this version of vdm knows"
    else:
        what = f"= {short_repr(first.value)} is invalid: {first.allowed}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return UserError(f"{path}: params.{first.key} {what}{more}. {MODEL_FIX}")


def read_config(models_dir: str | os.PathLike) -> ModelConfig:
    """config.json of a model folder, checked: readable, whole, JSON, the known keys of the right
    types, the model section valid by params.yaml's rules and buildable for the image size."""
    from vdm.model.unet import UNet

    d = model_folder(models_dir)
    path = d / "config.json"
    if not path.exists():
        raise UserError(f"{path} not found: the folder holds no trained model's settings. {MODEL_FIX}")
    raw = read_json(path, MODEL_FIX)
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds {_json_type(raw)}, not the train stage's settings (an object). {MODEL_FIX}")
    check_keys(path, raw, CONFIG_KEYS, CONFIG_KEYS, MODEL_FIX)
    if raw["steps"] < 0:
        raise UserError(f"{path}: steps = {raw['steps']} is invalid: a whole number >= 0. {MODEL_FIX}")
    sections = raw["params"]
    check_keys(path, sections, dict.fromkeys(Params.model_fields, dict), ("data", "model"), MODEL_FIX, "params.")
    try:
        data = parse_section(_SavedData, sections["data"], "data")
        model = parse_section(ModelParams, {**MODEL_KEYS_ADDED, **sections["model"]}, "model")
    except ParamError as e:
        raise _param_error(path, e) from None
    try:
        with torch.device("meta"):  # shapes only: no memory, whatever size the config asks for
            net = UNet(model, data.image_size)
    except ValueError as e:
        raise UserError(
            f"{path}: params.model does not describe a network for {data.image_size}x{data.image_size} images "
            f"({e}). {MODEL_FIX}"
        ) from None
    shapes = {f"net.{k}": (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}
    return ModelConfig(d, path, raw, model, data.image_size, shapes)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "a scalar"


def _more(names: list[str]) -> str:
    return f"{names[0]}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def check_state(path: Path, state: dict, expected: dict, config: Path, prefix: str = "") -> None:
    """The entries of a weights file's state dict whose names start with `prefix` against the
    shapes and dtypes the config's model needs, every value finite: one line naming the first
    difference. `state` is a dict of named tensors (see _state_dict)."""
    disagree = (
        "the two come from different models. Restore both with `dvc checkout models`, or retrain with "
        "`dvc repro -f train`"
    )
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"{path} does not match {config}: the weights lack {_more(missing)}; {disagree}")
    extra = [k for k in state if k.startswith(prefix) and k not in expected]
    if extra:
        raise UserError(
            f"{path} does not match {config}: the weights hold {_more(extra)}, which the config's model has not; "
            f"{disagree}"
        )
    for k, (shape, dtype) in expected.items():
        t = state[k]
        if tuple(t.shape) != shape:
            raise UserError(
                f"{path} does not match {config}: {k} is {_shape(tuple(t.shape))} in the weights but "
                f"{_shape(shape)} in the config's model; {disagree}"
            )
        if t.dtype != dtype:
            raise UserError(f"{path} holds {k} as {t.dtype}, not {dtype}: not the train stage's file. {MODEL_FIX}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(
                f"{path} holds non-finite values (NaN or inf) in {k}: damaged, or saved from a diverged run. "
                f"{MODEL_FIX}"
            )


def _state_dict(path: Path, state: object) -> dict[str, torch.Tensor]:
    named = isinstance(state, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    )
    if not named:
        raise UserError(
            f"{path} holds {type(state).__name__}, not a model's weights (named tensors): damaged or replaced. "
            f"{MODEL_FIX}"
        )
    return state


def weights_path(models_dir: str | os.PathLike, which: str) -> Path:
    """<models_dir>/<which>.pt; `which` is a plain name (ema, model, guide ...), never a path."""
    if not isinstance(which, str) or WEIGHTS_NAME.fullmatch(which) is None:
        raise UserError(
            f"weights {short_repr(which)}: give a name such as {' or '.join(WEIGHTS)} (letters, digits, _ and -)"
        )
    return Path(models_dir) / f"{which}.pt"


def load_model(
    models_dir: str | os.PathLike, which: str = "ema", device: str | torch.device = "cpu", precision: str = "fp32"
):
    """The trained VDM (EMA weights by default, or the weights file <which>.pt of the folder) and
    its config, as saved by the train stage, its network computing in `precision` (auto | fp32 |
    bf16: vdm.core.runtime.resolve_precision; the bound is float32 whatever it says)."""
    from vdm.model.diffusion import on_device

    model, raw = _load_model(models_dir, which)
    device = torch.device(device)
    model.net_dtype = resolve_precision(precision, device)
    return on_device(model, device).eval(), raw


def _load_model(models_dir: str | os.PathLike, which: str):
    """The trained VDM and its config, as saved by the train stage. Every file read is checked first (read_config,
    check_state): a problem is one UserError naming the file and the fix, and nothing is built
    larger than the weights on disk."""
    from vdm.model.diffusion import build_vdm

    path = weights_path(models_dir, which)
    cfg = read_config(models_dir)
    if which not in WEIGHTS and not path.exists():
        have = sorted(p.stem for p in cfg.folder.glob("*.pt"))
        raise UserError(
            f"{path} not found: this model has no {which} weights (its folder holds "
            f"{', '.join(f'{h}.pt' for h in have) or 'no weights'}): use one of those, or train a model with them"
        )
    state = _state_dict(path, load(path, f"{which} weights", MODEL_FIX))
    check_state(path, state, cfg.net, cfg.path, prefix="net.")  # before the model is built: its size is the file's
    model = build_vdm(cfg.model, cfg.image_size)
    fresh = model.state_dict()
    state = {**{k: fresh[k] for k in STATE_KEYS_ADDED if k not in state}, **state}
    check_state(path, state, {k: (tuple(v.shape), v.dtype) for k, v in fresh.items()}, cfg.path)
    model.load_state_dict(state)
    return model, cfg.raw
