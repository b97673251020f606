"""Verse forms through `/v1/poem`: the fields refused by name, a form met and reported line by line,
seeds, streaming, and the load check that form requests run as rows of the batch (a plain stream
beside them never waits as long as one form line takes)."""

from __future__ import annotations

import json
import statistics
import threading
import time

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small import verse  # noqa: E402
from gpt_small.serve import create_app  # noqa: E402
from gpt_small.limits import MAX_SYLLABLES  # noqa: E402
from gpt_small.serve.forms import FORMS, MAX_FORM_LINES  # noqa: E402
from serve_util import live_server, make_checkpoint, make_model  # noqa: E402


@pytest.fixture(scope="module")
def client():
    model, tok = make_model()
    app = create_app(model=model, tokenizer=tok, model_name="tiny-poet", max_batch=16, max_new_tokens=300,
                     max_prompt_tokens=200)
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("body,param", [
    ({"form": "haiku"}, "form"),
    ({"form": 3}, "form"),
    ({"form": "sonnet", "rhyme": "AA"}, "rhyme"),
    ({"rhyme": "ABA1"}, "rhyme"),
    ({"rhyme": "BA"}, "rhyme"),
    ({"rhyme": ""}, "rhyme"),
    ({"rhyme": ["A", "A"]}, "rhyme"),
    ({"syllables": 0}, "syllables"),
    ({"syllables": MAX_SYLLABLES + 1}, "syllables"),
    ({"syllables": "ten"}, "syllables"),
    ({"form": "sonnet", "lines": 4}, "lines"),
    ({"rhyme": "AA", "lines": MAX_FORM_LINES + 1}, "lines"),
    ({"rhyme": "ABAB", "stanzas": 14}, "stanzas"),  # 14 x 2 letters: more than 26
    ({"form": "sonnet", "stanzas": 15}, "stanzas"),  # more stanzas than lines
    ({"rhyme": "AA", "max_tokens": 10}, "max_tokens"),
    ({"rhyme": "AA", "repetition_penalty": 1.2}, "repetition_penalty"),
])
def test_bad_form_fields_are_one_400_naming_the_field(client, body, param):
    r = client.post("/v1/poem", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: ")


def test_form_limits_at_the_boundary_are_accepted(client):
    r = client.post("/v1/poem", json={"syllables": MAX_SYLLABLES, "lines": 1, "seed": 0, "temperature": 0.5})
    assert r.status_code == 200, r.text
    assert r.json()["form"]["syllables"] == MAX_SYLLABLES and r.json()["form"]["lines_total"] == 1


def test_couplets_meet_the_form_seeded_and_streamed_alike(client):
    body = {"prompt": "The sea\n", "form": "couplets", "lines": 4, "seed": 5}
    a = client.post("/v1/poem", json=body).json()
    check = a["form"]
    assert check["name"] == "couplets" and check["rhyme"] == "AABB" and check["lines_total"] == 4
    lines = a["text"].splitlines()
    assert len(lines) == 4 and a["poem"] == "The sea\n" + a["text"]
    # the form engine keeps a line only when it meets the form: endings from the dictionary at worst
    assert check["all_met"] and check["lines_met"] == 4 and all(m["met"] for m in check["lines"])
    ends = [verse.last_word(line) for line in lines]
    assert verse.rhymes(ends[0], ends[1], dictionary_only=True) and verse.rhymes(ends[2], ends[3], dictionary_only=True)
    assert [m["text"] for m in check["lines"]] == lines and a["seed"] == 5

    again = client.post("/v1/poem", json=body).json()
    assert again["text"] == a["text"]  # the same seed, the same poem
    r = client.post("/v1/poem", json={**body, "stream": True})
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    pieces, done = [e["text"] for e in events if not e.get("done")], events[-1]
    assert len(pieces) == 4 and "".join(pieces) == a["text"] == done["text"]  # one event per line
    assert done["done"] and done["form"]["all_met"] and done["finish_reason"] == "stop"


def test_presets_and_stanzas(client):
    assert set(FORMS) == {"free", "couplets", "quatrains", "sonnet", "limerick"}
    r = client.post("/v1/poem", json={"rhyme": "AA", "lines": 2, "stanzas": 2, "seed": 1}).json()
    assert r["form"]["rhyme"] == "AA BB" and r["text"].count("\n\n") == 1  # a blank line between stanzas
    assert [s.count("\n") for s in r["text"].split("\n\n")] == [1, 2]
    # free verse without syllables is the plain poem path: no form check
    assert "form" not in client.post("/v1/poem", json={"form": "free", "lines": 1, "seed": 1}).json()


def _stream_gaps(url: str, out: list, start: threading.Event) -> None:
    start.wait()
    times = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=300,
                      json={"model": "tiny-poet", "prompt": "The sea", "max_tokens": 400, "stream": True,
                            "seed": len(out)}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    out.append(max(b - a for a, b in zip(times, times[1:])))


def _form(url: str, out: list, start: threading.Event, seed: int) -> None:
    start.wait()
    r = httpx.post(f"{url}/v1/poem", timeout=600, json={"rhyme": "AA", "lines": 2, "seed": seed})
    assert r.status_code == 200, r.text
    out.extend(m["seconds"] for m in r.json()["form"]["lines"])


@pytest.mark.slow
def test_forms_run_beside_plain_streams_without_stalling_them(tmp_path):
    """8 form requests and 16 plain streams at once: no plain stream waits between two chunks as
    long as one form line takes (a form held outside the batch would stall them for whole poems).
    Relative, not absolute: both sides run on the same loaded machine at the same time."""
    run_dir = make_checkpoint(tmp_path / "tiny-poet")
    with live_server(run_dir, "--max-batch", "32", "--max-queue", "256") as (url, _, err):
        gaps: list[float] = []
        line_seconds: list[float] = []
        start = threading.Event()
        threads = [threading.Thread(target=_form, args=(url, line_seconds, start, i)) for i in range(8)]
        threads += [threading.Thread(target=_stream_gaps, args=(url, gaps, start)) for _ in range(16)]
        for t in threads:
            t.start()
        start.set()
        for t in threads:
            t.join(timeout=900)
        assert len(gaps) == 16 and len(line_seconds) == 16, err
        line = statistics.median(line_seconds)
        print(f"longest wait between two chunks of a plain stream {max(gaps):.3f} s; "
              f"a form line: median {line:.3f} s, shortest {min(line_seconds):.3f} s")
        assert max(gaps) < line, (max(gaps), sorted(line_seconds))


def test_a_forms_lines_are_sampled_with_the_requests_settings(client):
    """Each line a form samples uses the request's temperature, top_k and top_p: any of them set to
    keep only the likeliest token gives the greedy line whatever the seed, where the default sampling
    (temperature 0.8) gives another."""
    def line(seed, **kw):
        r = client.post("/v1/poem", json={"prompt": "The sea\n", "syllables": 6, "lines": 1, "seed": seed, **kw})
        assert r.status_code == 200, r.text
        return r.json()["text"]

    greedy = line(1, temperature=0)
    assert line(1) != greedy  # the default, temperature 0.8, samples
    assert line(2, top_k=1) == greedy and line(3, top_p=1e-9) == greedy
