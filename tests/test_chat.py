"""`shoggoth chat`: one-shot and interactive, with the chat template and streaming."""

import subprocess
import sys

import pytest

from common import shoggoth, tiny_model_dir
from shoggoth import sampling


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


def test_chat_imports_no_labeler_code(model_dir):
    """`shoggoth chat` loads the model and the engine only: no simulated labelers, no vaderSentiment."""
    code = ("import sys; from shoggoth.cli import main; "
            f"rc = main(['chat', {str(model_dir)!r}, '--prompt', 'Hello', '--max-new-tokens', '4']); "
            "bad = [m for m in ('shoggoth.labelers', 'vaderSentiment', 'shoggoth.scoring') if m in sys.modules]; "
            "assert rc == 0 and not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
