"""MkDocs hooks: the reference pages are generated from the code, never pasted.

A page may hold these placeholders, each on a line of its own:

``{{ cli_reference }}``     every command and option of the Typer app ``uqserve.cli.app``
``{{ schema NAME }}``       a field table and the JSON of ``uqserve/schemas/NAME.schema.json``
``{{ include_study }}``     ``results/study.md``, its headings moved under the page's and
                            its figures copied into the site
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "uqserve" / "schemas"
STUDY = ROOT / "results" / "study.md"
STUDY_FIGURES = "study/figures"  # where results/figures/*.png appear in the site
_PLACEHOLDER = re.compile(r"^\{\{ *(cli_reference|schema +(\w+)|include_study) *\}\}$", re.M)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for png in sorted((STUDY.parent / "figures").glob("*.png")):
        files.append(File.generated(config, f"{STUDY_FIGURES}/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    def replace(m: re.Match[str]) -> str:
        if m.group(1) == "cli_reference":
            return cli_reference()
        if m.group(1) == "include_study":
            return study()
        return schema_page(m.group(2))

    return _PLACEHOLDER.sub(replace, markdown)


# Sphinx roles in docstrings (":func:`x`"): mkdocstrings shows the code span, not the role.
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):(?=<code>)")


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return _ROLE.sub("", html)


def cli_reference() -> str:
    """Markdown for every command of the Typer app, from typer's own generator."""
    import click
    import typer.main
    from typer.cli import get_docs_for_click

    from uqserve.cli import app

    command = typer.main.get_command(app)
    ctx = click.Context(command, info_name="uqserve")
    text = get_docs_for_click(obj=command, ctx=ctx, name="uqserve", title="`uqserve`")
    # The page has its own title: the generated one becomes a section.
    text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)
    return "\n".join(_escape_tags(line) for line in text.split("\n"))


def _escape_tags(line: str) -> str:
    """``<case>`` in help text outside code spans would vanish as an HTML tag."""
    if not line.startswith("* "):
        return line
    parts = line.split("`")
    parts[::2] = [p.replace("<", "&lt;").replace(">", "&gt;") for p in parts[::2]]
    return "`".join(parts)


def study() -> str:
    """results/study.md under a level-2 heading, with figure links into the site."""
    text = STUDY.read_text()
    text = re.sub(r"^(#+) ", r"##\1 ", text, flags=re.M)
    return text.replace("](figures/", f"]({STUDY_FIGURES}/")


def schema_page(name: str) -> str:
    """A table of every field (path, type, required, description) and the schema itself."""
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    rows = ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for path, spec, required in _fields(schema, schema, ""):
        rows.append(
            f"| `{path}` | {_type(spec, schema)} | {'yes' if required else ''} | "
            f"{_describe(spec, schema)} |"
        )
    body = json.dumps(schema, indent=2, ensure_ascii=False)
    indented = "\n".join("    " + line for line in body.splitlines())
    return "\n".join(
        [
            f"{schema.get('description', '')}",
            "",
            *rows,
            "",
            f'??? note "{name}.schema.json (JSON Schema draft 2020-12)"',
            "",
            "    ```json",
            indented,
            "    ```",
            "",
        ]
    )


def _resolve(spec: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in spec:
        ref = spec["$ref"].removeprefix("#/$defs/")
        merged = {**root["$defs"][ref], **{k: v for k, v in spec.items() if k != "$ref"}}
        spec = merged
    return spec


def _fields(
    spec: dict[str, Any], root: dict[str, Any], prefix: str
) -> list[tuple[str, dict[str, Any], bool]]:
    spec = _resolve(spec, root)
    out = []
    required = set(spec.get("required", ()))
    for key, sub in spec.get("properties", {}).items():
        path = f"{prefix}{key}"
        sub = _resolve(sub, root)
        out.append((path, sub, key in required))
        out.extend(_fields(sub, root, f"{path}."))
        items = sub.get("items")
        if isinstance(items, dict) and "properties" in _resolve(items, root):
            out.extend(_fields(items, root, f"{path}[]."))
    extra = spec.get("additionalProperties")
    if isinstance(extra, dict) and "properties" in _resolve(extra, root):
        out.append((f"{prefix}<name>", _resolve(extra, root), False))
        out.extend(_fields(extra, root, f"{prefix}<name>."))
    return out


def _type(spec: dict[str, Any], root: dict[str, Any]) -> str:
    if "enum" in spec:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in spec["enum"])
    if "const" in spec:
        return f"`{json.dumps(spec['const'])}`"
    if "oneOf" in spec:
        return " \\| ".join(_type(_resolve(s, root), root) for s in spec["oneOf"])
    kind = spec.get("type", "any")
    kinds = kind if isinstance(kind, list) else [kind]
    if "array" in kinds and isinstance(spec.get("items"), dict):
        item = _type(_resolve(spec["items"], root), root)
        kinds = [f"array of {item}" if k == "array" else k for k in kinds]
    return " \\| ".join(kinds)


def _describe(spec: dict[str, Any], root: dict[str, Any]) -> str:
    parts = [spec.get("description", "")]
    bounds = [
        f"{word} {spec[key]}"
        for key, word in (
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("exclusiveMaximum", "<"),
            ("minItems", "at least"),
            ("maxItems", "at most"),
        )
        if key in spec
    ]
    if bounds:
        parts.append("(" + ", ".join(bounds) + ")")
    if "pattern" in spec:
        parts.append(f"pattern `{spec['pattern']}`")
    if "default" in spec:
        parts.append(f"default `{json.dumps(spec['default'])}`")
    return " ".join(p for p in parts if p).replace("|", "\\|").replace("\n", " ")
