"""Text in, text out, over the Engine: load a model directory and complete prompts."""

from tqdm import tqdm

from . import checkpoint, tokenizer
from .engine import Engine
from ..errors import DataError


def load(model_dir, device="cpu"):
    """A Hugging Face model directory -> (GPT in eval mode on device, Tok), checked to fit each other."""
    model = checkpoint.load_pretrained(model_dir).eval().to(device)
    tok = tokenizer.load(model_dir)
    tok.check_model(model.config.vocab_size, model_dir)
    return model, tok


def complete(model, prompts, max_new_tokens=100, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop_ids=None):
    """Continuations (new text only) of each prompt string. `model` is a model
    directory or a (model, tok) pair. Each prompt is encoded after BOS (when the
    tokenizer has one), so that an empty prompt starts a fresh document; rows
    stop at end-of-text unless stop_ids names the stop tokens."""
    model, tok = load(model) if not isinstance(model, tuple) else model
    bos = [] if tok.bos_id is None else [tok.bos_id]
    ids = [bos + p for p in tok.encode_batch(list(prompts))]
    if stop_ids is None:
        stop_ids = [] if tok.eos_id is None else [tok.eos_id]
    gen = Engine(model, pad_id=tok.pad_id or 0).generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                                         top_k=top_k, top_p=top_p, stop_ids=stop_ids, seed=seed)
    return tok.decode_rows(gen.tokens, gen.mask)


def fit_prompts(tok, conversations, room):
    """Chat-template token ids of each conversation, ready for the assistant's reply; one longer
    than room keeps its last room tokens (the end is what the reply answers)."""
    if room < 1:
        raise DataError(f"max_new_tokens leaves no room for a prompt in the context window ({room})")
    return [tok.prompt_ids(conv)[-room:] for conv in conversations]


def chat_replies(model, conversations, max_new_tokens=128, temperature=0.7, top_k=0, top_p=1.0, seed=None,
                 batch_size=0, strip=True, progress=False):
    """The assistant's next reply to each conversation (lists of messages): the one way every
    caller samples chat replies (the demo, `feedback generate`, rounds, the reward model's
    normalisation). Rendered with the directory's chat template, a long prompt cut to fit the
    context window with the reply (a reply as long as the window: at its end); a reply ends at one of tok.stop_ids. batch_size rows at a time
    (0: all at once), the batch starting at row b sampled with seed + b, so that models given the same
    prompts and settings are sampled alike; strip: without the reply's surrounding white space."""
    model, tok = load(model) if not isinstance(model, tuple) else model
    room = model.config.max_seq_len - max_new_tokens
    # a reply as long as the context (a tiny model's 64 tokens and a 64-token reply): the prompt keeps its
    # last half, and the reply ends where the window fills
    ids = fit_prompts(tok, conversations, room if room > 0 else model.config.max_seq_len // 2)
    eng, step = Engine(model, pad_id=tok.pad_id), batch_size or max(len(ids), 1)
    texts = []
    for b in tqdm(range(0, len(ids), step), desc="generate", unit="batch", disable=None if progress else True):
        gen = eng.generate(ids[b:b + step], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, stop_ids=tok.stop_ids, seed=None if seed is None else seed + b)
        texts += tok.decode_rows(gen.tokens, gen.mask)
    return [t.strip() for t in texts] if strip else texts


def chat_reply(model, conversation, **kw):
    return chat_replies(model, [conversation], **kw)[0]


def chat_stream(model, conversation, max_new_tokens=128, temperature=0.7, top_k=0, top_p=1.0, seed=None):
    """Yield the reply's text as it is sampled. Decoding the whole reply so far each
    time (not token by token) keeps multi-byte characters split over tokens intact."""
    model, tok = load(model) if not isinstance(model, tuple) else model
    ids = tok.prompt_ids(conversation)
    stops = tok.stop_ids
    reply, shown = [], ""
    for t in Engine(model, pad_id=tok.pad_id).stream(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                                     top_k=top_k, top_p=top_p, stop_ids=stops, seed=seed):
        if t in stops:
            break
        reply.append(t)
        text = tok.decode(reply).lstrip()
        if not text.endswith("\ufffd"):  # wait for the rest of a split character
            yield text[len(shown):]
            shown = text
