"""JSON Schemas (draft 2020-12) of the two files uqserve writes for others to read.

- ``report.schema.json``: report.json of ``uqserve predict`` (one per scan);
- ``manifest.schema.json``: manifest.json of a bundle (``uqserve export`` / ``calibrate``).

They ship inside the package so that consumers (a PACS integration, a
dashboard) can validate what they receive:

```python
from uqserve.schemas import validate
validate(json.loads(Path("out/scan/report.json").read_text()), "report")
```
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Literal

from uqserve.errors import UsageError

__all__ = ["SCHEMA_DIR", "SchemaValidationError", "schema", "validate"]

SCHEMA_DIR = Path(__file__).resolve().parent
Kind = Literal["report", "manifest"]


class SchemaValidationError(UsageError):
    """A document does not match its schema; the message names the field."""


@functools.cache
def schema(kind: Kind) -> dict[str, Any]:
    """The parsed schema of ``kind`` (``"report"`` or ``"manifest"``)."""
    if kind not in ("report", "manifest"):
        raise UsageError(f"kind must be 'report' or 'manifest', got {kind!r}")
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / f"{kind}.schema.json").read_text())
    return loaded


def validate(instance: Any, kind: Kind, source: str = "") -> None:
    """Raise :class:`SchemaValidationError` naming the first field that breaks the schema.

    ``instance`` is the parsed JSON document; ``source`` (a file name) prefixes
    the message.
    """
    import jsonschema  # imported here: only validation needs it

    validator = jsonschema.Draft202012Validator(schema(kind))
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        prefix = f"{source}: " if source else ""
        raise SchemaValidationError(
            f"{prefix}{kind} field {where}: {error.message} "
            f"(the schema is uqserve/schemas/{kind}.schema.json)"
        )
