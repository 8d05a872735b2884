"""Write docs/params.md from the params schema (cxr14/params.py) and the defaults (params.yaml).

One table per section: key, default (params.yaml), expected (the schema's types and ranges, in the words of its
error messages) and meaning (each field's `help`). `--check` writes nothing and exits 1 when the page is stale,
or when the schema and params.yaml name different keys, a key has no `help`, or a params.yaml comment that lists
choices (`# none | cosine | ...`) lists other ones than the schema (the tests run it).

    python tools/params_doc.py [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from cxr14.params import SECTIONS, Section, describe

ROOT = Path(__file__).resolve().parents[1]

PAGE = ROOT / "docs" / "params.md"

HEADER = """\
# Parameters

Every default lives in `params.yaml`, one section per stage. Change any for one run with
`dvc exp run -S section.key=value` (several `-S` at once; lists as `-S 'train.freeze=[conv1,bn1]'`), or edit
the file and run `dvc repro`: DVC re-runs exactly the stages whose declared params changed. A mistyped key or a
wrong value stops the stage at once with one line naming it:

```
error: params.yaml train.lr_haed: unknown key; did you mean lr_head?
error: params.yaml train.epochs: 'five'; expected an integer >= 1
```

The schema is `cxr14/params.py` (one frozen dataclass per section; `load_params()` reads the file once and
checks each section when a stage first uses it). This page is generated from it and from `params.yaml` by
`python tools/params_doc.py`; a test fails when the three disagree. The NIH recipe (ResNet50 from ImageNet
weights, 224 px) is one command in the [README](../README.md#the-real-nih-chestx-ray14).
"""


def fields(cls: type[Section]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))  # type: ignore[arg-type]


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def default(value: Any) -> str:
    """A params.yaml value as YAML writes it in one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def rows(cls: type[Section], values: dict, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        kind = hints[f.name]
        value = values.get(f.name)
        if isinstance(kind, type) and issubclass(kind, Section):
            out.append(f"| `{prefix}{f.name}` | | {cell(describe(kind, f.metadata))} | {cell(f.metadata['help'])} |")
            out += rows(kind, value if isinstance(value, dict) else {}, f"{prefix}{f.name}.")
            continue
        out.append(f"| `{prefix}{f.name}` | `{cell(default(value))}` | {cell(describe(kind, f.metadata))} "
                   f"| {cell(f.metadata['help'])} |")
    return out


def render(params: dict) -> str:
    """The whole page for this params mapping."""
    parts = [HEADER]
    for cls in SECTIONS:
        parts.append(f"## {cls.SECTION}\n")
        parts.append("\n".join(["| key | default | expected | meaning |", "| --- | --- | --- | --- |",
                                *rows(cls, params.get(cls.SECTION) or {}, f"{cls.SECTION}.")]) + "\n")
    return "\n".join(parts)


def disagreements(cls: type[Section], values: Any, where: str) -> list[str]:
    """Keys the schema and params.yaml do not share, and fields without a `help`, under `where`."""
    if not isinstance(values, dict):
        return [f"params.yaml {where}: not a mapping"]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    problems = [f"params.yaml {where}.{k}: not in the schema (cxr14/params.py)" for k in values if k not in names]
    for f in fields(cls):
        if f.name not in values:
            problems.append(f"cxr14/params.py {where}.{f.name}: not in params.yaml")
        elif isinstance(hints[f.name], type) and issubclass(hints[f.name], Section):
            problems += disagreements(hints[f.name], values[f.name], f"{where}.{f.name}")
        if not f.metadata.get("help"):
            problems.append(f"cxr14/params.py {where}.{f.name}: no help= text")
    return problems


def choice_comments(text: str) -> list[str]:
    """params.yaml comments listing a key's choices (`key: value  # a | b | c`) that differ from the schema's."""
    by_path = {}
    for cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            by_path[f"{cls.SECTION}.{f.name}"] = hints[f.name]
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Section):
                inner = typing.get_type_hints(hints[f.name])
                by_path.update({f"{cls.SECTION}.{f.name}.{g.name}": inner[g.name] for g in fields(hints[f.name])})
    out, stack = [], []
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"( *)(\w+):[^#]*(?:#\s*(.*))?$", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack = [*stack[:depth], m.group(2)]
        kind, comment = by_path.get(".".join(stack)), m.group(3) or ""
        if typing.get_origin(kind) is not typing.Literal or " | " not in comment:
            continue
        listed = [part.split()[0].rstrip(":") for part in comment.split(" | ")]
        schema = [str(a) for a in typing.get_args(kind)]
        if sorted(listed) != sorted(schema):
            out.append(f"params.yaml line {number}: {'.'.join(stack)} lists {' | '.join(listed)}; "
                       f"the schema has {' | '.join(schema)}")
    return out


def problems(params: dict, page: str | None, text: str = "") -> list[str]:
    """Everything that keeps schema, params.yaml (`params`, and its `text` for the comments) and the page from
    agreeing; empty when they do."""
    known = [cls.SECTION for cls in SECTIONS]
    out = [f"params.yaml {name}: section not in the schema" for name in params if name not in known]
    for cls in SECTIONS:
        if cls.SECTION not in params:
            out.append(f"params.yaml: no section {cls.SECTION}")
        else:
            out += disagreements(cls, params[cls.SECTION], cls.SECTION)
    out += choice_comments(text)
    if page != render(params):
        out.append(f"{PAGE.relative_to(ROOT)}: stale or missing; run python tools/params_doc.py")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything disagrees")
    args = parser.parse_args()
    text = (ROOT / "params.yaml").read_text()
    params = yaml.safe_load(text)
    if args.check:
        found = problems(params, PAGE.read_text() if PAGE.exists() else None, text)
        for line in found:
            print(line)
        sys.exit(1 if found else 0)
    page = render(params)
    found = problems(params, page, text)  # the schema and params.yaml must agree before a page is written
    if found:
        print("\n".join(found))
        sys.exit(1)
    PAGE.write_text(page)


if __name__ == "__main__":
    main()
