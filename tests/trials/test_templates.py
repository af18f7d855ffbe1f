"""Prompt formats (trials.templates): which tokens a trial sees and which the loss covers,
checked token by token on the tiny model's character tokenizer (one token per character,
so every span of text maps to known positions), then trained for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trials.data import IGNORE, read_rows, tokenize
from trials.errors import TrialError
from trials.templates import Row, turn_end_ids

# A Llama-2-like chat template in the tiny vocabulary: the turn ends with EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<{{ m['content'] }}>>\n"
    "{% elif m['role'] == 'user' %}[Q] {{ m['content'] }} [A]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with the chat template in its tokenizer files, as an instruct model ships."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_model, path, ignore=shutil.ignore_patterns("task"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def learned_text(tokenizer, example) -> str:
    """The characters the loss covers, in order, with '|' where a covered run ends."""
    out, previous = [], False
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token
            out.append(tokenizer.convert_ids_to_tokens(token))
        elif previous:
            out.append("|")
        previous = label != IGNORE
    return "".join(out)


def test_plain_is_the_prompt_as_written_then_the_response_and_eos(tokenizer):
    [ex] = tokenize([Row("rot1 abc =", " bcd")], tokenizer, 64, "mem")
    prompt = tokenizer("rot1 abc =")["input_ids"]
    assert ex.input_ids == prompt + tokenizer(" bcd", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.labels[:len(prompt)] == [IGNORE] * len(prompt) and ex.prompt_len == len(prompt)
    assert learned_text(tokenizer, ex) == " bcd</s>"


def test_a_format_string_wraps_the_prompt(tokenizer):
    template = "### Q: {prompt}\n### A:"
    [ex] = tokenize([Row("rot1 abc =", " bcd")], tokenizer, 64, "mem", template)
    head = tokenizer("### Q: rot1 abc =\n### A:")["input_ids"]
    assert ex.input_ids[:len(head)] == head and ex.prompt_len == len(head)
    assert learned_text(tokenizer, ex) == " bcd</s>"
    assert tokenizer.decode(ex.input_ids[:ex.prompt_len], skip_special_tokens=True) == "### Q: rot1 abc =\n### A:"


def test_chat_learns_the_assistant_turn_only(tokenizer):
    [ex] = tokenize([Row("rot1 abc =", "bcd")], tokenizer, 64, "mem", "chat", "be brief")
    text = "<s><<be brief>>\n[Q] rot1 abc = [A]bcd</s>"
    assert ex.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert learned_text(tokenizer, ex) == "bcd</s>"
    assert ex.prompt_len == len(tokenizer("<s><<be brief>>\n[Q] rot1 abc = [A]", add_special_tokens=False)["input_ids"])
    assert ex.target == "bcd"


def test_a_messages_row_learns_every_assistant_turn(tokenizer, tmp_path):
    from trials.config import DataConfig

    chat = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"conversation": chat}) + "\n")
    cfg = DataConfig(train=str(path), messages_field="conversation")
    [row] = read_rows(path, "train", cfg)
    [ex] = tokenize([row], tokenizer, 64, "mem", cfg.template)
    assert learned_text(tokenizer, ex) == "a1</s>|a2</s>"
    # generation starts after the last user turn and must produce the last answer
    assert tokenizer.decode(ex.input_ids[:ex.prompt_len]) == "<s><<sys>>\n[Q] q1 [A]a1</s>[Q] q2 [A]"
    assert ex.target == "a2"
    # truncation keeps the first turn's labels and drops what is cut
    [short] = tokenize([row], tokenizer, 25, "mem", cfg.template)
    assert learned_text(tokenizer, short) == "a1</s>|" and len(short.input_ids) == 25


def test_the_end_of_an_assistant_turn_stops_generation(tokenizer):
    assert turn_end_ids(tokenizer) == [tokenizer.eos_token_id]


@pytest.mark.parametrize(("turns", "needle"), [
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "has role 'tool'"),
    ([{"role": "user", "content": "x"}], "no assistant turn"),
    ("not a list", "must be a non-empty list"),
    ([{"role": "user"}, {"role": "assistant", "content": "y"}], "[0] must be an object with string 'role'"),
])
def test_a_bad_messages_row_names_line_and_field(tmp_path, turns, needle):
    from trials.config import DataConfig

    path = tmp_path / "chats.jsonl"
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path.write_text(json.dumps({"chat": good}) + "\n" + json.dumps({"chat": turns}) + "\n")
    with pytest.raises(TrialError) as err:
        read_rows(path, "train", DataConfig(train=str(path), messages_field="chat"))
    assert f"{path} line 2" in str(err.value) and needle in str(err.value), err.value


def test_a_template_the_config_cannot_use_is_refused():
    from pydantic import ValidationError

    from trials.config import DataConfig

    for bad, needle in [({"template": "### Q: {question}"}, "format string with {prompt}"),
                        ({"system": "be brief"}, "set data.template: chat"),
                        ({"messages_field": "chat", "template": "Q: {prompt}"}, "rendered by the chat template")]:
        with pytest.raises(ValidationError, match=needle.replace("{", r"\{").replace("}", r"\}")):
            DataConfig(train="x.jsonl", **bad)


def test_a_chat_trial_trains_and_generates_the_answer_turn(chat_model, tiny_model, tmp_path):
    """End to end on the real trial runner: the chat template of the model folder renders
    the task, the loss falls, and generation (stopping at the turn's end) is judged."""
    from test_trial_runner import cli, trial, write_trials

    cfg = trial(chat_model, {"type": "lora", "r": 8, "alpha": 16}, lr=3e-3, template="chat", max_length=48)
    cfg["data"].update(train=str(tiny_model / "task" / "train.jsonl"), eval=str(tiny_model / "task" / "eval.jsonl"))
    cfg["trainer"].update(max_steps=20, eval_every=20, eval_batches=2)
    cfg["evaluation"] = {"generate": True, "max_new_tokens": 12}
    result = cli("run", *map(str, write_trials(tmp_path / "trials", {"chat": cfg})), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert m["eval_loss"] < m["eval_loss_before"]
    assert "eval_exact_match" in m


def test_chat_on_a_tokenizer_without_a_chat_template_is_refused_by_the_trial(tiny_model, tmp_path):
    from test_trial_runner import cli, trial, write_trials

    cfg = trial(tiny_model, {"type": "lora", "r": 4}, template="chat")
    result = cli("run", *map(str, write_trials(tmp_path / "trials", {"chat": cfg})), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "needs the tokenizer's chat template" in result.stderr and "Traceback" not in result.stderr
