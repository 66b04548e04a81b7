"""Prompts: what PPO, GRPO and `feedback generate` sample replies to, as records {"messages",
"references", "where"}: read from {"prompt"} or {"messages"} rows, or the built-in
chatterbot-corpus questions with all the corpus's answers as references (what the simulated
labelers' gold reward compares against)."""

from ..errors import DataError
from .conversations import chatterbot_conversations, messages
from .rows import read_records


def prompt_record(obj, where):
    """A prompts JSONL record -> {"messages", "references", "where"}: what PPO, GRPO and
    `feedback generate` sample replies to, with the same context.

    `{"prompt": "text"}`, `{"prompt": [messages]}` or `{"messages": [...]}`, with optional
    `"references": [answers]` (what the simulated labelers' gold reward compares against).
    Trailing assistant turns of `messages` are dropped from the prompt and, when there
    are no references, become them."""
    msgs = obj.get("prompt", obj.get("messages"))
    if not isinstance(msgs, (str, list)):
        raise DataError(f"{where}: expected a string 'prompt' or a list 'messages' (or 'prompt' as a list of messages)")
    msgs = messages([{"role": "user", "content": msgs}] if isinstance(msgs, str) else msgs, where)
    refs = obj.get("references")
    if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
        raise DataError(f"{where}: 'references' must be a list of strings")
    answers = []
    while msgs and msgs[-1]["role"] == "assistant":
        answers.insert(0, msgs.pop()["content"])
    if not any(m["role"] == "user" for m in msgs):
        raise DataError(f"{where}: 'messages' has no user message to answer")
    return {"messages": msgs, "references": refs if refs is not None else answers[:1], "where": where}


def prompt_text(record):
    """A prompt record's last user message: what the gold reward's relevance reads, and the
    text a ranking task of the feedback app shows."""
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")


def builtin_prompts(split):
    """The chatterbot-corpus opening questions of a split ("train" or "heldout"), each with
    all the corpus's answers to it as references."""
    refs = {}
    for conv in chatterbot_conversations(split):
        refs.setdefault(conv[0]["content"], []).append(conv[1]["content"])
    return [{"messages": [{"role": "user", "content": q}], "references": r, "where": f"chatterbot-corpus {split}"}
            for q, r in refs.items()]


def load_prompts(path, skip_invalid=False, log=print, split="train"):
    """Prompt records of a JSONL file, or of the built-in chatterbot-corpus split when path is empty."""
    if not path:
        recs = builtin_prompts(split)
        log(f"data: built-in chatterbot-corpus {split} questions: {len(recs)} prompts with reference answers")
        return recs
    return read_records(path, prompt_record, "prompts", skip_invalid, log)

