"""A real vLLM OpenAI-compatible server on 127.0.0.1 (CPU, tiny Qwen3), started once for the module: the
remote teacher against the in-process teacher, and server-mode rollouts with weights pushed over HTTP."""

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM  # noqa: E402

from sodkern import linear_logprobs  # noqa: E402
from sodkern.trainer.demo.tiny import save_tiny, tiny_qwen3, tiny_tokenizer  # noqa: E402
from sodkern.trainer.rollout.chat import ChatFormat  # noqa: E402
from sodkern.trainer.rollout.loop import RolloutParams, SamplingParams, mask_spans, rollout  # noqa: E402
from sodkern.trainer.rollout.vllm_engine import WORKER_EXTENSION  # noqa: E402
from sodkern.trainer.rollout.vllm_server import RemoteTeacher, VLLMServerEngine  # noqa: E402
from sodkern.trainer.sandbox import CodeInterpreter  # noqa: E402
from sodkern.trainer.tasks.data import Problem  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """``vllm serve`` of the tiny model (dev mode, the sodkern worker extension); yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # python -m ...api_server rather than the `vllm` script, which looks for a "vllm" distribution and so
    # fails under the vllm-cpu package
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"]
    argv += ["--max-num-seqs", "8", "--enforce-eager", "--logprobs-mode", "processed_logprobs"]
    argv += ["--generation-config", "vllm", "--worker-extension-cls", WORKER_EXTENSION]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not become healthy in 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its engine-core process
            proc.wait()


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)


def in_process_teacher(model, seq):
    """The trainer's teacher log-probs: the fused head (``linear_logprobs``) on the HF model's hidden states."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0, :-1]
    return linear_logprobs(hidden, model.lm_head.weight, ids[0, 1:])


def test_remote_teacher_matches_the_in_process_teacher(server, hf):
    tok = tiny_tokenizer()
    chat = ChatFormat(tok)
    prompt = chat.prompt_ids([{"role": "user", "content": "What is 2 + 2?"}])
    sequences = [
        prompt + tok.encode('<tool_call>\n{"name": "code_interpreter"}</tool_call><|im_end|>\n'),
        prompt + tok.encode("The answer is \\boxed{4}.<|im_end|>"),
        tok.encode("x = 3"),
        [5, 6],
    ]
    teacher = RemoteTeacher(server, max_concurrency=2)
    out = teacher.logprobs(sequences)
    assert [len(v) for v in out] == [len(s) for s in sequences]
    for seq, values in zip(sequences, out):
        assert values.dtype == torch.float32 and math.isnan(values[0])
        torch.testing.assert_close(values[1:], in_process_teacher(hf, seq), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"sequences\[1\] has 1024 tokens"):
        teacher.logprobs([[5, 6], [5] * 1024])
    with pytest.raises(ValueError, match="not served"):
        RemoteTeacher(server, model="other")


def test_server_engine_rollouts_and_weight_push(server, hf, model_dir):
    engine = VLLMServerEngine(server)
    tok = tiny_tokenizer()
    prompts = [tok.encode("a b c"), tok.encode("print(1)")]
    stops = list(range(0, len(tok), 16))

    def check(model, out, temperature):
        for p, c in zip(prompts, out):
            assert len(c.token_ids) == len(c.logprobs) >= 1
            assert (c.token_ids[-1] in stops) == (c.finish_reason == "stop")
            with torch.no_grad():
                logits = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1] / temperature
            ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)

    check(hf, engine.generate(prompts, SamplingParams(temperature=0.7, max_tokens=20, stop_token_ids=stops)), 0.7)
    [full] = engine.generate([[5] * 1024], SamplingParams(max_tokens=5))
    assert (full.token_ids, full.finish_reason) == ([], "length")

    new = tiny_qwen3(tok, seed=1)
    try:  # small buckets: one layer's tensors arrive in several requests
        assert engine.update_weights(new.named_parameters(), bucket_bytes=1 << 14) == len(list(new.parameters()))
        check(new, engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=20, stop_token_ids=stops)), 1.0)
        # the multi-turn loop on the server engine: the same trajectory contract
        chat = ChatFormat(tok)
        problems = [Problem("p", "test_math", "math", [{"role": "user", "content": "Hi"}], "4")]
        config = RolloutParams(n=2, max_turns=2, max_response_tokens=40, progress=False)
        for t in rollout(problems, engine, chat, CodeInterpreter(), config):
            assert len(t.response_ids) == len(t.response_mask) == len(t.logprobs) <= 40
            assert t.spans == mask_spans(t.response_mask) and len(t.spans) == t.num_turns >= 1
            mask = torch.tensor(t.response_mask, dtype=torch.bool)
            with torch.no_grad():
                logits = new(torch.tensor([t.prompt_ids + t.response_ids])).logits[0, len(t.prompt_ids) - 1 : -1]
            ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(t.response_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(t.logprobs)[mask], ref[mask], atol=1e-4, rtol=0)
    finally:  # the server's weights back to the checkpoint's, for the other tests
        engine.update_weights(hf.named_parameters())
    check(hf, engine.generate(prompts, SamplingParams(temperature=0.7, max_tokens=20, stop_token_ids=stops)), 0.7)


def test_sod_training_with_a_remote_teacher(server, model_dir, tmp_path):
    """``teacher.server=URL``: the trainer takes the teacher log-probs from the vLLM server (no local teacher)."""
    import json

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "tiny_reward.py").write_text(
        "def reward(problem, response_text, sandbox=None):\n    return 1.0 if len(response_text) % 2 else -1.0\n"
    )
    out = tmp_path / "run"
    args = [
        "--config", str(repo / "configs" / "tiny_rl.yaml"), "algorithm=sod", f"output_dir={out}",
        f"student.path={model_dir}", f"teacher.server={server}", "rollout.reward_fn=tiny_reward:reward",
        f"data.train_files=[{repo / 'tests' / 'fixtures' / 'verl_mixed.jsonl'}]", "train.steps=2",
        "checkpoint.every=0", "checkpoint.export_hf=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("SODKERN_BACKEND", None)
    cmd = [sys.executable, "-m", "sodkern.trainer.cli", "train", *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["skipped"] == 0 for m in metrics)
    # the served teacher is the student's initial model: at step 1 the OPD signal tau - s is ~0, so d ~ 0
    assert metrics[0]["mean_d"] < 1e-3
