"""The README's promises that can be checked without services."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_sql_is_the_tested_sql_of_docs() -> None:
    # docs/SQL.md's queries run against a migrated database in the integration
    # tests; the README quotes them verbatim so it cannot drift.
    readme = (ROOT / "README.md").read_text()
    docs = (ROOT / "docs" / "SQL.md").read_text()
    quoted = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    assert len(quoted) == 3
    tested = re.findall(r"```sql\n(.*?)```", docs, flags=re.S)
    for block in quoted:
        assert block in tested


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && pytest' in readme
    assert "\npytest\n" in ci
