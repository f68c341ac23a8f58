"""Every in-code citation of the theory resolves to a section of docs/theory.md, and no other theory file is cited."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THEORY = ROOT / "docs" / "theory.md"
SCANNED = ("sdelip", "experiments", "docs", "tests")
SUFFIXES = {".py", ".md", ".toml", ".txt", ".rst"}

# "docs/theory.md §6", "docs/theory.md §3, §6", "theory.md §5's" (docs/ refers to its sibling by name)
CITATION = re.compile(r"theory\.md §(\d+)((?:(?:, | and |–)§\d+)*)")
ANY_THEORY_FILE = re.compile(r"([\w./-]*)theory\.md", re.IGNORECASE)


def _files():
    out = [ROOT / "README.md"]
    for top in SCANNED:
        out += [p for p in sorted((ROOT / top).rglob("*")) if p.is_file() and p.suffix in SUFFIXES]
    return out


def _sections() -> set[int]:
    return {int(n) for n in re.findall(r"^## §(\d+) ", THEORY.read_text(encoding="utf-8"), re.MULTILINE)}


def test_theory_sections_are_numbered_in_order():
    numbers = [int(n) for n in re.findall(r"^## §(\d+) ", THEORY.read_text(encoding="utf-8"), re.MULTILINE)]
    assert numbers == list(range(1, len(numbers) + 1)), numbers


def test_every_citation_names_an_existing_section():
    sections = _sections()
    bad, count = [], 0
    for path in _files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in CITATION.finditer(text):
            for n in [m.group(1), *re.findall(r"§(\d+)", m.group(2))]:
                count += 1
                if int(n) not in sections:
                    line = text.count("\n", 0, m.start()) + 1
                    bad.append(f"{path.relative_to(ROOT)}:{line}: §{n}")
    assert count > 50, "the citations were not found: has their form changed?"
    assert not bad, f"citations of sections that docs/theory.md does not have: {bad}"


def test_theory_page_refers_only_to_its_own_sections():
    text = THEORY.read_text(encoding="utf-8")
    sections = _sections()
    assert {int(n) for n in re.findall(r"§(\d+)", text)} <= sections


@pytest.mark.parametrize("check", ["no other theory file", "no link leaves the repository"])
def test_no_other_theory_file_is_cited(check):
    bad = []
    for path in _files():
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT)
        if check == "no other theory file":
            if re.search(r"\bTHEORY\b", text):
                bad.append(f"{rel}: cites THEORY")
            for m in ANY_THEORY_FILE.finditer(text):
                prefix = m.group(1)
                in_docs = rel.parts[0] == "docs"
                if not (m.group(0) == "docs/theory.md" or (in_docs and prefix == "")):
                    bad.append(f"{rel}: {m.group(0)}")
        elif path == THEORY:
            if re.search(r"https?://|www\.", text):
                bad.append(f"{rel}: a URL")
            for target in re.findall(r"\]\(([^)]+)\)", text):
                if (THEORY.parent / target.split("#")[0]).resolve().is_relative_to(ROOT) is False:
                    bad.append(f"{rel}: link {target}")
    assert not bad, bad
