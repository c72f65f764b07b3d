"""The package's shape: imports point only down the layers, the registries are the one list of
their names, and params.yaml's comments name exactly what the registries hold."""

import ast
import re
from pathlib import Path

import pytest

from tests.test_pipeline import import_closure

ROOT = Path(__file__).resolve().parents[1]
# vdm's packages, lowest first: a module imports only from its own package or a lower layer
LAYERS = {"core": 0, "data": 1, "model": 1, "sampling": 2, "training": 3, "evaluation": 3, "app": 4}


def _vdm_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # module-level and function-local imports
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.startswith("vdm.") and n.split(".")[1] in LAYERS}


def upward_imports(root: Path) -> list[str]:
    """'vdm/PKG/module.py -> vdm.OTHER...' for every import of a package above PKG's layer, or of
    another package in PKG's own layer."""
    found = []
    for path in sorted((root / "vdm").rglob("*.py")):
        pkg = path.relative_to(root / "vdm").parts[0]
        if pkg not in LAYERS:
            continue
        for name in sorted(_vdm_imports(path)):
            other = name.split(".")[1]
            if other != pkg and LAYERS[other] >= LAYERS[pkg]:
                found.append(f"{path.relative_to(root).as_posix()} -> {name}")
    return found


def test_imports_point_only_down_the_layers():
    assert upward_imports(ROOT) == []


def test_the_layer_check_finds_an_upward_import(tmp_path):
    for pkg in LAYERS:
        (tmp_path / "vdm" / pkg).mkdir(parents=True)
    (tmp_path / "vdm" / "core" / "params.py").write_text("def f():\n    from vdm.sampling.steps import SAMPLERS\n")
    (tmp_path / "vdm" / "model" / "x.py").write_text("from vdm.data.splits import load_split\n")
    (tmp_path / "vdm" / "app" / "ok.py").write_text("from vdm.core.params import Params\n")
    assert upward_imports(tmp_path) == [
        "vdm/core/params.py -> vdm.sampling.steps",
        "vdm/model/x.py -> vdm.data.splits",
    ]


@pytest.mark.parametrize("stage", ["stages.download", "stages.preprocess"])
def test_the_data_stages_import_no_model_or_sampling_code(stage):
    """Adding a sampler or a weighting reruns neither the download nor the preprocessing."""
    modules = import_closure(ROOT, stage)
    assert not [m for m in modules if m.startswith(("vdm/model", "vdm/sampling", "vdm/training", "vdm/evaluation"))]


def _registries():
    from vdm.evaluation.metrics import PER_IMAGE_METRICS, SAMPLE_METRICS
    from vdm.model.weightings import WEIGHTINGS
    from vdm.sampling.steps import SAMPLERS

    return {"samplers": SAMPLERS, "weightings": WEIGHTINGS, "metrics": SAMPLE_METRICS, "per_image": PER_IMAGE_METRICS}


def _comment_choices(key: str) -> list[str]:
    """The names params.yaml's comment on `key:` lists as `a | b | c` (the first such run)."""
    for line in (ROOT / "params.yaml").read_text().splitlines():
        if re.match(rf"\s+{key}:", line):
            comment = line.split("#", 1)[1]
            run = re.search(r"[a-z_0-9]+(?: \| [a-z_0-9]+)+", comment)
            assert run, f"params.yaml's comment on {key} lists no choices"
            return run.group(0).split(" | ")
    raise AssertionError(f"no key {key} in params.yaml")


def test_params_yaml_comments_list_exactly_the_registered_names():
    regs = _registries()
    assert _comment_choices("sampler") == list(regs["samplers"])
    assert _comment_choices("loss_weighting") == list(regs["weightings"])


def test_every_registry_is_the_one_list_of_its_names():
    """Every entry is registered once, under a name params.yaml can hold."""
    for reg in _registries().values():
        assert len(reg) == len(set(reg)) > 0
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in reg)


@pytest.mark.parametrize(
    ("which", "section", "key", "bad"),
    [
        ("samplers", "sample", "sampler", "euler"),
        ("weightings", "model", "loss_weighting", "cosine"),
    ],
)
def test_params_take_exactly_the_registered_names(which, section, key, bad):
    """params.yaml's key accepts every registered name and refuses any other (naming the key and
    the choices, from the registry itself); a value that is no name is refused on reading."""
    from tests.helpers import raw_params
    from vdm.core.errors import ParamError
    from vdm.core.params import parse_params
    from vdm.core.registry import check_params

    reg = _registries()[which]

    def params(name):
        raw = raw_params()
        raw[section][key] = name
        return parse_params(raw)

    for name in reg:
        check_params(params(name), reg)
    with pytest.raises(ParamError) as refused:
        check_params(params(bad), reg)
    assert (refused.value.key, refused.value.value) == (f"{section}.{key}", bad)
    assert refused.value.allowed == f"one of {', '.join(reg)}"
    with pytest.raises(ParamError, match=rf"{section}\.{key}"):
        params("Bad Name")
