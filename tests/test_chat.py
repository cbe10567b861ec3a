"""Chat data: the assistant-only loss mask against transformers (``{% generation %}`` templates,
``return_assistant_tokens_mask=True``) and against a token-level prefix-by-prefix rendering, for
the embedded SmolLM2 template, a Qwen2.5-style and a Llama-3-style template; truncation at a
turn boundary; bad conversations refused with the file line before a run starts."""

import json

import numpy as np
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from jaxqlora.chat import ChatDataError, ChatTemplateError, encode_conversation
from jaxqlora.data import DataError, encode, load_chat, sentiment_as_chat, split
from jaxqlora.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN25_TAGGED = QWEN25.replace(
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}",
    "{{- '<|im_start|>' + message.role + '\\n' }}{%- generation %}{{- message.content + '<|im_end|>' }}"
    "{%- endgeneration %}{{- '\\n' }}")

# Meta-Llama-3-8B-Instruct's template
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_TAGGED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

SMOL_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
SMOL_TAGGED_TURN = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
                    "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}" + SMOL_TURN
                    + "{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": " Paris "}, {"role": "user", "content": "And of Italy?\n"},
     {"role": "assistant", "content": "Rome.\n\nSure: 12345 🙂"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "Ünïcödé  spaces\tand tabs"}, {"role": "user", "content": "thanks"},
     {"role": "assistant", "content": "You're welcome."}],
]


@pytest.fixture(scope="module")
def smol():
    from jaxqlora.io import load_tokenizer

    return load_tokenizer(None)


def _clone(tok: Tokenizer, specials=()) -> BackendTokenizer:
    backend = BackendTokenizer.from_str(tok.backend.to_str())
    if specials:
        backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return backend


@pytest.fixture(scope="module")
def templates(smol):
    """name -> (our tokenizer, transformers tokenizer, template, tagged template, end-of-turn text)."""
    smol_tagged = smol.chat_template.replace(SMOL_TURN, SMOL_TAGGED_TURN)
    assert smol_tagged != smol.chat_template
    llama_specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    llama_backend = _clone(smol, llama_specials)
    ids = {s: llama_backend.token_to_id(s) for s in llama_specials}
    llama = Tokenizer(llama_backend, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"])
    out = {}
    for name, ours, template, tagged, eot in (
            ("smollm2", smol, smol.chat_template, smol_tagged, "<|im_end|>"),
            ("qwen2.5", smol, QWEN25, QWEN25_TAGGED, "<|im_end|>"),
            ("llama3", llama, LLAMA3, LLAMA3_TAGGED, "<|eot_id|>")):
        hf = transformers.PreTrainedTokenizerFast(
            tokenizer_object=_clone(ours), bos_token=ours.bos_token, eos_token=eot)
        out[name] = (ours, hf, template, tagged, eot)
    return out


def _hf_ids(hf, messages, template, generation_prompt=False, **kw):
    return hf.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                  add_generation_prompt=generation_prompt, **kw)


def prefix_reference(hf, messages, template, eot):
    """Reference mask: transformers renders ``messages[:i]`` (with the generation prompt) and
    ``messages[:i + 1]``; the characters between them, up to the end of the first end-of-turn
    text ``eot``, are the assistant message's, mapped to tokens with transformers'
    ``char_to_token`` of the whole rendering."""
    text = hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    enc = hf(text, add_special_tokens=False)
    mask = np.zeros(len(enc["input_ids"]), np.uint8)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        a = hf.apply_chat_template(messages[:i], chat_template=template, tokenize=False, add_generation_prompt=True)
        b = hf.apply_chat_template(messages[:i + 1], chat_template=template, tokenize=False)
        assert text.startswith(a) and text.startswith(b)
        stop = text.index(eot, len(a)) + len(eot)
        assert stop <= len(b)
        mask[enc.char_to_token(len(a)):enc.char_to_token(stop - 1) + 1] = 1
    return list(enc["input_ids"]), mask


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5", "llama3"])
def test_assistant_mask_matches_transformers_and_prefix_reference(templates, name):
    ours, hf, template, tagged, eot = templates[name]
    for conv in CONVERSATIONS:
        got = encode_conversation(ours, conv, 10_000, chat_template=template)
        # transformers' own mask, from the {% generation %} spans of the tagged template
        out = _hf_ids(hf, conv, tagged, return_assistant_tokens_mask=True)
        assert got.ids == list(out["input_ids"])
        np.testing.assert_array_equal(got.targets, np.asarray(out["assistant_masks"], np.uint8))
        # the untagged template, rendered prefix by prefix and tokenized by transformers
        full, mask = prefix_reference(hf, conv, template, eot)
        assert got.ids == full
        np.testing.assert_array_equal(got.targets, mask)
        # the supervised tokens are the assistant messages plus their end-of-turn tokens, nothing else
        strip = (lambda s: s.strip()) if name == "llama3" else (lambda s: s)
        expected = "".join(strip(m["content"]) + eot for m in conv if m["role"] == "assistant")
        assert ours.decode(np.asarray(got.ids)[got.targets == 1]) == expected
        assert got.targets.sum() > 0 and not got.truncated


def test_truncation_at_turn_boundary(smol):
    conv = CONVERSATIONS[2]
    whole = encode_conversation(smol, conv, 10_000)
    ends = [j + 1 for j in range(len(whole.ids)) if whole.targets[j] and whole.ids[j] == smol.eos_token_id]
    assert len(ends) == 3  # three assistant turns, each closed by <|im_end|>
    cut = encode_conversation(smol, conv, ends[1] + 3)  # room for two turns and a bit of the third
    assert cut.truncated and not cut.cut_inside_turn
    assert cut.ids == whole.ids[:ends[1]]
    np.testing.assert_array_equal(cut.targets, whole.targets[:ends[1]])
    inside = encode_conversation(smol, conv, ends[0] - 2)  # not even the first turn fits
    assert inside.truncated and inside.cut_inside_turn and len(inside.ids) == ends[0] - 2
    # counted over a data set: only the third conversation is longer
    from jaxqlora.data import TextDataset

    enc = encode(smol, TextDataset(["x"] * 3, messages=CONVERSATIONS, source="f"), ends[1] + 3)
    assert (enc.truncated, enc.cut_inside_turn) == (1, 0) and enc.ids[2] == whole.ids[:ends[1]]


def test_sentiment_as_chat():
    from jaxqlora.data import TextDataset

    ds = sentiment_as_chat(TextDataset(["Great fun.", "Dull."], np.array([0, 1], np.int32),
                                       label_names=("fresh", "rotten")))
    assert ds.messages == [
        [{"role": "user", "content": "What is the sentiment of this movie review?\n\nGreat fun."},
         {"role": "assistant", "content": "Positive. The reviewer liked the film."}],
        [{"role": "user", "content": "What is the sentiment of this movie review?\n\nDull."},
         {"role": "assistant", "content": "Negative. The reviewer did not like the film."}]]
    with pytest.raises(DataError, match="not polarities"):
        sentiment_as_chat(TextDataset(["a", "b"], np.array([0, 1], np.int32), label_names=("cat", "dog")))


def test_template_that_rewrites_earlier_turns_is_refused(smol):
    # the last assistant turn renders differently from earlier ones (as Qwen3's thinking template does)
    rewriting = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' and "
                 "loop.last %}{{ '<think></think>' }}{% endif %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="f.jsonl: line 4.*rewrites earlier turns"):
        encode_conversation(smol, CONVERSATIONS[2], 1000, chat_template=rewriting, where="f.jsonl: line 4")


def _bad_files(tmp_path):
    good = json.dumps({"messages": CONVERSATIONS[0]})
    cases = {
        "unknown_role": ([good, good, json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "tool", "content": "x"}]})],
                         "line 3: messages\\[1\\] has unknown role 'tool'"),
        "no_assistant": ([good, json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
                         "line 2: the conversation has no assistant message"),
        "not_a_list": ([good, good, good, json.dumps({"messages": {"role": "user", "content": "hi"}})],
                       "line 4: 'messages' must be a list"),
        "not_json": ([good, json.dumps({"messages": "[{oops"})], "line 2: 'messages' is not a JSON list"),
    }
    out = {}
    for name, (lines, match) in cases.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text("\n".join(lines) + "\n")
        out[name] = (f, match)
    return out


def test_bad_conversations_name_the_line_and_no_run_starts(tmp_path, capsys):
    from jaxqlora.cli import main
    from jaxqlora.finetune import FinetuneConfig, finetune

    for name, (f, match) in _bad_files(tmp_path).items():
        with pytest.raises(ChatDataError, match=f"{f.name}: {match}"):
            load_chat(f)
        out = tmp_path / f"run_{name}"
        with pytest.raises(ChatDataError, match=match):
            finetune(FinetuneConfig(task="chat", data=str(f), output=str(out)), log=lambda *_: None)
        assert not out.exists()
        assert main(["finetune", "--task", "chat", "--data", str(f), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(f) in err and not out.exists()
    # CSV: the messages column holds JSON text; the header is line 1
    csv_file = tmp_path / "chats.csv"
    cell = json.dumps(CONVERSATIONS[0]).replace('"', '""')
    csv_file.write_text(f'id,messages\n1,"{cell}"\n2,"[{{""role"": ""bot"", ""content"": ""x""}}]"\n')
    with pytest.raises(ChatDataError, match="chats.csv: line 3: messages\\[0\\] has unknown role 'bot'"):
        load_chat(csv_file)
    with pytest.raises(DataError, match="messages column 'msgs' not found"):
        load_chat(csv_file, messages_column="msgs")


def test_load_chat_jsonl_and_csv_and_split(tmp_path, smol):
    rows = [{"messages": CONVERSATIONS[i % 3]} for i in range(30)]
    f = tmp_path / "c.jsonl"
    f.write_text("\n\n".join(json.dumps(r) for r in rows))  # blank lines between rows
    ds = load_chat(f)
    assert ds.messages == [r["messages"] for r in rows] and ds.lines == list(range(1, 60, 2))
    assert ds.texts[1] == "And of Italy?\n"  # the last user message
    parts = split(ds)
    assert sorted(map(len, parts.values())) == [3, 6, 21] and parts["test"].lines is not None
    c = tmp_path / "c.csv"
    c.write_text("messages\n" + "".join('"' + json.dumps(r["messages"]).replace('"', '""') + '"\n' for r in rows[:3]))
    assert load_chat(c).messages == [r["messages"] for r in rows[:3]]
