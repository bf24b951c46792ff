"""Every config key does something: a field that no code reads would be accepted and silently
ignored, which is exactly what the schema exists to prevent."""

from __future__ import annotations

import re
from pathlib import Path

from lmtune.config import RunConfig

SRC = Path(__file__).resolve().parent.parent / "src" / "lmtune"
# Fields whose only allowed value is lmtune's behaviour: validation refuses every other value.
CHECKED_ONLY = {"export_legacy_format", "quantization_method"}


def test_every_field_is_read_outside_the_schema():
    # schema.py counts too: its derived properties (effective_eval_steps, ...) read fields, while
    # a field's own declaration (`name: type = Field(...)`) matches neither pattern below.
    code = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    unread = [name for name in RunConfig.model_fields
              if name not in CHECKED_ONLY and name != "not_applied"
              and not re.search(rf"\.{name}\b|[\"']{name}[\"']", code)]
    assert unread == [], f"config keys no code reads: {unread}"
