"""Fixtures for the TRL integration tests: a tiny tokenizer TRL can parse tool calls with, and a tiny student
fine-tuned to call the code interpreter (so TRL's tool loop really runs), with a tiny teacher."""

from __future__ import annotations

import pytest
import torch

PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]


def tool_call(code: str) -> dict:
    return {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": code}}}


# (code the model runs, what the sandbox prints, final answer): the student learns both, so groups disagree.
TRAJECTORIES = [("print(2 + 2)", "4", "4"), ("print(2 + 3)", "5", "5")]


def conversation(code: str, output: str, answer: str) -> list[dict]:
    return [
        *PROMPT,
        {"role": "assistant", "content": "", "tool_calls": [tool_call(code)]},
        {"role": "tool", "content": output},
        {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."},
    ]


def fine_tune(model: torch.nn.Module, tokenizer, tools: list, conversations: list[list[dict]], steps: int) -> None:
    """A few hundred Adam steps on whole conversations: the tiny model learns to reproduce them."""
    batch = [tokenizer.apply_chat_template(c, tools=tools, tokenize=False) for c in conversations]
    enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="right")
    prompt = tokenizer.apply_chat_template(PROMPT, tools=tools, add_generation_prompt=True, tokenize=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, : len(tokenizer(prompt)["input_ids"])] = -100  # learn the responses only
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_tok():
    pytest.importorskip("trl")
    from trl.chat_template_utils import qwen3_schema, qwen3_template

    from sodkern.trainer.demo.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.response_template = qwen3_template  # TRL's parser of Hermes / Qwen3 tool calls (transformers >= 5.13)
    tok.response_schema = qwen3_schema  # the same for older transformers (with jmespath), e.g. a verl env
    return tok


@pytest.fixture(scope="session")
def sandbox():
    from sodkern.trainer.sandbox import LocalSandbox

    box = LocalSandbox(timeout=20, workers=2)
    yield box
    box.close()


@pytest.fixture(scope="session")
def tool_models(tiny_tok, sandbox):
    """State dicts of a student that calls the tool (both trajectories) and a teacher (the correct one)."""
    from sodkern.integrations.trl import code_interpreter_tool
    from sodkern.trainer.demo.tiny import tiny_qwen3

    tools = [code_interpreter_tool(sandbox)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = tiny_qwen3(tiny_tok, seed=0)
        fine_tune(student, tiny_tok, tools, [conversation(*t) for t in TRAJECTORIES], steps=80)
        teacher = tiny_qwen3(tiny_tok, seed=1)
        fine_tune(teacher, tiny_tok, tools, [conversation(*TRAJECTORIES[0])], steps=40)
    return student.state_dict(), teacher.state_dict()


@pytest.fixture(scope="session")
def make_models(tiny_tok, tool_models):
    """Fresh (student, teacher) copies of the fine-tuned tiny models."""
    from sodkern.trainer.demo.tiny import tiny_qwen3

    def make():
        student, teacher = tiny_qwen3(tiny_tok, seed=0), tiny_qwen3(tiny_tok, seed=1)
        student.load_state_dict(tool_models[0])
        teacher.load_state_dict(tool_models[1])
        return student, teacher

    return make
