"""docs/design.md's table "Where is ...? (one guess per thing)": every path it names exists, so the table
cannot rot when a module or a test file is renamed, moved or removed."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Where is ...? (one guess per thing)"


def table_rows() -> list[tuple[str, list[str], list[str]]]:
    """(thing, code paths, test paths) of each row of the table."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert text.count(HEADING) == 1, f"docs/design.md: the heading {HEADING!r} is missing or repeated"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| thing |"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, f"a row of three cells (thing | code | tests): {line}"
        thing, code, tests = cells
        rows.append((thing, re.findall(r"`([^`]+)`", code), re.findall(r"`([^`]+)`", tests)))
    return rows


def test_every_path_in_the_where_is_table_exists():
    rows = table_rows()
    assert len(rows) >= 25, f"the table has {len(rows)} rows"
    missing = []
    for thing, code, tests in rows:
        assert code and tests, f"row {thing!r}: a code path and a test path each"
        for path in code + tests:
            if not (ROOT / path).exists():
                missing.append(f"{thing}: {path}")
        for path in tests:
            assert path.startswith("tests/"), f"row {thing!r}: {path} is not under tests/"
    assert not missing, "docs/design.md, 'Where is ...?': paths that do not exist:\n" + "\n".join(missing)
