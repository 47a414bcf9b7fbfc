"""Calibration data: the reference generator and the loaders for user files."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moaplan.data import CalibrationFile, CalibrationSample, load_calibration, model_calibration
from moaplan.data.calibration import CHAT_ANSWER_TOKENS
from moaplan.errors import DataError
from moaplan.model import byte_tokenizer, load_model
from moaplan.model.tokenizer import BOS_ID

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _bytes(text: str) -> list[int]:
    return list(text.encode())


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_model_calibration_responses_are_the_models_greedy_continuations_or_forced_answers():
    model, tok = load_model()
    samples = model_calibration(model, tok, length=1024, n_samples=5, seed=0)
    assert len(samples) == 5
    # The families in turn (1024 tokens leave out multidoc): passkey, kv, repeat, copy, text.
    # A retrieval prompt stops before its answer and the model writes exactly that many
    # tokens (or, where it misses the answer, the answer is teacher-forced), all scored; a
    # text prompt is followed by 64 scored tokens.
    for s in samples:
        assert s.input_ids.dtype == torch.long and s.response_mask.dtype == torch.bool
        assert s.input_ids.shape == (1024,)
        scored = s.response_mask.nonzero().squeeze(1)
        assert scored[-1] == 1023 and len(scored) == scored[-1] - scored[0] + 1
    assert len(samples[0].response_mask.nonzero()) == 6  # " " + 5 digits
    assert len(samples[4].response_mask.nonzero()) == 64  # text
    # greedy: every response token is the model's argmax given everything before it
    batch = torch.stack([s.input_ids for s in samples])
    with torch.no_grad():
        predicted = model(input_ids=batch).logits.argmax(-1)
    for row, s in enumerate(samples):
        positions = s.response_mask.nonzero().squeeze(1)
        greedy = torch.equal(predicted[row, positions - 1], s.input_ids[positions])
        if s.answered is False:
            # the forced answer is the needle's (the model wrote something else)
            assert not greedy
            answer, prompt = (tok.decode(s.input_ids[part]) for part in
                              (positions, slice(0, positions[0])))
            assert answer.strip() in prompt
        else:
            assert greedy
    # each task records whether the model answered it (the reference model retrieves its
    # passkey, misses the copy task at seed 0); running text has no answer to miss
    assert [s.answered is None for s in samples] == [False] * 4 + [True]
    assert samples[0].answered is True and False in [s.answered for s in samples]


def test_model_calibration_uses_the_chat_template_and_cuts_no_needle():
    model, tok = load_model()
    tok.chat_template = CHAT_TEMPLATE
    samples = model_calibration(model, tok, length=1024, n_samples=2, seed=1)
    texts = [bytes(s.input_ids.tolist()).decode("utf-8", errors="replace") for s in samples]
    for s, text in zip(samples, texts):
        # a forced answer (the model missed it) stands for the model's longer chat reply
        assert len(s.input_ids) == 1024 - CHAT_ANSWER_TOKENS * (s.answered is False)
        assert "<user>" in text[:10] and "</user>\n<assistant>" in text
        # the answer comes after the template's generation prompt
        assert text.index("<assistant>") < int(s.response_mask.nonzero()[0])
    # the needle's whole sentence is in the prompt (a prompt is built around it, never cut)
    assert re.search(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key", texts[0])


def test_model_calibration_rejects_too_short_lengths():
    model, tok = load_model()
    with pytest.raises(DataError, match="too short"):
        model_calibration(model, tok, length=100, n_samples=1, seed=0)


def test_jsonl_without_chat_template_is_bos_prompt_response(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q: two?", "response": " 2"},
                                               {"prompt": "x", "response": "y"}])
    samples = load_calibration(path, byte_tokenizer(), length=64)
    assert samples[0].input_ids.tolist() == [BOS_ID, *_bytes("Q: two?"), *_bytes(" 2")]
    assert samples[0].response_mask.tolist() == [False] * 8 + [True] * 2
    assert len(load_calibration(path, byte_tokenizer(), length=64, n_samples=1)) == 1


def test_jsonl_with_chat_template_masks_the_assistant_turn(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    path = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hi", "response": "yo"}])
    (sample,) = load_calibration(path, tok, length=100)
    prompt = "<user>hi</user>\n<assistant>"
    assert sample.input_ids.tolist() == _bytes(prompt + "yo</assistant>\n")
    assert sample.response_mask.sum() == len("yo</assistant>\n")
    assert not sample.response_mask[: len(prompt)].any()


def test_long_pairs_lose_the_middle_of_the_prompt(tmp_path):
    prompt = "HEAD" + "." * 200 + "TAIL"
    path = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": prompt, "response": "ANSWER"}])
    (sample,) = load_calibration(path, byte_tokenizer(), length=40)
    text = bytes(sample.input_ids[1:].tolist()).decode()
    assert len(sample.input_ids) == 40
    assert text.startswith("HEAD") and text.endswith("TAILANSWER")
    assert sample.response_mask.sum() == len("ANSWER")


def test_plain_text_is_cut_into_full_windows(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("abcdefghij" * 10, encoding="utf-8")  # 100 bytes
    samples = load_calibration(path, byte_tokenizer(), length=31)  # bos + 30 bytes each
    assert len(samples) == 3
    assert samples[1].input_ids.tolist() == [BOS_ID, *_bytes("abcdefghij" * 3)]
    assert samples[0].response_mask.tolist() == [False] + [True] * 30
    assert len(load_calibration(path, byte_tokenizer(), length=31, n_samples=2)) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\n', r"c\.jsonl:1: expected a JSON object"),
        ('{"prompt": "a", "response": "b"}\nnot json\n', r"c\.jsonl:2: expected a JSON object"),
        ('{"prompt": "a", "response": ""}\n', r"c\.jsonl:1: prompt and response must be"),
        ("\n\n", "holds no calibration sample"),
    ],
)
def test_bad_jsonl_gives_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_calibration(path, byte_tokenizer(), length=64)


def test_missing_file_and_short_text_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no calibration file"):
        load_calibration(tmp_path / "nope.jsonl", byte_tokenizer(), length=64)
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(DataError, match="holds no calibration sample"):
        load_calibration(short, byte_tokenizer(), length=64)


def test_sample_shapes_are_checked():
    with pytest.raises(ValueError):
        CalibrationSample(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.bool))


def test_calibration_file_buckets_records_by_length_and_keeps_held_out_apart(tmp_path):
    # bos + prompt + response: 100, 200, 220, 250, 300 and 500 tokens
    sizes = [100, 200, 220, 250, 300, 500]
    path = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p" * (n - 11) + str(i), "response":
                                                 "r" * 9} for i, n in enumerate(sizes)])
    data = CalibrationFile(path, byte_tokenizer(), [128, 256])
    # 100 serves 128; 200, 220, 250 serve 256 (within 25%); 300 and 500 fit no length
    assert [len(p) + len(r) for p, r in data.buckets[128]] == [100]
    assert [len(p) + len(r) for p, r in data.buckets[256]] == [200, 220, 250]
    assert data.left_out == 2
    profiled = data.samples(256, 2, held_out=False)
    held_out = data.samples(256, 1, held_out=True)
    assert [len(s.input_ids) for s in profiled] == [200, 220]
    assert [len(s.input_ids) for s in held_out] == [250]  # never cut, never shared
    with pytest.raises(DataError, match="must not overlap"):
        data.samples(256, 2, held_out=True)


def test_calibration_text_windows_for_validation_come_from_the_end(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(1000)), encoding="utf-8")
    data = CalibrationFile(path, byte_tokenizer(), [100])
    first = data.samples(100, 2, held_out=False)
    last = data.samples(100, 2, held_out=True)
    assert bytes(first[0].input_ids[1:].tolist()).decode() == data_text(path)[:99]
    assert bytes(last[0].input_ids[1:].tolist()).decode() == data_text(path)[-99:]
    with pytest.raises(DataError, match="must not overlap"):
        data.samples(100, 9, held_out=True)


def data_text(path) -> str:
    return path.read_text(encoding="utf-8")
