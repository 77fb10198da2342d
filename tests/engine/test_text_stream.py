"""TextStream with the real tiny tokenizer: valid text deltas, stop strings never leak."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from packserve.engine.text import TextStream

TEXT = "héllo wörld 🚀 日本語"


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _ids(tok, text: str) -> list[int]:
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # the tokenizer round-trips it (byte-level)
    return ids


def _push_each(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push([t]) for t in ids]


def test_multibyte_deltas_are_whole_characters(tok):
    ids = _ids(tok, TEXT)
    # the test means something: some tokens are partial UTF-8 sequences on their own
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    assert len(ids) > len(TEXT.split())
    stream = TextStream(tok)
    deltas = _push_each(stream, ids)
    for d in deltas:
        assert isinstance(d, str)
        assert "\ufffd" not in d
    tail = stream.finish()
    assert "".join(deltas) + tail == TEXT
    assert stream.text == TEXT
    assert sum(1 for d in deltas if d) > 3  # streamed incrementally, not all at the end
    assert not stream.stopped


def test_pushing_several_tokens_at_once_gives_the_same_text(tok):
    ids = _ids(tok, TEXT * 2)
    stream = TextStream(tok)
    deltas = [stream.push(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.finish() == TEXT * 2


def test_special_tokens_are_skipped(tok):
    ids = [tok.bos_token_id, *_ids(tok, "hi there"), tok.eos_token_id]
    stream = TextStream(tok)
    assert "".join(_push_each(stream, ids)) + stream.finish() == "hi there"


def _expected(tok, ids: list[int], stops: tuple[str, ...]) -> tuple[str, bool]:
    """What a stream that checks for stop strings after every token must end with: the text
    up to the first token after which some stop string is complete (whole characters only),
    cut before the earliest stop string in it. (Generation ends at that token, so a stop
    string that would start earlier but complete later never happens.)"""
    for k in range(1, len(ids) + 1):
        seen = tok.decode(ids[:k])
        if seen.endswith("\ufffd"):
            continue
        hits = [seen.find(s) for s in stops if s and s in seen]
        if hits:
            return seen[: min(hits)], True
    return tok.decode(ids), False


def _check_stop(tok, text: str, stops: tuple[str, ...]) -> bool:
    """Push `text` token by token with `stops`; check the no-leak contract at every step.
    Returns whether a stop string ended it."""
    ids = _ids(tok, text)
    final, hit = _expected(tok, ids, stops)
    stream = TextStream(tok, stops)
    emitted = ""
    for k, t in enumerate(ids, 1):
        delta = stream.push([t])
        assert "\ufffd" not in delta
        emitted += delta
        # nothing emitted is ever taken back: it is all part of the final text
        assert final.startswith(emitted), (text, stops, emitted)
        assert not any(s in emitted for s in stops if s)
        seen = tok.decode(ids[:k])
        if not stream.stopped and not seen.endswith("\ufffd"):
            # and nothing is held back without reason: only a possible start of a stop
            assert seen.startswith(emitted)
            held = seen[len(emitted) :]
            assert held == "" or any(s.startswith(held) for s in stops), (seen, emitted)
    emitted += stream.finish()
    assert emitted == final, (text, stops)
    assert stream.text == final
    assert stream.stopped == hit
    if hit:
        assert stream.push(ids[:2]) == ""  # nothing more once stopped
        assert stream.finish() == ""
    return hit


def test_stop_string_split_across_tokens(tok):
    text = "The rocket 🚀 flew to 日本語 land and back"
    ids = _ids(tok, text)
    stop = "🚀 flew"
    start = text.index(stop)
    # the stop string spans several tokens, four of them partial characters (the rocket)
    assert sum(1 for t in ids if "\ufffd" in tok.decode([t])) >= 4
    stream = TextStream(tok, (stop,))
    emitted = ""
    for t in ids:
        emitted += stream.push([t])
        assert len(emitted) <= start, emitted  # not even the first character leaks
        assert emitted == text[: len(emitted)]
    assert stream.stopped
    assert emitted == text[:start] == "The rocket "
    assert stream.finish() == ""
    assert _check_stop(tok, text, (stop,))


def test_held_back_prefix_is_released_when_it_is_not_the_stop(tok):
    text = "go to the stat and the station"
    ids = _ids(tok, text)
    stream = TextStream(tok, ("the station",))
    history = []
    for t in ids:
        stream.push([t])
        history.append((tok.decode(ids[: len(history) + 1]), stream.text))
    # while "the stat" might still become "the station" it is held back ...
    assert ("go to the stat", "go to ") in history
    # ... and released once it cannot, while the real stop string never shows
    assert any(emitted.startswith("go to the stat a") for _, emitted in history)
    assert stream.stopped
    assert stream.text == "go to the stat and "
    assert _check_stop(tok, text, ("the station",))


def test_pending_prefix_is_released_by_finish(tok):
    text = "count to thre"
    stream = TextStream(tok, ("three",))
    emitted = "".join(stream.push([t]) for t in _ids(tok, text))
    assert not emitted.endswith("thre")  # held back: it might become the stop string
    assert emitted + stream.finish() == text
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins(tok):
    assert _check_stop(tok, "one two three four five", ("four", "two t", "zzz"))
    stream = TextStream(tok, ("four", "two t"))
    out = "".join(stream.push([t]) for t in _ids(tok, "one two three four five"))
    assert out == "one "


def test_stop_inside_multibyte_run(tok):
    assert _check_stop(tok, TEXT, ("日本",))
    assert _check_stop(tok, TEXT, ("ö",))
    assert _check_stop(tok, TEXT, ("🚀",))
    assert not _check_stop(tok, TEXT, ("日本人",))


def test_random_texts_and_stops_never_leak(tok):
    rng = random.Random(20240601)
    alphabet = list("abcdefgh ijk ") + list("éöüß") + ["🚀", "🙂", "日", "本", "語", "\n"]
    hits = 0
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        stops = []
        for _ in range(rng.randint(1, 3)):
            if text and rng.random() < 0.7:  # a substring, so it usually hits
                a = rng.randrange(len(text))
                stops.append(text[a : a + rng.randint(1, 6)])
            else:
                stops.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))))
        hits += _check_stop(tok, text, tuple(stops))
    assert 40 < hits < 150  # both kinds of case were exercised
