"""A tiny Qwen3 model and a tokenizer built in code, for tests and CPU demos.

:func:`tiny_tokenizer` trains a byte-level BPE (so any text round-trips) on a small in-code corpus, adds the
Qwen3 chat / tool special tokens and a Hermes-style chat template (tool schemas in the system turn,
assistant ``tool_calls`` as ``<tool_call>{json}</tool_call>``, ``tool`` messages inside ``<tool_response>``
in a user turn). :func:`tiny_qwen3` builds a randomly initialised ``Qwen3ForCausalLM`` for it, and
:func:`save_tiny` writes both to a folder that ``from_pretrained`` (and vLLM: ``head_dim >= 64``) can load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# Control tokens: skipped by ``decode(..., skip_special_tokens=True)``.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Markup tokens: single ids, but kept when decoding (as in Qwen3).
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Hermes / Qwen3-style template, written for this project. Tool schemas go to the system turn; assistant
# ``tool_calls`` (OpenAI format; ``arguments`` a dict or a JSON string) are rendered after the content;
# consecutive ``tool`` messages share one user turn, each inside ``<tool_response>``.
CHAT_TEMPLATE = """\
{%- set msgs = messages -%}
{%- set system = none -%}
{%- if messages and messages[0].role == 'system' -%}
  {%- set system = messages[0].content -%}
  {%- set msgs = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
  {{- '<|im_start|>system\\n' -}}
  {%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}
  {{- '# Tools\\n\\nYou can call these functions; their signatures are inside <tools></tools>:\\n<tools>' -}}
  {%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\\n</tools>\\n\\nTo call one, write a JSON object with its name and arguments inside '
      + '<tool_call></tool_call> tags:\\n<tool_call>\\n'
      + '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- elif system is not none -%}
  {{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for m in msgs -%}
  {%- if m.role == 'tool' -%}
    {%- if loop.first or msgs[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}
    {%- if loop.last or msgs[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
  {%- elif m.role == 'assistant' -%}
    {{- '<|im_start|>assistant\\n' + (m.content or '') -}}
    {%- for call in (m.tool_calls or []) -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {%- if (m.content or '') or not loop.first -%}{{- '\\n' -}}{%- endif -%}
      {{- '<tool_call>\\n{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
      {%- if fn.arguments is string -%}{{- fn.arguments -}}
      {%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
      {{- '}\\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

_CORPUS = [
    "Solve the problem step by step. Put your final answer within \\boxed{}.",
    "Let x be the number of apples. Then 3x + 5 = 20, so x = 5. The answer is \\boxed{5}.",
    "We compute the sum of the first 100 positive integers: 100 * 101 / 2 = 5050.",
    "The probability is 1/6 + 1/6 = 1/3, and the expected value is 7/2.",
    "Let me check this with Python code before answering the question.",
    "print(sum(i * i for i in range(1, 11)))\nfor n in range(10):\n    if n % 2 == 0:\n        print(n)",
    "import math\nresult = math.comb(10, 3)\nprint(result)\ndef f(a, b):\n    return a + b",
    '{"name": "code_interpreter", "arguments": {"code": "print(2 + 2)"}}',
    "Traceback (most recent call last):\nNameError: name 'y' is not defined",
    "The output is 4, which confirms the result. Therefore the final answer is \\boxed{4}.",
    "Which option is correct? (A) 1 (B) 2 (C) 3 (D) 4. The correct option is \\boxed{B}.",
    "Read the input from standard input and print the answer to standard output.",
]


def tiny_tokenizer(
    vocab_size: int = 512,
    *,
    corpus: list[str] | None = None,
    split_digits: bool = False,
    merge_across_words: bool = False,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the Qwen3 chat / tool tokens and a Hermes-style chat template.

    Deterministic: the BPE merges are learned from a fixed corpus. Every string round-trips through
    ``decode(encode(text))`` (byte-level alphabet). ``eos_token`` is ``<|im_end|>`` (the end of a chat turn),
    ``pad_token`` is ``<|endoftext|>``.

    Args:
        vocab_size: size of the byte-level BPE vocabulary with the three control tokens (at least 259);
            the six markup tokens come on top.
        corpus: the texts the merges are learned from (default: a small in-code corpus of math / code text).
        split_digits: every digit is its own token (no merges across digits), so numbers are spelled out.
        merge_across_words: let merges span spaces and punctuation (no GPT-2 word split), so a phrase that
            recurs in ``corpus`` can become one token.
        chat_template: a Jinja chat template to use instead of :data:`CHAT_TEMPLATE`.
    """
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge_across_words)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS if corpus is None else corpus, trainer=trainer)
    # Markup tokens are single ids, split off before pre-tokenisation, but not special (kept by decode).
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE if chat_template is None else chat_template
    return fast


def tiny_qwen3(
    tokenizer_or_vocab_size: PreTrainedTokenizerFast | int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 64,
    intermediate_size: int = 128,
    max_position_embeddings: int = 32768,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM (fp32), e.g. for :func:`tiny_tokenizer`.

    Args:
        tokenizer_or_vocab_size: the tokenizer (its ``len`` is the vocabulary size; its eos / pad ids go to
            the config) or a vocabulary size.
        head_dim: 64 or more so that vLLM's attention kernels accept the model.
        seed: the initialisation seed (the global torch RNG is left untouched).
    """
    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, eos_id, pad_id = tokenizer_or_vocab_size, None, None
    else:
        tokenizer = tokenizer_or_vocab_size
        vocab_size, eos_id, pad_id = len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model.eval()


def save_tiny(path: str | Path, *, seed: int = 0, **model_kwargs) -> Path:
    """Write :func:`tiny_tokenizer` and :func:`tiny_qwen3` (``model_kwargs`` go to it) to ``path``."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    tiny_qwen3(tokenizer, seed=seed, **model_kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
