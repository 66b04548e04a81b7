"""`shoggoth chat`: one-shot and interactive, with the chat template and streaming."""

import subprocess
import sys

import pytest

from common import shoggoth, tiny_model_dir
from shoggoth.lm import sampling


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("chat") / "m")


def test_stream_matches_batched_reply(model_dir):
    model = sampling.load(model_dir)
    conv = [{"role": "user", "content": "And God said"}]
    kw = dict(max_new_tokens=20, temperature=1.0, seed=3)
    streamed = "".join(sampling.chat_stream(model, conv, **kw))
    assert streamed and streamed == sampling.chat_reply(model, conv, **kw)


def test_chat_once_and_interactive(model_dir):
    model = sampling.load(model_dir)
    want = sampling.chat_reply(model, [{"role": "user", "content": "Hello"}], max_new_tokens=12, temperature=0.0)
    r = shoggoth("chat", model_dir, "--prompt", "Hello", "--max-new-tokens", 12, "--temperature", 0)
    assert r.stdout.strip() == want
    r = shoggoth("chat", model_dir, "--max-new-tokens", 12, "--temperature", 0, input="Hello\n/reset\nHello\n/quit\n")
    lines = r.stdout.splitlines()
    assert "(history cleared)" in r.stdout
    answers = [ln.split("assistant> ", 1)[1] for ln in lines if "assistant> " in ln]
    # After /reset the same question gets the same (greedy) answer as the first time.
    assert len(answers) == 2 and answers[0].strip() == answers[1].strip() == want


def test_a_turn_that_outgrows_the_context_is_refused_and_the_chat_goes_on(model_dir):
    model = sampling.load(model_dir)
    want = sampling.chat_reply(model, [{"role": "user", "content": "Hello"}], max_new_tokens=8, temperature=0.0)
    long = "and the lord said " * (model[0].config.max_seq_len // 2)
    r = shoggoth("chat", model_dir, "--max-new-tokens", 8, "--temperature", 0, input=f"{long}\nHello\n/quit\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "does not fit the model's context window" in r.stdout
    # the refused turn left no trace in the history: the next question is answered as the first
    assert r.stdout.split("assistant> ")[-1].splitlines()[0].strip() == want


@pytest.mark.slow
def test_chat_imports_no_labeler_code(model_dir):
    """`shoggoth chat` loads the model and the engine only: no simulated labelers, no vaderSentiment."""
    code = ("import sys; from shoggoth.cli import main; "
            f"rc = main(['chat', {str(model_dir)!r}, '--prompt', 'Hello', '--max-new-tokens', '4']); "
            "bad = [m for m in ('shoggoth.evaluation.simulated', 'vaderSentiment', 'shoggoth.evaluation.scoring') if m in sys.modules]; "
            "assert rc == 0 and not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
