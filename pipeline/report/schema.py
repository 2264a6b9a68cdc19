"""The published JSON Schemas (report and error records, draft 2020-12) and validation against them."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema

# 1.0.0 first release; 1.1.0 per-disc Modic findings (discs[].modic), single-slice studies; 1.2.0 edema (present,
# extents) measured over the body's interior only (2026-12-07): same fields, new meaning (docs/outputs.md).
SCHEMA_VERSION = "1.2.0"


REPORT_SCHEMA = "report.schema.json"


ERROR_SCHEMA = "error.schema.json"


# ---------------------------------------------------------------------------------------------- schema
@functools.cache
def load_schema(name: str = REPORT_SCHEMA) -> dict:
    text = resources.files("pipeline.report").joinpath("schemas", name).read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def load_validators() -> None:
    """Compile the validators of both schemas now (cached; done once per process otherwise on first use)."""
    for name in (REPORT_SCHEMA, ERROR_SCHEMA):
        _validator(name)


def schema_errors(obj: Any, name: str | None = None) -> list[str]:
    """Every way ``obj`` breaks its schema, as 'path: message' strings (empty list = valid).

    ``name`` defaults to the schema matching ``obj['report_type']``.
    """
    if name is None:
        rtype = obj.get("report_type") if isinstance(obj, dict) else None
        name = ERROR_SCHEMA if rtype == "modicscan.study_error" else REPORT_SCHEMA
    errors = sorted(_validator(name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]


def validate_report(obj: Any, name: str | None = None) -> None:
    """Raise ``ValueError`` listing the schema violations, if any."""
    errs = schema_errors(obj, name)
    if errs:
        raise ValueError("report does not validate against its schema:\n  " + "\n  ".join(errs[:20]))
