"""Mutation testing of gpt_small/ with mutmut: can the tests tell when a module is wrong?

    python tools/mutate.py gpt_small/verse.py          # one module, its own tests only
    python tools/mutate.py --all                       # every module in MODULE_TESTS (make mutate)
    python tools/mutate.py --changed                   # the modules a change touches vs main (make mutate-changed)
    python tools/mutate.py --changed --base origin/x   # ... vs another base
    python tools/mutate.py --list                      # the module -> tests table, nothing run

mutmut (https://github.com/boxed/mutmut) makes every small change it knows (an operator, a
constant, a dropped argument, ...) in every function of a module and runs the tests that reach
that function against each change. A change that no test notices is a *survivor*: a behaviour
the suite does not pin. Each module runs alone in a copy of the working tree under
runs/mutate/<module>/ with only the test files MODULE_TESTS names for it, so a run takes minutes,
not hours; mutmut itself keeps its results there, and a second run of an unchanged module
reuses them.

Some survivors cannot be killed by any test because the change does not change behaviour (an
*equivalent mutant*). They are listed, each with its reason, in tools/equivalent_mutants.toml;
this tool reads that file and counts them apart. An entry names the module, the function and the
changed line as it reads after the change, so it survives renumbering when the module changes.

The report (stdout, and runs/mutate/report.md) lists per module the mutants, the killed, the
equivalent, and every other survivor with its diff: each is a test to write, or an equivalent
mutant to record with its reason. Exit status: 0, or 1 when a module has a survivor that is not
recorded as equivalent (so `make mutate-changed` fails on a change that leaves a behaviour
unpinned).

The C kernels (gpt_small/ops/csrc) are not Python: tools/mutation_campaign.py keeps a hand
campaign for them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "mutate"
EQUIVALENTS = ROOT / "tools" / "equivalent_mutants.toml"

# module -> the test files that pin it. A run of one module imports and runs only these, so keep
# the list to the files that exercise the module directly (mutmut then runs, per mutant, only the
# tests among these that reach the mutated function).
# test_interop_runtimes.py's tests that export in the test itself, fast
_EXPORT_RUNTIME_TESTS = [
    "test_transformers_stops_at_the_declared_eos", "test_tokenizers_without_an_end_of_text_declare_none",
    "test_exported_folder_modes_follow_the_umask_as_checkpoints_do",
    "test_export_on_a_full_disk_gives_one_line_and_leaves_nothing",
]
# test_interop_runtimes.py's card tests that export in the test itself, fast
_CARD_RUNTIME_TESTS = ["test_model_card_names_no_absolute_path", "test_model_card_finds_a_relative_data_folder_beside_runs",
                       "test_card_tags_follow_the_data"]
MODULE_TESTS: dict[str, list[str]] = {
    "gpt_small/verse.py": ["tests/test_verse_edges.py", "tests/test_forms.py::test_prosody_from_the_dictionary"],
    # test_forms.py's poems need a model trained per process (seconds per mutant): the direct tests
    # with hand-made models pin the search instead
    "gpt_small/forms.py": ["tests/test_verse_edges.py", "tests/test_forms_edges.py",
                           "tests/test_forms.py::test_plan_of_schemes", "tests/test_forms.py::test_bad_forms_are_refused"],
    "gpt_small/form_calls.py": ["tests/test_verse_edges.py", "tests/test_forms_edges.py",
                                "tests/test_forms.py::test_shared_prefix_equals_a_prefix_per_row",
                                "tests/test_forms.py::test_scores_equal_an_uncached_forward",
                                "tests/test_forms.py::test_sampled_lines_equal_greedy_decoding_by_an_uncached_forward"],
    "gpt_small/cli_generate.py": ["tests/test_cli.py", "tests/test_generate.py", "tests/test_forms.py",
                                  "tests/test_bad_input.py"],
    "gpt_small/cli_train.py": ["tests/test_cli.py", "tests/test_cli_info.py", "tests/test_bad_input.py",
                               "tests/test_run_edges.py"],
    "gpt_small/config_sources.py": ["tests/test_config.py", "tests/test_cli_info.py", "tests/test_limits_table.py",
                                    "tests/test_runs_edges.py"],
    # test_report.py's end-to-end tests train a model (and one runs the CLI in a subprocess, which
    # mutmut cannot map to the functions it reaches): test_report_make.py covers make_report on an
    # untrained model whose figures are recomputed
    "gpt_small/report.py": ["tests/test_report_edges.py", "tests/test_report_make.py", *(
        f"tests/test_report.py::{t}" for t in ("test_split_texts_are_the_prepared_split",
                                               "test_memorisation_finds_a_planted_copy",
                                               "test_form_and_language_figures"))],
    "gpt_small/fileio.py": ["tests/test_fileio_edges.py", "tests/test_durability.py",
                            "tests/test_faults.py::test_write_helpers_leave_nothing_behind_on_failure",
                            "tests/test_faults.py::test_metrics_and_summary_are_strict_json",
                            "tests/test_faults.py::test_a_second_prepare_into_the_same_folder_exits_2_naming_the_holder"],
    "gpt_small/run.py": ["tests/test_run.py", "tests/test_run_edges.py", "tests/test_runs_edges.py",
                         "tests/test_faults.py::test_the_printed_continue_line_works_verbatim",
                         "tests/test_train.py::test_resume_refuses_data_from_another_tokenizer",
                         "tests/test_train.py::test_resume_with_another_optimizer_is_refused",
                         "tests/test_train.py::test_resume_block_size_change_is_refused",
                         "tests/test_interop_finetune.py::test_init_from_refuses_another_tokenizer_and_another_shape"],
    # (not tests/test_lock.py: it is the requirements lock, and builds a virtual environment)
    "gpt_small/run_folder.py": ["tests/test_run_folder_edges.py", "tests/test_run.py", "tests/test_promises.py",
                                "tests/test_run_edges.py"],
    "gpt_small/loop.py": ["tests/test_train.py", "tests/test_run.py"],
    "gpt_small/limits.py": ["tests/test_limits_table.py", "tests/test_limits_edges.py", "tests/test_serve_limits.py",
                            "tests/test_hardening.py", "tests/test_fuzz.py"],
    "gpt_small/schemas.py": ["tests/test_hardening.py", "tests/test_limits_table.py", "tests/test_runs_edges.py"],
    # the direct tests that export in the test itself (tiny hand-made checkpoints): test_interop_export.py's
    # and test_interop_runtimes.py's shared exports are built once per file, in fixtures that mutmut
    # charges to their first test only, and train or load larger models (every mutant slow)
    "gpt_small/interop/hf_export.py": ["tests/test_interop_export_edges.py",
                                       "tests/test_runs_edges.py::test_export_takes_the_runs_best_checkpoint",
                                       *(f"tests/test_interop_runtimes.py::{t}" for t in _EXPORT_RUNTIME_TESTS)],
    "gpt_small/interop/hf_import.py": ["tests/test_runs_edges.py", "tests/test_interop_import.py",
                                       "tests/test_interop_import_edges.py"],
    "gpt_small/interop/hf_tokenizer.py": ["tests/test_interop_tokenizer_edges.py"],
    # the card's own tests (hand-made run records) and the export tests that read a card written by an
    # export in the test itself; test_interop_export.py's card tests train runs (seconds per mutant)
    "gpt_small/interop/model_card.py": ["tests/test_interop_card_edges.py",
                                        "tests/test_interop_export_edges.py::test_the_card_scores_the_validation_split_unless_told_not_to",
                                        "tests/test_interop_export_edges.py::test_the_card_of_an_export_names_its_class_why_and_dtype",
                                        *(f"tests/test_interop_runtimes.py::{t}" for t in _CARD_RUNTIME_TESTS)],
    # (test_interop_finetune.py trains runs: its tracker tests are end to end, not per mutant)
    "gpt_small/interop/trackers.py": ["tests/test_interop_trackers_edges.py"],
    # the remote code imported as our own modules: an exported folder's copy of it (the other interop
    # tests) is a module of transformers' own, which mutmut does not switch
    "gpt_small/interop/remote/modeling_gpt_small.py": ["tests/test_interop_remote.py"],
    "gpt_small/interop/remote/configuration_gpt_small.py": ["tests/test_interop_remote.py"],
    "gpt_small/serve/protocol.py": ["tests/test_serve_refusals.py", "tests/test_limits_table.py", "tests/test_serve_api.py",
                                    "tests/test_serve_limits.py", "tests/test_serve_chat.py",
                                    "tests/test_serve_app.py::test_busy_and_draining_answers_in_openais_shape"],
    "gpt_small/serve/guard.py": ["tests/test_serve_guard.py", "tests/test_serve_limits.py::test_host_check_and_json_only"],
    "gpt_small/serve/connections.py": ["tests/test_serve_connections.py", "tests/test_serve_limits.py"],
    "gpt_small/serve/responses.py": ["tests/test_serve_responses.py", "tests/test_serve_api.py", "tests/test_serve_chat.py"],
    "gpt_small/serve/app.py": ["tests/test_serve_app.py", "tests/test_serve_auth.py", "tests/test_serve_api.py",
                               "tests/test_serve_chat.py", "tests/test_serve_engine.py", "tests/test_serve_guard.py",
                               "tests/test_limits_table.py::test_http_refuses_at_the_edges_with_the_field_named"],
    "gpt_small/serve/forms.py": ["tests/test_serve_forms.py",
                                 "tests/test_serve_app.py::test_a_poem_names_itself_its_model_and_its_timing_streamed_or_not"],
    "gpt_small/serve/metrics.py": ["tests/test_serve_metrics.py", "tests/test_serve_chat.py", "tests/test_serve_app.py",
                                   "tests/test_serve_guard.py"],
    "gpt_small/serve/openapi.py": ["tests/test_serve_openapi.py",
                                   "tests/test_serve_chat.py::test_openapi_lists_every_route_and_every_accepted_field",
                                   "tests/test_serve_limits.py::test_the_openapi_schema_shows_the_shared_bounds"],
    # in-process servers only: test_serve_live.py's servers are processes of their own, whose calls
    # mutmut does not see
    "gpt_small/serve/server.py": ["tests/test_serve_server.py", "tests/test_serve_connections.py",
                                  "tests/test_serve_limits.py", "tests/test_serve_app.py"],
    # the engine's own tests (the app's tests reach it too, but a mutant that stops its worker
    # makes an HTTP test client wait without end, until the mutant's time limit)
    "gpt_small/serve/engine.py": ["tests/test_serve_engine.py", "tests/test_engine_edges.py",
                                  "tests/test_serve_prefill.py"],
}

# Modules whose mutants often stop a worker thread, so that every test waits out its own time
# limit: a lower multiplier of the wall-clock limit (x clean time, plus 4 x multiplier seconds).
# The serve engine's tests each wait for a sample's end with a time limit of their own, which such
# a mutant always runs into: at 15x it would wait out many of them before it counted as killed.
# The verse forms of the server wait for the engine's rows to finish (EngineCalls._run): a mutant
# that loses a row's end makes a poem request wait for ever, until the wall-clock limit. The app's
# events() counts the samples still to finish: a mutant that miscounts them holds the request open.
TIMEOUT_MULTIPLIER = {"gpt_small/serve/engine.py": 5, "gpt_small/serve/forms.py": 5, "gpt_small/serve/app.py": 5}

# what the copy needs besides gpt_small/ and tests/ (tests read these)
ALSO_COPY = ["README.md", "docs", "configs", "tools", "benchmarks", "Makefile", "pyproject.toml"]

KILLED, SURVIVED = "killed", "survived"
STATUS = {1: KILLED, 3: KILLED, 0: SURVIVED, 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


@dataclass
class Equivalent:
    module: str
    function: str
    line: str  # the changed line after the change, stripped
    reason: str


@dataclass
class Result:
    module: str
    counts: dict[str, int] = field(default_factory=dict)
    equivalent: list[str] = field(default_factory=list)
    survivors: list[tuple[str, str]] = field(default_factory=list)  # (name, diff)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def killed(self) -> int:
        return self.counts.get(KILLED, 0) + self.counts.get("timeout", 0)

    @property
    def score(self) -> float:
        """Killed share of the mutants that are not equivalent (timeouts count as killed)."""
        n = self.total - len(self.equivalent)
        return self.killed / n if n else 1.0


def load_equivalents(path: Path = EQUIVALENTS) -> list[Equivalent]:
    if not path.is_file():
        return []
    data = tomllib.loads(path.read_text())
    out = []
    for e in data.get("mutant", []):
        if not e.get("reason", "").strip():
            raise SystemExit(f"{path}: the equivalent mutant {e} has no reason")
        out.append(Equivalent(e["module"], e["function"], e["line"].strip(), e["reason"]))
    return out


def changed_modules(base: str) -> list[str]:
    """Modules of MODULE_TESTS that differ from `base` (committed or not), via git diff."""
    merge_base = subprocess.run(["git", "merge-base", base, "HEAD"], cwd=ROOT, capture_output=True, text=True)
    ref = merge_base.stdout.strip() or base
    diff = subprocess.run(["git", "diff", "--name-only", ref, "--", "gpt_small"], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    names = {n for n in diff.stdout.split() if n.endswith(".py")}
    for n in sorted(names - set(MODULE_TESTS)):
        if (ROOT / n).is_file():
            print(f"{n} changed but has no row in MODULE_TESTS (tools/mutate.py): add its tests there to mutate it")
    return [m for m in MODULE_TESTS if m in names]


def _copy_tree(dst: Path) -> None:
    """The working tree's gpt_small/, tests/ and ALSO_COPY into dst, replacing what was there
    (mutmut's own results under dst/mutants are kept: it re-runs only what changed)."""
    dst.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in ["gpt_small", "tests", *ALSO_COPY]:
        src, out = ROOT / name, dst / name
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        if src.is_dir():
            shutil.copytree(src, out, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, out)


def _config(module: str, tests: list[str]) -> str:
    def lines(xs: list[str]) -> str:
        return "".join(f"\n    {x}" for x in xs)

    # setup.cfg, which mutmut reads when pyproject.toml has no [tool.mutmut]: the copy's own, so
    # the repository's pyproject.toml stays free of one module's settings
    return (
        "[mutmut]\n"
        "source_paths = gpt_small\n"
        f"only_mutate = {module}\n"
        f"pytest_add_cli_args_test_selection ={lines(tests)}\n"
        # tools/mutate_order.py (copied with tools/): a mutant's fast tests first, so -x stops early
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -q\n    -p\n    tools.mutate_order\n"
        # torch is not fork-safe once its thread pools exist: a fork server imports, workers fork from it
        "process_isolation = forkserver\n"
        # a mutant's wall-clock limit is 15x its tests' time in the clean run plus 60 s: a worker
        # loads what the clean run had cached (the CMU dictionary), on a shared machine; too tight
        # a limit would count slow mutants as killed. mutmut computes it as (time + constant) x
        # multiplier (and twice that in CPU seconds), so the 60 s is written as 4 x 15
        f"timeout_multiplier = {TIMEOUT_MULTIPLIER.get(module, 15)}\n"
        "timeout_constant = 4\n"
        f"also_copy ={lines(ALSO_COPY)}\n"
    )


def _mutmut(work: Path, *args: str, log=None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([str(exe), *args], cwd=work, env=env, text=True,
                          stdout=log if log else subprocess.PIPE, stderr=subprocess.STDOUT if log else subprocess.PIPE)


def _added_lines(diff: str) -> list[str]:
    return [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]


def _function(name: str) -> str:
    """'gpt_small.verse.x_rhyme_key__mutmut_3' -> '_rhyme_key'; methods: 'xǁ_JudgeǁcheckX__mutmut_2' -> '_Judge.check'."""
    tail = name.rsplit(".", 1)[-1].split("__mutmut_")[0]
    if tail.startswith("xǁ"):
        return ".".join(p for p in tail[2:].split("ǁ") if p)
    return tail[2:] if tail.startswith("x_") else tail


def run_module(module: str, *, max_children: int, equivalents: list[Equivalent], log_dir: Path) -> Result:
    tests = MODULE_TESTS[module]
    work = WORK / Path(module).with_suffix("").as_posix().replace("/", ".")
    _copy_tree(work)
    (work / "setup.cfg").write_text(_config(module, tests))
    meta = work / "mutants" / (module + ".meta")
    if meta.is_file():  # a re-run: what was killed stays killed; every other mutant is tried again
        state = json.loads(meta.read_text())
        codes = state.get("exit_code_by_key", {})
        state["exit_code_by_key"] = {k: (v if STATUS.get(v) == KILLED else None) for k, v in codes.items()}
        meta.write_text(json.dumps(state))
        # mutmut re-maps functions to the tests that reach them only when test names change; a test
        # that now reaches a function under the same name (a fixture made per test) must count
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    log_path = log_dir / f"{work.name}.log"
    with open(log_path, "w") as log:
        _mutmut(work, "run", "--max-children", str(max_children), log=log)
    result = Result(module)
    if not meta.is_file():
        raise SystemExit(f"mutmut left no results for {module}; see {log_path}")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    mine = [e for e in equivalents if e.module == module]
    for name, code in sorted(codes.items()):
        status = STATUS.get(code, "suspicious")
        result.counts[status] = result.counts.get(status, 0) + 1
        if status in (KILLED, "timeout"):
            continue
        diff = _mutmut(work, "show", name).stdout
        added = _added_lines(diff)
        fn = _function(name)
        if any(e.function == fn and e.line in added for e in mine):
            result.equivalent.append(name)
        else:
            result.survivors.append((name, diff.strip()))
    return result


def format_report(results: list[Result]) -> str:
    out = ["| module | mutants | killed (of which timeouts) | equivalent | not killed | killed / (mutants - equivalent) |",
           "|---|---|---|---|---|---|"]
    for r in results:
        out.append(f"| {r.module} | {r.total} | {r.killed} ({r.counts.get('timeout', 0)}) | {len(r.equivalent)} | "
                   f"{len(r.survivors)} | "
                   f"{100 * r.score:.1f}% |")
    for r in results:
        if r.survivors:
            out.append(f"\n## Not killed in {r.module}\n")
            for name, diff in r.survivors:
                out.append(f"### {name}\n\n```diff\n{diff}\n```\n")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modules", nargs="*", help="modules to mutate (paths as in MODULE_TESTS)")
    ap.add_argument("--all", action="store_true", help="every module of MODULE_TESTS")
    ap.add_argument("--changed", action="store_true", help="the modules that differ from --base")
    ap.add_argument("--base", default="main", help="the branch --changed compares with (default: main)")
    ap.add_argument("--max-children", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="mutants tested at once (default: half the cores)")
    ap.add_argument("--list", action="store_true", help="print the module -> tests table and stop")
    args = ap.parse_args(argv)
    if args.list:
        for m, tests in MODULE_TESTS.items():
            print(f"{m}: {' '.join(tests)}")
        return 0
    modules = list(args.modules)
    if args.all:
        modules = list(MODULE_TESTS)
    elif args.changed:
        modules = changed_modules(args.base)
        if not modules:
            print(f"no module of tools/mutate.py's table differs from {args.base}")
            return 0
    unknown = [m for m in modules if m not in MODULE_TESTS]
    if unknown or not modules:
        print(f"mutate: give modules of the table (--list), --all or --changed; unknown: {' '.join(unknown)}",
              file=sys.stderr)
        return 2
    equivalents = load_equivalents()
    WORK.mkdir(parents=True, exist_ok=True)
    results = []
    for m in modules:
        print(f"mutating {m} with {' '.join(MODULE_TESTS[m])} ...", flush=True)
        results.append(run_module(m, max_children=args.max_children, equivalents=equivalents, log_dir=WORK))
        print(format_report(results[-1:]).split("\n", 3)[2], flush=True)
    report = format_report(results)
    (WORK / "report.md").write_text(report)
    print(report)
    return 1 if any(r.survivors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
