"""The in-code tokenizer (round trip, chat template with tools) and the tiny Qwen3 builder."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sodkern.trainer.demo.tiny import MARKUP_TOKENS, SPECIAL_TOKENS, save_tiny, tiny_qwen3, tiny_tokenizer
from sodkern.trainer.tasks.prompts import CODE_INTERPRETER_TOOL


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


CALL = {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": "print(2 + 2)"}}}
CONVERSATION = [
    {"role": "system", "content": "You are a careful solver."},
    {"role": "user", "content": "What is 2 + 2?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "code_interpreter", "arguments": {"code": "print(2 + 2)"}},
            }
        ],
    },
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "The answer is \\boxed{4}."},
]


@pytest.mark.parametrize(
    "text",
    ["", "plain words", "ünïcødé ✓ 🙂 \t\r\n  spaces", "x<|im_end|>\n<tool_call>{}</tool_call>y", "\x00\xff"],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens_are_single_ids(tok):
    for t in SPECIAL_TOKENS + MARKUP_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok.encode("<tool_call>a</tool_call><|im_end|>", add_special_tokens=False)
    # markup stays on decode(skip_special_tokens=True); control tokens go
    assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>a</tool_call>"


def test_deterministic():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert len(a) == 512 + len(MARKUP_TOKENS)


def test_chat_template_with_tools(tok):
    text = tok.apply_chat_template(CONVERSATION, tools=[CODE_INTERPRETER_TOOL], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a careful solver.\n\n# Tools")
    assert '"name": "code_interpreter"' in text.split("\n</tools>")[0]  # schema in the system turn
    assert (
        "<|im_start|>assistant\nLet me check.\n<tool_call>\n"
        '{"name": "code_interpreter", "arguments": {"code": "print(2 + 2)"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nThe answer is \\boxed{4}.<|im_end|>\n"
    ) in text
    assert not text.endswith("<|im_start|>assistant\n")
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a careful solver.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    # arguments given as a JSON string (OpenAI wire format) render the same
    as_string = [dict(m) for m in CONVERSATION]
    call = as_string[2]["tool_calls"][0]
    as_string[2]["tool_calls"] = [{**call, "function": {**call["function"], "arguments": '{"code": "print(2 + 2)"}'}}]
    assert tok.apply_chat_template(as_string, tools=[CODE_INTERPRETER_TOOL], tokenize=False) == text


def test_consecutive_tool_messages_share_a_user_turn(tok):
    msgs = [*CONVERSATION[1:4], {"role": "tool", "content": "5"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\n5\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tiny_qwen3_config_and_seed(tok):
    model = tiny_qwen3(tok)
    cfg = model.config
    assert cfg.model_type == "qwen3" and cfg.vocab_size == len(tok) and cfg.head_dim == 64
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    state = torch.get_rng_state()
    again, other = tiny_qwen3(tok, seed=0), tiny_qwen3(tok, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, again.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(w, other.model.layers[0].mlp.up_proj.weight)
    assert tiny_qwen3(300, hidden_size=32, num_layers=1).config.vocab_size == 300


def test_save_tiny_loads_with_from_pretrained(tmp_path, tok):
    path = save_tiny(tmp_path / "tiny", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)
    ids = loaded.apply_chat_template(CONVERSATION, tools=[CODE_INTERPRETER_TOOL], tokenize=False)
    assert loaded.encode(ids, add_special_tokens=False) == tok.encode(ids, add_special_tokens=False)
    x = torch.tensor([loaded.encode("print(2 + 2)", add_special_tokens=False)])
    with torch.no_grad():
        expected = tiny_qwen3(tok, seed=3)(x).logits
        torch.testing.assert_close(model(x).logits, expected)
    assert expected.shape == (1, x.shape[1], len(tok))
