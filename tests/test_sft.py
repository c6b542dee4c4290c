"""trainer/sft.py: SFT rendering trains the assistant turns only."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = REPO / "tests" / "fixtures" / "sft.jsonl"


def test_sft_rendering_masks_assistant_turns_only(tiny_path):
    from transformers import AutoTokenizer

    from sodkern.trainer.rollout.chat import ChatFormat
    from sodkern.trainer.sft import render_sft
    from sodkern.trainer.tasks.data import load_sft

    tok = AutoTokenizer.from_pretrained(tiny_path)
    chat = ChatFormat(tok)
    ex = load_sft(SFT_DATA)[0]
    ids, mask = render_sft(ex, tok, turn_end_ids=chat.stop_token_ids, max_length=4096)
    full = tok.apply_chat_template(ex.messages, tools=ex.tools, tokenize=False)
    assert tok.decode(ids) == full
    trained = tok.decode(ids[mask])
    assert "Let me compute it." in trained and "So the answer is \\boxed{1048576}." in trained
    assert "What is 2**20?" not in trained and "1048576\n</tool_response>" not in trained
    assert "code_interpreter" in trained  # the tool call is the model's own output
    assert int((ids[mask] == tok.convert_tokens_to_ids("<tool_call>")).sum()) == 1
