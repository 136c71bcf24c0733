"""The architecture, checked from the code: math and networks import no Ray, DeepSpeed or MLflow; the model
registry builds, saves and reloads every arch; unknown arches are refused naming the allowed ones."""

from __future__ import annotations

import ast
import json
import os
import pathlib

import pytest
import torch
from pydantic import Field

from ambient_ray.config import ConfigError, Strict, build
from ambient_ray.models import registry, weights

PKG = pathlib.Path(__file__).resolve().parent.parent / "ambient_ray"
FORBIDDEN = ("ray", "deepspeed", "mlflow")


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("sub", ["models", "diffusion", "evaluation", "sampling", "theory"])
def test_math_and_networks_import_no_ray_deepspeed_or_mlflow(sub):
    files = sorted((PKG / sub).rglob("*.py"))
    assert files
    bad = {f"{f.relative_to(PKG)}: {m}" for f in files for m in _imports(f) if m.split(".")[0] in FORBIDDEN}
    assert not bad, f"Ray/DeepSpeed/MLflow imported under ambient_ray/{sub}: {sorted(bad)}"


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray.train\n    from mlflow.entities import Metric\n")
    assert _imports(f) == {"ray.train", "mlflow.entities"}


def _meta(arch: str) -> dict:
    a = registry.ARCHS.get(arch)
    tiny = next(p for p in a.presets if "tiny" in p)  # every family has a tiny size for tests
    model = a.config(preset=tiny, img_resolution=8, in_channels=1).model_dump(mode="json")
    kind = "denoiser" if a.role == "denoiser" else "noise"
    return {"kind": kind, "arch": arch, "model": model, "sigma_data": 0.5}


def _save(net: torch.nn.Module, meta: dict, folder: pathlib.Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {n: p.detach().contiguous() for n, p in net.named_parameters()}
    save_file(state, str(folder / "ema.safetensors"))
    save_file(state, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("arch", registry.ARCHS.names())
def test_every_registered_arch_builds_saves_and_reloads(arch, tmp_path):
    meta = _meta(arch)
    torch.manual_seed(0)
    net = registry.build(meta)
    with torch.no_grad():
        for p in net.parameters():  # random weights everywhere, so a reload that drops any tensor is seen
            p.copy_(torch.randn_like(p))
    _save(net, meta, tmp_path / "model")
    back = weights.load(str(tmp_path), meta["kind"])
    assert type(back) is type(net) and back.meta["arch"] == arch
    args = registry.example_inputs(registry.config_of(meta), 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(back(*args), net.eval()(*args))


def test_an_old_model_json_without_arch_loads_as_ddpmpp(tmp_path):
    meta = _meta("ddpmpp")
    torch.manual_seed(1)
    net = registry.build(meta)
    old = {"kind": "denoiser", "model": {k: v for k, v in meta["model"].items() if k not in ("arch", "preset")}}
    _save(net, old, tmp_path / "model")
    back = weights.load(str(tmp_path), "denoiser")
    assert registry.arch_of(back.meta) == "ddpmpp" and type(back).__name__ == "EDMDenoiser"
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(back(x, 1.0), net.eval()(x, 1.0))


def test_an_unknown_arch_is_refused_naming_the_allowed_ones():
    class Section(Strict):
        model: registry.config_type("denoiser") = Field(default_factory=registry.ARCHS.get("ddpmpp").config)

    with pytest.raises(ConfigError, match=r"config key 'model'.*unknown model.arch 'edm9'.*allowed here: ddpmpp"):
        build(Section, sets=["model.arch=edm9"])
    with pytest.raises(ConfigError, match="allowed here: ddpmpp"):  # a classifier is not a denoiser
        build(Section, sets=["model.arch=classifier"])
    assert build(Section).model.arch == "ddpmpp"
    with pytest.raises(KeyError, match="unknown model.arch 'edm9'; registered: classifier, ddpmpp"):
        registry.ARCHS.get("edm9")


def test_a_model_json_of_an_unknown_arch_is_refused_on_load(tmp_path):
    meta = {**_meta("ddpmpp"), "arch": "edm9"}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(KeyError, match="unknown model.arch 'edm9'"):
        weights.load(str(tmp_path))


def test_presets_fill_unset_keys_and_explicit_keys_win():
    cfg = registry.ARCHS.get("ddpmpp").config
    c = cfg(preset="cifar10", dropout=0.0)
    assert (c.model_channels, c.num_blocks, c.channel_mult, c.dropout) == (128, 4, [2, 2, 2], 0.0)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        cfg(preset="huge")


def test_the_interface_comes_from_the_data_and_a_given_value_must_agree():
    cfg = registry.ARCHS.get("ddpmpp").config
    m = registry.with_interface(cfg(model_channels=16), 8, 3)
    assert (m.img_resolution, m.in_channels, m.model_channels) == (8, 3, 16)
    with pytest.raises(ConfigError, match="model.img_resolution"):
        registry.with_interface(cfg(img_resolution=16), 8, 1)
    assert os.path.basename(registry.__file__) == "registry.py"


# ------------------------------------------------------------------------------ layers and cycles, from the imports

# who may not import whom: (importing package, imported packages or modules) under ambient_ray/; the math, networks
# and samplers (pure torch) do not import the Ray glue either: their progress bar is io.progress, free of Ray
RAY_GLUE = "io.ray_runtime"
LAYER_RULES = {
    "train": ("stages", "workflows", "cli"),
    "io": (
        "data",
        "models",
        "corruptions",
        "diffusion",
        "evaluation",
        "sampling",
        "theory",
        "train",
        "stages",
        "workflows",
        "cli",
    ),
    "models": ("train", "stages", "workflows", "cli", RAY_GLUE),
    "diffusion": ("train", "stages", "workflows", "cli", RAY_GLUE),
    "sampling": ("train", "stages", "workflows", "cli", RAY_GLUE),
    "evaluation": (RAY_GLUE,),
    "theory": ("data", "models", "train", "stages", "workflows", "cli", RAY_GLUE),
}


def module_graph(pkg: pathlib.Path) -> dict[str, set[str]]:
    """Every module of package ``pkg`` -> the package's modules it imports (anywhere in the file, functions
    included: an import inside a function still ties the two modules together). ``from a.b import c`` is the
    module ``a.b.c`` where that is a module, else ``a.b``."""
    root = pkg.name
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(pkg.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
        graph[name] = {d for d in deps if d in mods and d != name and d.split(".")[0] == root}
    return graph


def layer_violations(graph: dict[str, set[str]], rules: dict[str, tuple[str, ...]]) -> list[str]:
    """``a -> b`` for every import by a module of package ``a`` of a module ``b`` that a rule of ``a`` forbids: a
    package (``train``: any module under it) or a module (``io.ray_runtime``), named relative to the root."""
    bad = []
    for mod, deps in sorted(graph.items()):
        layer = mod.split(".")[1] if "." in mod else ""
        for dep in sorted(deps):
            rel = dep.partition(".")[2]
            if any(rel == r or rel.startswith(r + ".") for r in rules.get(layer, ())):
                bad.append(f"{mod} -> {dep}")
    return bad


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import cycle."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_layer_imports_upward():
    """train/ never imports stages/ (nor workflows, the CLI); io/ imports no data/, models/ or anything above it;
    the math, networks and samplers import nothing from the engine or the stages, nor the Ray glue (io.ray_runtime)."""
    bad = layer_violations(module_graph(PKG), LAYER_RULES)
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)


def test_the_package_has_no_import_cycle():
    cycles = import_cycles(module_graph(PKG))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_layer_and_cycle_checks_see_a_planted_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "ambient_ray"
    for d in ("train", "stages", "io", "data", "models"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "engine.py").write_text("def f():\n    from ambient_ray.stages.phema import g\n")
    (pkg / "stages" / "phema.py").write_text("from ambient_ray.train import engine\n\ndef g():\n    pass\n")
    (pkg / "io" / "plots.py").write_text("import ambient_ray.data.images\n")
    (pkg / "data" / "images.py").write_text("")
    (pkg / "io" / "ray_runtime.py").write_text("")
    (pkg / "io" / "progress.py").write_text("class Progress:\n    pass\n")
    # the Ray glue, imported inside a function, is seen; the Ray-free progress module is allowed
    (pkg / "models" / "features.py").write_text(
        "from ambient_ray.io.progress import Progress\n\ndef f():\n    from ambient_ray.io import ray_runtime\n"
    )
    graph = module_graph(pkg)
    assert graph["ambient_ray.train.engine"] == {"ambient_ray.stages.phema"}
    assert graph["ambient_ray.stages.phema"] == {"ambient_ray.train.engine"}  # `from pkg import module`
    assert import_cycles(graph) == [["ambient_ray.stages.phema", "ambient_ray.train.engine"]]
    assert layer_violations(graph, LAYER_RULES) == [
        "ambient_ray.io.plots -> ambient_ray.data.images",
        "ambient_ray.models.features -> ambient_ray.io.ray_runtime",
        "ambient_ray.train.engine -> ambient_ray.stages.phema",
    ]
    (pkg / "train" / "engine.py").write_text("from ambient_ray.io import plots\n")
    graph = module_graph(pkg)
    assert import_cycles(graph) == [] and layer_violations(graph, {"train": ("stages",)}) == []
