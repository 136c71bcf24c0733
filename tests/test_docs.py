"""The documentation site (docs/, mkdocs.yml): every stage has its page and config table, the nav names real files.

Cheap: no Ray is started and nothing is built (``make docs`` builds the site with ``--strict``); the config tables
come from the same hook the build runs, ``docs_hooks/config_reference.py``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import yaml

from ambient_ray.stages import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _mkdocs() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _nav_files(nav) -> list[str]:
    """Every file a nav (a list of ``{title: file or [sub-nav]}`` or bare files) names."""
    out: list[str] = []
    for item in nav:
        values = item.values() if isinstance(item, dict) else [item]
        for v in values:
            out.extend(_nav_files(v) if isinstance(v, list) else [v])
    return out


def _pages() -> dict[str, str]:
    return {p.relative_to(DOCS).as_posix(): p.read_text() for p in DOCS.rglob("*.md")}


def _hook():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs_hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_nav_entry_is_a_file_and_every_page_is_in_the_nav():
    cfg = _mkdocs()
    assert cfg["docs_dir"] == "docs"
    nav = _nav_files(cfg["nav"])
    missing = [f for f in nav if not (DOCS / f).is_file()]
    assert not missing, f"nav entries without a file under docs/: {missing}"
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
    assert sorted(set(_pages()) - set(nav)) == [], "pages that are not in mkdocs.yml's nav"


def test_every_stage_has_a_page_with_its_config_marker():
    pages = _pages()
    marker = re.compile(r"^[ \t]*<!--\s*config:\s*([A-Za-z0-9_-]+)\s*-->[ \t]*$", re.MULTILINE)
    marked = {name: page for page, text in pages.items() for name in marker.findall(text)}
    for name, stage in registry.STAGES.in_order():
        if stage.model() is not None:
            assert name in marked, f"stage {name!r}: no docs page holds '<!-- config: {name} -->'"
        else:  # a command without config keys (jobs, ls, get): some page says how to use it
            assert any(f"ambient-ray {name} " in text for text in pages.values()), f"no page names 'ambient-ray {name}'"
    unknown = sorted(set(marked) - set(registry.STAGES.names()))
    assert not unknown, f"config markers of no registered stage: {unknown}"


def test_the_generated_tables_list_every_key_of_every_config():
    hook = _hook()
    for name, stage in registry.STAGES.in_order():
        model = stage.model()
        if model is None:
            continue
        text = hook.stage_reference(name)
        for key, _field, variants in hook.rows(model):
            assert f"`{key}`" in text, f"stage {name!r}: key {key!r} missing from its generated table"
            for variant, sub in variants:
                for subkey, _, _ in hook.rows(sub):
                    assert f"`{key}.{subkey}`" in text, f"stage {name!r}: {key}.{subkey} ({variant}) missing"
        assert "| key | type | default | description |" in text


def test_every_key_in_the_generated_tables_has_a_description():
    """A key without ``Field(description=...)`` would show an empty cell in its stage's table."""
    hook = _hook()
    missing = [
        f"{name}: {key}"
        for name, _stage in registry.STAGES.in_order()
        for key, field in hook.documented(name)
        if not (field.description or "").strip()
    ]
    assert not missing, "config keys without a description (give them Field(..., description=...)): " + ", ".join(
        missing
    )
    assert all(n == 0 for n, _ in hook.missing_descriptions().values())  # the hook's own count agrees


def test_a_marker_of_an_unknown_stage_fails_the_build():
    hook = _hook()
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError, match="no such stage"):
        hook.on_page_markdown("# x\n\n<!-- config: no-such-stage -->\n")
    # a marker quoted inside text is left alone
    assert hook.on_page_markdown("write `<!-- config: NAME -->` where") == "write `<!-- config: NAME -->` where"


def test_the_site_loads_nothing_from_the_network():
    cfg = _mkdocs()
    assert cfg["theme"]["font"] is False, "Material loads Google Fonts unless theme.font is false"
    assert "extra_javascript" not in cfg and "extra_css" not in cfg
