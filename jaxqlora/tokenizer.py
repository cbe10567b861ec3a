"""`Tokenizer`: byte-level BPE tokenization and chat templates, from a GGUF file or an HF folder.

Two sources:

- `Tokenizer.from_gguf`: a GGUF file has no ``tokenizer.json``; it stores the vocabulary, the
  merges, the token types and the special token ids as metadata under llama.cpp's key names
  (GGUF spec, "Tokenizer" section: ``tokenizer.ggml.model``, ``.pre``, ``.tokens``,
  ``.token_type``, ``.merges``, ``.bos_token_id`` ...; ``tokenizer.chat_template``). We rebuild
  the BPE from those with the ``tokenizers`` library, as transformers' GGUF converter does
  (``transformers/integrations/gguf/gguf_tokenizer_mapping.py``), and pick the pre-tokenizer
  regex from ``tokenizer.ggml.pre`` as llama.cpp does (``src/llama-vocab.cpp``,
  ``llm_tokenizer_bpe``).
- `Tokenizer.from_pretrained`: an HF folder with ``tokenizer.json`` (+ ``tokenizer_config.json``,
  ``chat_template.jinja``, ``generation_config.json``).

transformers and llama.cpp disagree on some ``tokenizer.ggml.pre`` values: for ``smollm`` (and
the other StarCoder-style vocabularies) llama.cpp first isolates every digit (``\\p{N}``), then
applies the GPT-2 regex, like the model's original ``tokenizer.json`` (``Digits`` +
``ByteLevel``); transformers' converter knows no ``smollm`` entry and uses plain GPT-2
``ByteLevel`` (no digit split). SmolLM2's vocabulary has no token with a digit in it besides
the ten single digits, so both give the same digit tokens; they differ only on a run of
whitespace just before a digit: ``"a  2"`` is ``a|Ġ|Ġ|2`` = [81, 216, 216, 34] in transformers
and ``a|ĠĠ|2`` = [81, 256, 34] in llama.cpp (``"x\\n\\n2"``: [104, 198, 198, 34] vs
[104, 378, 34]). ``compat="transformers"`` (default) matches transformers id for id;
``compat="llama.cpp"`` matches llama.cpp and the original tokenizer.

The chat template is rendered the way transformers does it
(``transformers/utils/chat_template_utils.py``): a jinja2 ``ImmutableSandboxedEnvironment`` with
``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the ``raise_exception`` and
``strftime_now`` globals, a non-escaping ``tojson`` filter, and the special tokens
(``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``) as variables.
"""

from __future__ import annotations

import errno
import functools
import json
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from jaxqlora.errors import CheckpointError

__all__ = [
    "Compat", "GGUF_PRE_TOKENIZERS", "Tokenizer", "UnsupportedPreTokenizerError", "UnsupportedTokenizerModelError",
]

Compat = Literal["transformers", "llama.cpp"]


class UnsupportedPreTokenizerError(CheckpointError):
    """``tokenizer.ggml.pre`` names a pre-tokenizer we have no regex for (a ``ValueError``).

    Attributes (from `CheckpointError`): ``path`` (the GGUF file), ``name`` (``"tokenizer.ggml.pre"``).
    """


class UnsupportedTokenizerModelError(CheckpointError, NotImplementedError):
    """``tokenizer.ggml.model`` is not ``gpt2`` (byte-level BPE), e.g. ``llama`` (sentencepiece).

    Both a ``ValueError`` (through `CheckpointError`) and a ``NotImplementedError``.
    """


# --- pre-tokenizer regexes ---------------------------------------------------------------------------------------
# Original (HF tokenizer.json) spellings; llama.cpp's llama-vocab.cpp carries these, or rewrites of them without
# `(?i:...)` that match the same text.

#: GPT-2 (the regex inside tokenizers' `ByteLevel(use_regex=True)`).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: Llama 3 (tiktoken cl100k style, numbers in groups of up to 3).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Qwen2 / Qwen2.5 / Qwen3 (single digits).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Qwen3.5 (marks join letters).
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Mistral tekken.
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: GPT-4o / Llama 4 (tiktoken o200k style).
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# llama.cpp: pre-tokenizer family -> (regexes applied one after another, each splitting the pieces of the one before
# and keeping matches and gaps alike; ignore_merges; default add_bos). From llm_tokenizer_bpe's constructor and
# llama_vocab::impl::load in src/llama-vocab.cpp.
_LLAMA_CPP_FAMILIES: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False),
    "gpt2": ((GPT2_SPLIT,), False, False),
    "starcoder": ((r"\p{N}", GPT2_SPLIT), False, False),  # LLAMA_VOCAB_PRE_TYPE_STARCODER / SMOLLM / REFACT / ...
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]"), False, False),
    "llama3": ((LLAMA3_SPLIT,), True, True),
    "dbrx": ((LLAMA3_SPLIT,), False, False),  # DBRX / SMAUG: the Llama 3 regex, merges as usual
    "qwen2": ((QWEN2_SPLIT,), False, False),
    "qwen35": ((QWEN35_SPLIT,), False, False),
    "tekken": ((TEKKEN_SPLIT,), True, True),
    "gpt4o": ((GPT4O_SPLIT,), False, False),
}

#: ``tokenizer.ggml.pre`` values we read -> llama.cpp pre-tokenizer family (llama-vocab.cpp, llama_vocab::impl::load).
GGUF_PRE_TOKENIZERS: dict[str, str] = {
    "default": "default",
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"), "llama3"),
    **dict.fromkeys(("dbrx", "smaug-bpe"), "dbrx"),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "a.x-4.0",
                     "mellum", "gigachat", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "modern-bert"), "gpt2"),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    "starcoder"),
    "falcon": "falcon",
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
                    "qwen2"),
    "qwen35": "qwen35",
    "tekken": "tekken",
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), "gpt4o"),
}

# transformers' converter (GGUF_PRE_TOKENIZER_SPLITS): one Split regex for these `pre` values; every other value
# keeps GPT2Tokenizer's plain ByteLevel (the GPT-2 regex), whatever llama.cpp does with it.
_TRANSFORMERS_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), LLAMA3_SPLIT),
    "tekken": TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), QWEN2_SPLIT),
    "qwen35": QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), GPT4O_SPLIT),
}

# Token texts llama.cpp treats as end of generation (llama-vocab.cpp, special_eog_ids auto-detection).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})

# GGUF token_type values (GGUF spec; llama.cpp llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet every byte-level BPE token is spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_pre_tokenizer(pre: str | None, compat: Compat) -> tuple[Any, bool, bool]:
    """``(pre_tokenizer, ignore_merges, default_add_bos)`` for a known ``tokenizer.ggml.pre`` value."""
    if compat == "transformers":
        split = _TRANSFORMERS_SPLITS.get(pre or "")
        if split is None:  # GPT2Tokenizer's own pre-tokenizer
            return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False, False
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), False, False
    regexes, ignore_merges, add_bos = _LLAMA_CPP_FAMILIES[GGUF_PRE_TOKENIZERS[pre or "default"]]
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps), ignore_merges, add_bos


def _template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """transformers' ``TokenizersBackend.update_post_processor``: optional BOS before and EOS after each sequence."""
    single = f"{bos[0] + ':0 ' if bos else ''}$A:0{' ' + eos[0] + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos[0] + ':1' if bos else ''} $B:1{' ' + eos[0] + ':1' if eos else ''}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t])


# --- chat templates ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """Compile a chat template in the environment transformers uses (utils/chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers' AssistantTracker, untracked)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)


# --- the tokenizer -----------------------------------------------------------------------------------------------

_SPECIAL_NAMES = ("bos", "eos", "unk", "pad")


def _special_id(name: str, doc: str) -> property:
    return property(lambda self: self._special[name], doc=doc)


def _special_text(name: str, doc: str) -> property:
    def text(self) -> str | None:
        i = self._special[name]
        return None if i is None else self.backend.id_to_token(i)
    return property(text, doc=doc)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus special-token ids and a chat template.

    Build one with `Tokenizer.from_gguf` or `Tokenizer.from_pretrained`; the constructor takes an
    already configured backend (its pre-tokenizer, decoder and post-processor are used as they are).

    Args:
      backend: the ``tokenizers.Tokenizer`` (post-processor decides what ``add_special_tokens`` adds).
      bos_token_id, eos_token_id, pad_token_id, unk_token_id: special token ids, or None.
      chat_template: a Jinja chat template, or None.
      eos_token_ids: extra end-of-generation ids (the eos id is always included).
      source: the file or folder it came from (for messages).

    Attributes:
      backend: the ``tokenizers.Tokenizer``.
      chat_template: the Jinja source, or None.
      source: str or None.
    """

    def __init__(self, backend: BackendTokenizer, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, unk_token_id: int | None = None, chat_template: str | None = None,
                 eos_token_ids: Iterable[int] = (), source: str | None = None):
        self.backend = backend
        self._special = {"bos": bos_token_id, "eos": eos_token_id, "unk": unk_token_id, "pad": pad_token_id}
        self.chat_template = chat_template
        self.source = source
        eog = {int(i) for i in eos_token_ids}
        if eos_token_id is not None:
            eog.add(int(eos_token_id))
        self._eos_ids = frozenset(eog)

    # -- special tokens: ``<name>_token_id`` and ``<name>_token`` (its text) for bos, eos, pad, unk
    bos_token_id = _special_id("bos", "Beginning-of-sequence id (GGUF ``tokenizer.ggml.bos_token_id``), or None.")
    eos_token_id = _special_id("eos", "End-of-sequence id (GGUF ``tokenizer.ggml.eos_token_id``), or None.")
    pad_token_id = _special_id("pad", "Padding id (GGUF ``tokenizer.ggml.padding_token_id``), or None.")
    unk_token_id = _special_id("unk", "Unknown-token id (GGUF ``tokenizer.ggml.unknown_token_id``), or None.")
    bos_token = _special_text("bos", "The BOS token's text, or None.")
    eos_token = _special_text("eos", "The EOS token's text, or None.")
    pad_token = _special_text("pad", "The padding token's text, or None.")
    unk_token = _special_text("unk", "The unknown token's text, or None.")

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation (a new ``set``): the eos id, GGUF eot/eom ids, tokens llama.cpp treats as
        end of generation by their text (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``, ...; llama-vocab.cpp),
        and for HF folders ``generation_config.json``'s ``eos_token_id``."""
        return set(self._eos_ids)

    def _special_tokens(self) -> dict[str, str]:
        """``{"bos_token": text, "eos_token": ..., "unk_token": ..., "pad_token": ...}`` for the tokens that are set."""
        texts = {f"{name}_token": getattr(self, f"{name}_token") for name in _SPECIAL_NAMES}
        return {key: text for key, text in texts.items() if text is not None}

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode(..., add_special_tokens=True)`` puts the BOS token first."""
        ids = self.backend.encode("", add_special_tokens=True).ids
        return self.bos_token_id is not None and bool(ids) and ids[0] == self.bos_token_id

    @property
    def add_eos_token(self) -> bool:
        """Whether ``encode(..., add_special_tokens=True)`` puts the EOS token last."""
        ids = self.backend.encode("", add_special_tokens=True).ids
        return self.eos_token_id is not None and bool(ids) and ids[-1] == self.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (49,152 for SmolLM2)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, source={self.source!r})")

    def token_to_id(self, token: str) -> int | None:
        """The id of a token spelled as in the vocabulary (byte-level alphabet: ``"Ġthe"``), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of an id, or None."""
        return self.backend.id_to_token(int(token_id))

    # -- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.

        Special tokens written in the text (``<|im_start|>``) become their ids, as in transformers.

        Args:
          text: a string.
          add_special_tokens: add BOS/EOS as the tokenizer is set to (GGUF ``tokenizer.ggml.add_bos_token`` /
            ``add_eos_token``; for HF folders, ``tokenizer.json``'s post-processor). SmolLM2 adds neither.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for each of ``texts`` (one call into ``tokenizers``, which may use several threads)."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a sequence of str")
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list, a NumPy/JAX array, or one int).

        Bytes that do not form whole UTF-8 characters become U+FFFD. No space clean-up (transformers skips it for
        BPE; llama.cpp sets ``clean_spaces = false`` for smollm).

        Args:
          ids: token ids.
          skip_special_tokens: drop special tokens (control tokens, BOS/EOS/PAD/UNK) from the text.
        """
        if isinstance(ids, int) or getattr(ids, "ndim", None) == 0:
            ids = [ids]
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, chat_template: str | None = None, **kwargs: Any) -> str | list[int]:
        """Render a conversation with the chat template, as transformers' ``apply_chat_template`` does.

        Args:
          messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``; keys whose value is None
            are dropped first (transformers does the same).
          add_generation_prompt: end with the header of an assistant turn (``<|im_start|>assistant\\n``).
            Note the default is True here (transformers defaults to False).
          tokenize: return token ids (the rendered text encoded with ``add_special_tokens=False``) instead of text.
          chat_template: use this template instead of the tokenizer's.
          **kwargs: more template variables (they override ``bos_token`` and the other special tokens).

        Returns:
          The rendered text (``str``), or its ids (``list[int]``) when ``tokenize``.

        Raises:
          ValueError: no chat template, or an empty conversation.
          jinja2.TemplateError: the template called ``raise_exception`` (e.g. bad role order).
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError(f"{self.source or 'this tokenizer'} has no chat template "
                             "(GGUF tokenizer.chat_template / tokenizer_config.json chat_template)")
        if isinstance(messages, Mapping) or not len(messages):
            raise ValueError("apply_chat_template takes a non-empty list of message dicts")
        chat = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise TypeError(f"chat messages must be dicts, got {m!r}")
            chat.append({k: v for k, v in m.items() if v is not None})
        variables = {**self._special_tokens(), **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        text = _compile_chat_template(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                                       **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # -- loaders
    @classmethod
    def from_gguf(cls, path_or_reader: Any, compat: Compat = "transformers") -> Tokenizer:
        """Build the tokenizer a GGUF file describes (byte-level BPE, ``tokenizer.ggml.model = gpt2``).

        Reads (GGUF spec names): ``tokenizer.ggml.model``, ``.pre``, ``.tokens``, ``.token_type``, ``.merges``,
        ``.bos_token_id``, ``.eos_token_id``, ``.padding_token_id``, ``.unknown_token_id``, ``.eot_token_id``,
        ``.eom_token_id``, ``.add_bos_token``, ``.add_eos_token`` and ``tokenizer.chat_template``.

        As transformers' converter: tokens not spelled in the byte-level alphabet are respelled byte by byte;
        control tokens (token_type 3) become special added tokens, user-defined ones (token_type 4) plain added
        tokens (matched whole, kept by ``skip_special_tokens``); the BPE has no unk token.

        Args:
          path_or_reader: a ``.gguf`` path, or an open ``gguf.GGUFReader``.
          compat: ``"transformers"`` (default) uses the pre-tokenizer transformers' GGUF converter builds
            (only the ``pre`` values it knows get their own regex, every other one the GPT-2 regex), no
            ``ignore_merges``, and ``add_bos_token`` False when the file does not say; ``"llama.cpp"`` uses
            llama-vocab.cpp's regexes for ``pre`` (for ``smollm``: each digit alone, then GPT-2), its
            ``ignore_merges`` and its default ``add_bos`` (True for llama3 and tekken).

        Raises:
          FileNotFoundError: no file at ``path``.
          CheckpointError: not a GGUF file or a damaged header (`jaxqlora.io.gguf.check_gguf_header`: counts
            and lengths are checked against the file size before anything is read), or a tokenizer field is
            missing, of the wrong type, not UTF-8 or inconsistent (a merge naming a token the vocabulary lacks,
            a special token id outside it, token types of another length); names the file and the field.
          UnsupportedTokenizerModelError (also NotImplementedError): ``tokenizer.ggml.model`` is not ``gpt2``.
          UnsupportedPreTokenizerError (a ValueError): unknown ``tokenizer.ggml.pre``.
        """
        import gguf

        if compat not in ("transformers", "llama.cpp"):
            raise ValueError(f"compat must be 'transformers' or 'llama.cpp', got {compat!r}")
        if isinstance(path_or_reader, gguf.GGUFReader):
            reader = path_or_reader
            path = str(getattr(getattr(reader, "data", None), "filename", None) or "<GGUFReader>")
        else:
            from jaxqlora.io.gguf import open_gguf

            path = str(path_or_reader)
            if not Path(path).is_file():
                raise FileNotFoundError(errno.ENOENT, "no GGUF file", path)
            reader = open_gguf(path)  # header checked first: counts and lengths bounded by the file size

        def field(key: str, default: Any = ...) -> Any:
            f = reader.fields.get(key)
            if f is None:
                if default is ...:
                    raise CheckpointError(path, "tokenizer metadata field is missing", key)
                return default
            try:
                return f.contents()
            except Exception as e:
                raise CheckpointError(path, f"unreadable metadata field ({type(e).__name__}: {e})", key) from e

        model = field("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedTokenizerModelError(
                path, f"tokenizer model {model!r} is not supported; only 'gpt2' (byte-level BPE) is",
                "tokenizer.ggml.model")
        pre = field("tokenizer.ggml.pre", None)
        if pre is None:
            warnings.warn(f"{path}: no tokenizer.ggml.pre; using 'default' as llama.cpp does "
                          "(tokenization may differ from the model's own)", stacklevel=2)
        elif not isinstance(pre, str):
            raise CheckpointError(path, f"expected a string, got {type(pre).__name__}", "tokenizer.ggml.pre")
        elif pre not in GGUF_PRE_TOKENIZERS:
            raise UnsupportedPreTokenizerError(
                path, f"unknown pre-tokenizer {pre!r}; known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}",
                "tokenizer.ggml.pre")

        def list_of(key: str, kind: type, what: str, default: Any = ...) -> list:
            value = field(key, default)
            if value is default and default is not ...:
                return value
            if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                      for v in value):
                got = type(value).__name__ if not isinstance(value, list) else \
                    next(type(v).__name__ for v in value if not isinstance(v, kind) or isinstance(v, bool))
                raise CheckpointError(path, f"expected an array of {what}, got {got}", key)
            return value

        tokens = list_of("tokenizer.ggml.tokens", str, "strings")
        if not tokens:
            raise CheckpointError(path, "the vocabulary is empty", "tokenizer.ggml.tokens")
        merges_raw = list_of("tokenizer.ggml.merges", str, "strings")
        token_types = list_of("tokenizer.ggml.token_type", int, "integers", None) or []
        n = len(tokens)
        if token_types and len(token_types) != n:
            raise CheckpointError(path, f"{len(token_types)} token types for {n} tokens", "tokenizer.ggml.token_type")

        def special_id(key: str) -> int | None:
            value = field(key, None)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise CheckpointError(path, f"expected a token id (an integer), got {value!r}", key)
            if not 0 <= value < n:
                raise CheckpointError(path, f"token id {value} outside the vocabulary of {n}", key)
            return value

        bos = special_id("tokenizer.ggml.bos_token_id")
        eos = special_id("tokenizer.ggml.eos_token_id")
        pad = special_id("tokenizer.ggml.padding_token_id")
        unk = special_id("tokenizer.ggml.unknown_token_id")
        eot = special_id("tokenizer.ggml.eot_token_id")
        eom = special_id("tokenizer.ggml.eom_token_id")

        # Vocabulary in the byte-level alphabet (transformers' byte_level_tokenizer).
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
                 for i, tok in enumerate(tokens)}
        merges = []
        for i, m in enumerate(merges_raw):
            pair = m.split(" ")
            if len(pair) != 2:
                raise CheckpointError(path, f"merge {i} ({m!r}) is not two tokens separated by one space",
                                      "tokenizer.ggml.merges")
            # The tokenizers library refuses (with a bare "Error while initializing BPE") a merge whose
            # parts or result are not in the vocabulary: say which merge and which token.
            for part in (pair[0], pair[1], pair[0] + pair[1]):
                if part not in vocab:
                    raise CheckpointError(path, f"merge {i} ({m!r}) uses {part!r}, which is not in the vocabulary "
                                          "(tokenizer.ggml.tokens)", "tokenizer.ggml.merges")
            merges.append((pair[0], pair[1]))

        pre_tokenizer, ignore_merges, default_add_bos = _byte_level_pre_tokenizer(pre, compat)
        try:
            bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False, ignore_merges=ignore_merges)
        except Exception as e:  # tokenizers raises a bare Exception
            raise CheckpointError(path, f"the vocabulary and merges do not form a BPE model ({e})",
                                  "tokenizer.ggml.merges") from e
        backend = BackendTokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()

        control = [AddedToken(tok, normalized=False, special=True)
                   for tok, kind in zip(tokens, token_types) if kind == _CONTROL and set(tok) <= alphabet]
        # transformers also registers its bos/eos/unk/pad tokens as special.
        control += [AddedToken(tokens[i], normalized=False, special=True) for i in (bos, eos, unk, pad)
                    if i is not None and tokens[i] in vocab]
        if control:
            backend.add_special_tokens(control)
        user = [AddedToken(tok, normalized=False, special=False)
                for tok, kind in zip(tokens, token_types) if kind == _USER_DEFINED and tok in vocab]
        if user:
            backend.add_tokens(user)

        def flag(key: str, default: bool) -> bool:
            value = field(key, default)
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise CheckpointError(path, f"expected a boolean, got {value!r}", key)
            return bool(value)

        add_bos = flag("tokenizer.ggml.add_bos_token", default_add_bos if compat == "llama.cpp" else False)
        add_eos = flag("tokenizer.ggml.add_eos_token", False)
        chat_template = field("tokenizer.chat_template", None)
        if chat_template is not None and not isinstance(chat_template, str):
            raise CheckpointError(path, f"expected a string, got {type(chat_template).__name__}",
                                  "tokenizer.chat_template")
        backend.post_processor = _template_processor(
            (tokens[bos], bos) if add_bos and bos is not None else None,
            (tokens[eos], eos) if add_eos and eos is not None else None)

        eog = {i for i in (eot, eom) if i is not None}
        eog |= {i for i, tok in enumerate(tokens) if tok in _EOG_TEXTS}
        return cls(backend, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, unk_token_id=unk,
                   chat_template=chat_template, eos_token_ids=eog, source=path)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template)
        so that `Tokenizer.from_pretrained` and transformers' ``AutoTokenizer`` load the folder.
        Files are written atomically."""
        from jaxqlora.io.atomic import atomic_write_bytes, atomic_write_json

        folder = Path(folder)
        atomic_write_bytes(folder / "tokenizer.json", self.backend.to_str().encode("utf-8"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self._special_tokens()}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_json(folder / "tokenizer_config.json", config)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """Load an HF tokenizer folder.

        Reads ``tokenizer.json`` (required: vocabulary, pre-tokenizer, decoder, post-processor);
        ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, ``chat_template``;
        as in transformers 5, ``add_bos_token``/``add_eos_token`` there are ignored in favour of
        ``tokenizer.json``'s post-processor), ``special_tokens_map.json`` (legacy, if the config lacks a token),
        ``chat_template.jinja`` (takes priority over the config's template, as in transformers) and
        ``generation_config.json`` (``eos_token_id``, an int or a list, joins `eos_token_ids`).

        Raises:
          FileNotFoundError: no ``tokenizer.json`` in ``folder``; the message names the path.
          CheckpointError: a JSON file is unreadable.
        """
        folder = Path(folder)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(errno.ENOENT, "no tokenizer.json", str(tok_file))
        try:
            backend = BackendTokenizer.from_file(str(tok_file))
        except Exception as e:
            raise CheckpointError(tok_file, f"unreadable tokenizer.json ({type(e).__name__}: {e})") from e

        def read_json(name: str) -> dict:
            p = folder / name
            if not p.is_file():
                return {}
            try:
                with open(p, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, ValueError) as e:
                raise CheckpointError(p, f"unreadable JSON ({type(e).__name__}: {e})") from e
            if not isinstance(data, dict):
                raise CheckpointError(p, "expected a JSON object")
            return data

        config = read_json("tokenizer_config.json")
        legacy = read_json("special_tokens_map.json")

        def token_id(key: str) -> int | None:
            value = config.get(key, legacy.get(key))
            if isinstance(value, Mapping):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        if backend.post_processor is None:
            backend.post_processor = _template_processor(None, None)

        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = config.get("chat_template") or read_json("chat_template.json").get("chat_template")
            if isinstance(chat_template, list):  # [{"name": ..., "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, Mapping)}
                chat_template = named.get("default")

        eog = {tid for tid, added in backend.get_added_tokens_decoder().items() if added.content in _EOG_TEXTS}
        gen_eos = read_json("generation_config.json").get("eos_token_id")
        if isinstance(gen_eos, int):
            eog.add(gen_eos)
        elif isinstance(gen_eos, list):
            eog |= {int(i) for i in gen_eos if isinstance(i, int)}
        return cls(backend, **{f"{name}_token_id": token_id(f"{name}_token") for name in _SPECIAL_NAMES},
                   chat_template=chat_template, eos_token_ids=eog, source=str(folder))
