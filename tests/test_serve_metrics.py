"""`GET /metrics` against docs/serve.md: every family the page shows is a row of its metrics table
(name, kind, labels, HELP line) and every row is shown; the histograms' buckets are the table of
buckets; a finished sample's time to first token and time per further token are the documented
arithmetic on its clock readings. Each test builds its own app or its own `Metrics`, so that what
the app builds at start-up is built inside the test that checks it."""

from __future__ import annotations

import copy
import math
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.serve import create_app  # noqa: E402
from gpt_small.serve.engine import Sequence  # noqa: E402
from gpt_small.serve.metrics import Metrics  # noqa: E402
from gpt_small.serve.protocol import Sampling  # noqa: E402
from serve_util import NAME  # noqa: E402

SERVE_MD = Path(__file__).resolve().parent.parent / "docs" / "serve.md"


def documented_metrics() -> dict[str, tuple[str, set[str], str]]:
    """docs/serve.md's table of /metrics: {family name: (kind, label names, what)}; a counter's family
    is named without the `_total` its sample carries, as Prometheus' parser names it."""
    rows = {}
    for m in re.finditer(r"^\| `(gpt_small_\w+)(?:\{([\w,]+)\})?` \| (counter|gauge|histogram) \| (.+) \|$",
                         SERVE_MD.read_text(encoding="utf-8"), re.M):
        name, labels, kind, what = m.groups()
        if kind == "counter":
            name = name.removesuffix("_total")
        rows[name] = (kind, set(labels.split(",")) if labels else set(), what.replace("`", ""))
    return rows


def documented_buckets() -> dict[str, list[float]]:
    """docs/serve.md's table of histogram buckets: {family name: upper bounds in seconds}."""
    return {m[1]: [float(x) for x in m[2].split(", ")]
            for m in re.finditer(r"^\| `(gpt_small_\w+)` \| ([\d.]+(?:, [\d.]+)*) \|$",
                                 SERVE_MD.read_text(encoding="utf-8"), re.M)}


@contextmanager
def own_client(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME)) as c:
        yield c


def families(text: str) -> dict:
    # prometheus_client's creation times (`_created`) are read back as gauges of their own
    return {f.name: f for f in text_string_to_metric_families(text) if not f.name.endswith("_created")}


def test_metrics_are_the_documented_families_kinds_labels_and_help(model_tok):
    """Every family /metrics shows is a row of docs/serve.md's table and every row is shown, with its
    kind, its labels (once a sample has them) and its HELP line the table's words."""
    docs = documented_metrics()
    assert len(docs) == 9
    with own_client(model_tok) as c:
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 3, "seed": 1})
        assert r.status_code == 200  # so that every labelled family has a sample
        shown = families(c.get("/metrics").text)
    assert set(shown) == set(docs)
    for name, (kind, labels, what) in docs.items():
        fam = shown[name]
        assert (fam.type, fam.documentation) == (kind, what), name
        seen = {k for s in fam.samples if not s.name.endswith("_created") for k in s.labels} - {"le"}
        assert seen == labels, name


def test_histogram_buckets_are_the_documented_seconds(model_tok):
    buckets = documented_buckets()
    assert set(buckets) == {n for n, (kind, _, _) in documented_metrics().items() if kind == "histogram"}
    with own_client(model_tok) as c:
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 3, "seed": 1})
        assert r.status_code == 200
        shown = families(c.get("/metrics").text)
    for name, bounds in buckets.items():
        for labels in {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                       for s in shown[name].samples if s.name == name + "_bucket"}:
            les = [float(s.labels["le"]) for s in shown[name].samples
                   if s.name == name + "_bucket" and tuple(sorted((k, v) for k, v in s.labels.items()
                                                                  if k != "le")) == labels]
            assert les == [*bounds, math.inf], (name, labels)


def finished(n_new: int, *, submitted: float, first_token_at: float | None, reason: str = "length") -> Sequence:
    """A sample as the engine leaves it once finished: its prompt, its tokens and its clock readings."""
    seq = Sequence([1, 2, 3], Sampling(seed=0), max_new_tokens=max(n_new, 1), tokenizer=None)
    seq.new_ids = list(range(n_new))
    seq.submitted, seq.first_token_at, seq.finish_reason = submitted, first_token_at, reason
    return seq


def samples(m: Metrics) -> dict:
    """{(sample name, labels as a sorted tuple): value} of a render with an idle engine."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(m.render({"queued": 0, "active": 0}).decode()) for s in f.samples}


def test_a_samples_first_token_and_later_token_times_are_its_clock_differences():
    """Time to first token is first token minus submission; time per output token is the time from
    the first token to the end over the tokens after the first, counted once a sample has two."""
    m = Metrics()
    m.sample(finished(5, submitted=100.0, first_token_at=100.5), ended_at=102.5)  # 0.5 s, then 2 s / 4
    got = samples(m)
    assert got[("gpt_small_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    assert got[("gpt_small_time_per_output_token_seconds_sum", ())] == pytest.approx(0.5)
    assert got[("gpt_small_time_to_first_token_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("gpt_small_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 0
    m.sample(finished(2, submitted=200.0, first_token_at=200.01), ended_at=200.02)  # two tokens: 0.01 s
    m.sample(finished(1, submitted=300.0, first_token_at=300.2, reason="stop"), ended_at=300.2)  # one: no later token
    m.sample(finished(0, submitted=400.0, first_token_at=None, reason="cancelled"), ended_at=401.0)  # none at all
    got = samples(m)
    assert got[("gpt_small_time_to_first_token_seconds_count", ())] == 3
    assert got[("gpt_small_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5 + 0.01 + 0.2)
    assert got[("gpt_small_time_per_output_token_seconds_count", ())] == 2
    assert got[("gpt_small_time_per_output_token_seconds_sum", ())] == pytest.approx(0.5 + 0.01)
    assert got[("gpt_small_prompt_tokens_total", ())] == 3 * 4
    assert got[("gpt_small_generated_tokens_total", ())] == 5 + 2 + 1
    assert got[("gpt_small_samples_total", (("finish_reason", "length"),))] == 2
    assert got[("gpt_small_samples_total", (("finish_reason", "stop"),))] == 1
    assert got[("gpt_small_samples_total", (("finish_reason", "cancelled"),))] == 1


def test_each_app_counts_apart():
    """Two servers in one process (each its own registry) count their own requests only."""
    a, b = Metrics(), Metrics()
    a.request("/v1/completions", 200, 0.2)
    assert samples(a)[("gpt_small_requests_total", (("route", "/v1/completions"), ("status", "200")))] == 1
    assert ("gpt_small_requests_total", (("route", "/v1/completions"), ("status", "200"))) not in samples(b)
    got = samples(a)
    assert got[("gpt_small_request_duration_seconds_bucket", (("le", "0.25"), ("route", "/v1/completions")))] == 1
    assert got[("gpt_small_request_duration_seconds_bucket", (("le", "0.1"), ("route", "/v1/completions")))] == 0
