"""tools/mutate.py's module -> tests table names modules and tests that exist, so `make mutate`
and `make mutate-changed` cannot silently point at a deleted module or a renamed test, and every
entry of tools/equivalent_mutants.toml names a module of the table. The hand campaign
(tools/mutation_campaign.py) still applies: each mutation's text is in its file exactly once."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import mutate  # noqa: E402
import mutation_campaign  # noqa: E402


def test_every_module_and_test_of_the_table_exists():
    for module, tests in mutate.MODULE_TESTS.items():
        assert (ROOT / module).is_file(), f"{module} is in MODULE_TESTS but not in gpt_small/"
        assert tests, module
        for t in tests:
            path, _, name = t.partition("::")
            assert (ROOT / path).is_file(), f"{module}: {path} does not exist"
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), \
                    f"{module}: {t} names no test"


def test_every_equivalent_mutant_names_a_module_of_the_table():
    for e in mutate.load_equivalents():
        assert e.module in mutate.MODULE_TESTS, f"{e.module} ({e.function}) is not in MODULE_TESTS"
        assert e.reason.strip()


def test_changed_lists_only_modules_of_the_table(capsys):
    changed = mutate.changed_modules("HEAD")  # against itself: only uncommitted changes
    assert set(changed) <= set(mutate.MODULE_TESTS)


def test_every_campaign_mutation_applies_to_the_code_as_it_is():
    """Code that moves takes its mutations along (`mutation_campaign.py --check` says the same)."""
    bad = {m.id: f"{m.file}: {why}" for m in mutation_campaign.MUTATIONS if (why := mutation_campaign.not_applicable(m))}
    assert not bad, bad
    for m in mutation_campaign.MUTATIONS:
        for t in m.tests:
            if t.startswith("tests/"):
                assert (ROOT / t).is_file(), f"{m.id}: {t} does not exist"
