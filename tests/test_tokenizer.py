"""`jaxqlora.tokenizer.Tokenizer` against transformers' GGUF tokenizer for the embedded SmolLM2-135M-Instruct,
plus tiny GGUF files written with ``gguf.GGUFWriter`` for the pre-tokenizer table and the errors."""

import json

import gguf
import pytest

from jaxqlora.errors import CheckpointError
from jaxqlora.tokenizer import (Tokenizer, UnsupportedPreTokenizerError, UnsupportedTokenizerModelError,
                                bytes_to_unicode)

TEXTS = [
    "",
    " ",
    "  ",
    "Hello world",
    "The capital of France is",
    "  leading spaces",
    "trailing spaces   ",
    "  both sides  ",
    "Café naïve résumé façade Ångström",
    "日本語のテキスト 你好，世界！ 한국어",
    "emoji 🎉🚀 👍🏽 and a family 👨\u200d👩\u200d👧",
    "12345",
    "3.14159",
    "year 2026",
    "price: $1,234.56 (approx. 1e-3)",
    "a  2",               # whitespace run before a digit: transformers and llama.cpp differ here
    "x\n\n2",
    "line1\n  42 items",
    "    4 spaces then 4",
    "١٢٣ arabic-indic digits ٤",
    "def f(x):\n    return x + 1\n\n\nclass A:\n\tdef g(self):\n\t\tpass  # tab\n",
    "if (a && b) { return [1, 2, 3]; }\r\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "tabs\tand\nnewlines\r\nmixed",
    "a\u00a0non-breaking space, ﬁ ligature, Ω ≈ √2",
    "\n",
    "\n\n\n",
]

SYSTEM_AND_USER = [{"role": "system", "content": "You are a terse assistant."},
                   {"role": "user", "content": "What is 2 + 2? Answer in 3 words."}]
USER_ONLY = [{"role": "user", "content": "Write a haiku about the sea 🌊."}]


@pytest.fixture(scope="module")
def gguf_path():
    from jaxqlora.io.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="module")
def reader(gguf_path):
    return gguf.GGUFReader(str(gguf_path))


@pytest.fixture(scope="module")
def ours(reader):
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def ours_llamacpp(reader):
    return Tokenizer.from_gguf(reader, compat="llama.cpp")


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    """transformers' tokenizer from the same GGUF (its converter in integrations/gguf), loaded once."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# --- the embedded model against transformers ---------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, hf_tok, text):
    ids = ours.encode(text)
    assert ids == hf_tok.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf_tok.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    if "<|" not in text:  # byte-level BPE round-trips any text without special tokens
        assert ours.decode(ids) == text


def test_encode_batch(ours, hf_tok):
    assert ours.encode_batch(TEXTS) == [hf_tok.encode(t) for t in TEXTS]


def test_decode_accepts_arrays_and_partial_utf8(ours, hf_tok):
    import numpy as np

    ids = ours.encode("emoji 🎉")
    assert ours.decode(np.asarray(ids)) == "emoji 🎉"
    assert ours.decode(ids[:-1]) == hf_tok.decode(ids[:-1])  # a cut UTF-8 sequence: U+FFFD, as transformers
    assert ours.decode(ids[0]) == hf_tok.decode([ids[0]])


@pytest.mark.parametrize("messages", [SYSTEM_AND_USER, USER_ONLY], ids=["system+user", "user"])
def test_chat_template_matches_transformers(ours, hf_tok, messages):
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == want
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == want
    want_ids = list(hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               return_dict=False))
    assert ours.apply_chat_template(messages, tokenize=True) == want_ids
    assert ours.encode(want, add_special_tokens=False) == want_ids
    no_prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == no_prompt


def test_chat_template_text(ours):
    assert ours.apply_chat_template(USER_ONLY) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWrite a haiku about the sea 🌊.<|im_end|>\n<|im_start|>assistant\n")
    ids = ours.apply_chat_template(SYSTEM_AND_USER, tokenize=True)
    assert ids[0] == 1 and ids[-4:] == ours.encode("<|im_start|>assistant\n") == [1, 520, 9531, 198]
    with pytest.raises(ValueError):
        ours.apply_chat_template([])


def test_chat_template_environment(ours):
    """The transformers environment: trim/lstrip blocks, loopcontrols, tojson, raise_exception, the special tokens
    (bos/eos/pad/unk) as variables, the {% generation %} tag."""
    template = ("{% for m in messages %}\n  {% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}\n"
                "{% if loop.index > 2 %}{% break %}{% endif %}{{ bos_token }}{{ m | tojson }}"
                "{{ pad_token }}{{ unk_token }}{% generation %}{{ eos_token }}{% endgeneration %}\n{% endfor %}")
    out = ours.apply_chat_template([{"role": "user", "content": "é<"}], chat_template=template)
    assert out == '<|im_start|>{"role": "user", "content": "é<"}<|im_end|><|endoftext|><|im_end|>'
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="bad role"):
        ours.apply_chat_template([{"role": "bad", "content": ""}], chat_template=template)


def test_special_token_ids(ours, hf_tok):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (1, 2, 2, 0)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 2)
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.eos_token_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>: llama.cpp's end-of-generation set
    assert isinstance(ours.eos_token_ids, set)
    assert ours.add_bos_token is False and ours.add_eos_token is False  # tokenizer.ggml.add_bos_token = false
    assert ours.vocab_size == len(ours) == len(hf_tok) == 49152
    assert ours.chat_template == hf_tok.chat_template


def test_control_tokens_are_special(ours, hf_tok):
    """The 17 control tokens (token_type 3) stay whole and are dropped by skip_special_tokens."""
    for i in range(17):
        token = ours.id_to_token(i)
        assert ours.encode(f"a{token}b") == hf_tok.encode(f"a{token}b")
        assert ours.encode(token) == [i]
        assert ours.decode([i], skip_special_tokens=True) == ""
    assert ours.encode("<|im_start") != [1]


def test_from_gguf_path_and_reader_agree(gguf_path, ours):
    by_path = Tokenizer.from_gguf(gguf_path)
    assert [by_path.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert str(gguf_path) in by_path.source


# --- transformers vs llama.cpp on digits ---------------------------------------------------------------------------

# llama.cpp (pre = smollm: "\p{N}" first, then GPT-2) and the model's own tokenizer.json (Digits + ByteLevel) cut a
# whitespace run off a following digit, so it merges (ĠĠ, ĊĊ, ĊĠĠ); transformers' converter uses plain GPT-2
# ByteLevel, where " ?\p{N}+" takes one space with the digits and the rest of the run stays apart.
DIGIT_DISAGREEMENTS = {
    "a  2": ([81, 216, 216, 34], ["a", "ĠĠ", "2"]),
    "x\n\n2": ([104, 198, 198, 34], ["x", "ĊĊ", "2"]),
    "line1\n  42 items": ([1311, 33, 3805, 216, 36, 34, 3723], ["line", "1", "ĊĠĠ", "4", "2", "Ġitems"]),
    "    4 spaces then 4": ([333, 216, 36, 5600, 965, 216, 36], ["ĠĠĠĠ", "4", "Ġspaces", "Ġthen", "Ġ", "4"]),
}


@pytest.mark.parametrize("text", sorted(DIGIT_DISAGREEMENTS))
def test_digit_split_transformers_vs_llamacpp(ours, ours_llamacpp, hf_tok, text):
    hf_ids, llamacpp_tokens = DIGIT_DISAGREEMENTS[text]
    assert hf_tok.encode(text) == hf_ids == ours.encode(text)
    got = ours_llamacpp.encode(text)
    assert [ours_llamacpp.id_to_token(i) for i in got] == llamacpp_tokens
    assert ours_llamacpp.decode(got) == text


def test_llamacpp_mode_equals_original_smollm_pipeline(ours_llamacpp, hf_tok):
    """compat="llama.cpp" equals SmolLM2's own tokenizer.json pre-tokenizer (Digits(individual) + ByteLevel),
    rebuilt on transformers' vocabulary; digits themselves are always single tokens in this vocabulary."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    original = Backend.from_str(hf_tok.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS:
        assert ours_llamacpp.encode(text) == original.encode(text).ids, text
    for text in ("12345", "3.14159", "year 2026"):
        assert ours_llamacpp.encode(text) == hf_tok.encode(text)


# --- HF folders ----------------------------------------------------------------------------------------------------

def test_from_pretrained_matches_transformers(tmp_path, hf_tok):
    hf_tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert [loaded.encode(t) for t in TEXTS] == [hf_tok.encode(t) for t in TEXTS]
    ids = loaded.encode(TEXTS[10])
    assert loaded.decode(ids) == hf_tok.decode(ids)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (1, 2, 2, 0)
    assert loaded.vocab_size == 49152 and loaded.eos_token_ids == {0, 2}
    for messages in (SYSTEM_AND_USER, USER_ONLY):
        assert loaded.apply_chat_template(messages) == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
        assert loaded.apply_chat_template(messages, tokenize=True) == list(hf_tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False))


def test_from_pretrained_config_files(tmp_path, hf_tok):
    hf_tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
                               {"name": "tool_use", "template": "x"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.apply_chat_template(USER_ONLY) == "<|im_start|>" + USER_ONLY[0]["content"]
    assert loaded.eos_token_ids == {0, 2, 5}
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}")  # the .jinja file wins over the config
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(USER_ONLY) == "<|im_end|>"


def test_from_pretrained_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


# --- tiny GGUF files: the pre-tokenizer table and the errors -----------------------------------------------------

def _write_tiny_gguf(path, *, model="gpt2", pre="qwen2", add_bos=None, merges=("1 2", "Ġ a")):
    """A GGUF with tokenizer metadata only: 2 control tokens, the 256 byte symbols, then the merged tokens."""
    tokens = ["<s>", "</s>"] + list(bytes_to_unicode().values())
    tokens += [m.replace(" ", "") for m in merges]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def test_unknown_pre_names_field_and_file(tmp_path):
    path = tmp_path / "nonsense.gguf"
    _write_tiny_gguf(path, pre="nonsense")
    with pytest.raises(UnsupportedPreTokenizerError, match="tokenizer.ggml.pre") as info:
        Tokenizer.from_gguf(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CheckpointError)
    assert info.value.name == "tokenizer.ggml.pre"
    assert str(path) in str(info.value) and "nonsense" in str(info.value)


def test_sentencepiece_model_not_implemented(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_tiny_gguf(path, model="llama")
    with pytest.raises(NotImplementedError, match="tokenizer.ggml.model") as info:
        Tokenizer.from_gguf(path)
    assert isinstance(info.value, UnsupportedTokenizerModelError) and str(path) in str(info.value)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="junk.gguf"):
        Tokenizer.from_gguf(path)


@pytest.mark.parametrize("pre, compat, digits_merge", [
    ("qwen2", "transformers", False),     # Qwen2 regex: \p{N} one digit at a time
    ("qwen2", "llama.cpp", False),
    ("gpt-2", "transformers", True),      # GPT-2 regex: " ?\p{N}+" keeps "12" together, merge "1 2" applies
    ("gpt-2", "llama.cpp", True),
    ("smollm", "transformers", True),     # transformers: plain GPT-2 for smollm
    ("smollm", "llama.cpp", False),       # llama.cpp: digits split one by one
    ("default", "llama.cpp", True),
])
def test_tiny_pre_tokenizers(tmp_path, pre, compat, digits_merge):
    path = tmp_path / "tiny.gguf"
    tokens = _write_tiny_gguf(path, pre=pre)
    tok = Tokenizer.from_gguf(path, compat=compat)
    got = [tok.id_to_token(i) for i in tok.encode("x 12 a")]
    assert got == (["x", "Ġ", "12", "Ġa"] if digits_merge else ["x", "Ġ", "1", "2", "Ġa"])
    assert tok.vocab_size == len(tokens) and tok.decode(tok.encode("x 12 a")) == "x 12 a"
    assert tok.encode("<s>hi</s>") == [0, tokens.index("h"), tokens.index("i"), 1]
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "<s>q</s>"


def test_tiny_add_bos(tmp_path):
    path = tmp_path / "llama3.gguf"
    tokens = _write_tiny_gguf(path, pre="llama-bpe")
    a = tokens.index("a")
    # llama.cpp turns add_bos on for llama3 vocabularies that do not say; transformers leaves it off.
    assert Tokenizer.from_gguf(path, compat="llama.cpp").encode("a") == [0, a]
    assert Tokenizer.from_gguf(path).encode("a") == [a]
    _write_tiny_gguf(path, pre="llama-bpe", add_bos=True)
    tok = Tokenizer.from_gguf(path)
    assert tok.encode("a") == [0, a] and tok.encode("a", add_special_tokens=False) == [a]
    assert tok.add_bos_token and tok.encode_batch(["a", ""]) == [[0, a], [0]]
    with pytest.raises(ValueError, match="compat"):
        Tokenizer.from_gguf(path, compat="vllm")


def test_save_pretrained_round_trip_in_transformers(tmp_path, ours):
    """Our saved folder loads in transformers' AutoTokenizer with the same ids and template."""
    transformers = pytest.importorskip("transformers")
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Héllo wörld 12345 ✨ <|im_start|>user\nhi<|im_end|>"
    assert hf(text)["input_ids"] == ours.encode(text)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == ours.apply_chat_template(msgs)
    assert hf.eos_token_id == ours.eos_token_id == 2
    assert (hf.bos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 0)


# --- damaged vocabulary metadata (issue 16): typed errors naming the file and the field -----------------------------

import struct  # noqa: E402
import warnings  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tokenizers import models  # noqa: E402

from jaxqlora.errors import JaxQLoRAError  # noqa: E402


def _gguf_string(text):
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _damaged(tmp_path, old, new, name="damaged.gguf", **kw):
    """The tiny tokenizer GGUF with the (unique) bytes ``old`` replaced by ``new``."""
    path = tmp_path / name
    _write_tiny_gguf(path, **kw)
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


def test_merge_with_token_missing_from_vocabulary(tmp_path):
    """Token "12" respelled "1x" (same length, the file stays well formed): the merge "1 2" now makes a
    token the vocabulary lacks. The tokenizers library alone raises a bare Exception; we name the field."""
    path = _damaged(tmp_path, _gguf_string("12"), _gguf_string("1x"))
    tokens = ["<s>", "</s>"] + list(bytes_to_unicode().values()) + ["1x", "Ġa"]
    with pytest.raises(Exception, match="Error while initializing BPE") as raw:
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[("1", "2"), ("Ġ", "a")])
    assert not isinstance(raw.value, JaxQLoRAError)
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_gguf(path)
    assert e.value.name == "tokenizer.ggml.merges" and str(path) in str(e.value)
    assert "'12'" in str(e.value) and "not in the vocabulary" in str(e.value)


def test_token_not_utf8(tmp_path):
    path = _damaged(tmp_path, _gguf_string("12"), struct.pack("<Q", 2) + b"1\xff")
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_gguf(path)
    assert e.value.name == "tokenizer.ggml.tokens" and str(path) in str(e.value)


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"])
def test_array_length_1e12(tmp_path, key):
    """An absurd array length is refused from the header, before any element is read."""
    path = tmp_path / "long.gguf"
    _write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    offs = data.find(_gguf_string(key)) + 8 + len(key) + 4 + 4  # key, value type (array), element type
    struct.pack_into("<Q", data, offs, 10**12)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_gguf(path)
    assert e.value.name == key and "array length 1000000000000" in str(e.value) and str(path) in str(e.value)


def test_string_length_1e12(tmp_path):
    path = _damaged(tmp_path, _gguf_string("Ġ a"), struct.pack("<Q", 10**12) + b"\xc4\xa0 a")
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_gguf(path)
    assert e.value.name == "tokenizer.ggml.merges" and "1000000000000 bytes" in str(e.value)


def _write_fields(path, **fields):
    """A GGUF with the tiny vocabulary, then ``fields`` written over it with add_key_value-style calls."""
    tokens = ["<s>", "</s>"] + list(bytes_to_unicode().values()) + ["12"]
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fields.pop("pre", "qwen2"))
    if "tokens" in fields:
        w.add_array("tokenizer.ggml.tokens", fields.pop("tokens"))
    else:
        w.add_token_list(tokens)
    w.add_token_merges(fields.pop("merges", ["1 2"]))
    w.add_bos_token_id(fields.pop("bos", 0))
    for key, value in fields.items():
        getattr(w, key)(*value) if isinstance(value, tuple) else getattr(w, key)(value)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.mark.parametrize("fields, key, text", [
    ({"tokens": [1, 2, 3]}, "tokenizer.ggml.tokens", "array of strings"),
    ({"merges": ["1 2 3"]}, "tokenizer.ggml.merges", "two tokens"),
    ({"merges": ["1 zz"]}, "tokenizer.ggml.merges", "uses 'zz'"),
    ({"bos": 10**6}, "tokenizer.ggml.bos_token_id", "outside the vocabulary"),
    ({"add_eos_token_id": 259}, "tokenizer.ggml.eos_token_id", "outside the vocabulary"),
    ({"add_token_types": [1, 1]}, "tokenizer.ggml.token_type", "token types for"),
    ({"add_uint32": ("tokenizer.ggml.add_bos_token", 7)}, "tokenizer.ggml.add_bos_token", "boolean"),
    ({"add_uint32": ("tokenizer.chat_template", 7)}, "tokenizer.chat_template", "expected a string"),
    ({"add_uint32": ("tokenizer.ggml.pre", 7)}, "tokenizer.ggml.pre", "expected a string"),
], ids=["tokens-ints", "merge-3-parts", "merge-unknown", "bos", "eos", "token-types", "add-bos",
                                   "template-int", "pre-int"])
def test_bad_tokenizer_field(tmp_path, fields, key, text):
    path = tmp_path / "bad.gguf"
    _write_fields(path, **fields)
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_gguf(path)
    assert e.value.name == key and text in str(e.value) and str(path) in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def tiny_tokenizer_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    _write_tiny_gguf(path, pre="gpt-2")
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_truncation_and_bit_flips(tiny_tokenizer_gguf, tmp_path, data):
    """Random truncations and bit flips anywhere in a tokenizer-only GGUF: a working tokenizer or a
    JaxQLoRAError naming the file; never the tokenizers library's bare Exception, a UnicodeDecodeError,
    IndexError or a hang."""
    raw = tiny_tokenizer_gguf
    buf = bytearray(raw)
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, len(raw) - 1), label="byte")
            buf[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(buf))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = Tokenizer.from_gguf(path)
        tok.decode(tok.encode("x 12 a <s>"))
    except JaxQLoRAError as e:
        assert "fuzz.gguf" in str(e)
