"""Tokenizers: train and save Shoggoth's byte-level BPE; load any model directory's.

A trained tokenizer is saved as `tokenizer.json` + `tokenizer_config.json` with
Shoggoth's ChatML template, which `transformers.AutoTokenizer` loads offline. A
loaded directory's own tokenizer and chat template are the truth: conversations
render exactly as its `apply_chat_template` does (Tok.render_chat), and replies end
at its generation_config.json eos ids and its template's end-of-turn token.
"""

import json
import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import ModelDirError

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # chat turns: <|im_start|>role\n...<|im_end|>
SPECIALS = [BOS, EOS, PAD, IM_START, IM_END]
ROLES = ("system", "user", "assistant")

# ChatML. {% generation %} marks what an assistant turn contributes to the SFT
# loss (its text and its <|im_end|>), so that transformers'
# apply_chat_template(..., return_assistant_tokens_mask=True) gives our mask.
CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train(docs, vocab_size):
    """A byte-level BPE tokenizer trained on an iterable of strings; specials get ids 0..4."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return Tok(tok, dict(bos_token=BOS, eos_token=EOS, pad_token=PAD))


def save(tok, out_dir, model_max_length=None):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.tok.save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tok.special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    old = out / "tokenizer_config.json"
    if old.exists():  # keep what later stages added (the chat template)
        cfg = {**json.loads(old.read_text()), **cfg}
    old.write_text(json.dumps(cfg, indent=2) + "\n")


def load(model_dir):
    """The tokenizer of a model directory, with its chat template and reply ends.

    Chat rendering goes through transformers' own tokenizer of the directory
    (`AutoTokenizer`), so ids are those of `apply_chat_template`, whatever the
    template; plain text goes through the `tokenizers` backend directly."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(f"{d}: no such model directory")
    if not (d / "tokenizer.json").exists():
        raise ModelDirError(f"{d}: no tokenizer.json")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # malformed tokenizer files: transformers raises many kinds
        raise ModelDirError(f"{d}: transformers cannot load its tokenizer ({type(e).__name__}: {e})") from None
    hf.model_max_length = 2**62  # rows are cut by each stage's own limits; no warning per long conversation
    special = {k: getattr(hf, k) for k in ("bos_token", "eos_token", "pad_token")}
    gen = {}
    if (d / "generation_config.json").exists():
        try:
            gen = json.loads((d / "generation_config.json").read_text())
        except json.JSONDecodeError as e:
            raise ModelDirError(f"{d / 'generation_config.json'}: invalid JSON ({e})") from None
        if not isinstance(gen, dict):
            raise ModelDirError(f"{d / 'generation_config.json'}: expected a JSON object")
    return Tok(Tokenizer.from_file(str(d / "tokenizer.json")), special, hf=hf, where=str(d),
               eos=gen.get("eos_token_id"))


SENTINEL = "Shoggoth-sentinel-reply"  # a probe reply, to find where a template ends an assistant turn


class Tok:
    """The tokenizer and its special-token ids; plain lists of ints in and out.

    pad_id is a filler only: rows end where their lengths say, never where a pad
    id appears, so a tokenizer whose pad is its eos (or that has none) works."""

    def __init__(self, tok: Tokenizer, special: dict, hf=None, where="tokenizer", eos=None):
        self.tok, self.special, self.hf, self.where = tok, special, hf, where
        self.bos_id = self._id(special.get("bos_token"))
        self.eos_id = self._id(special.get("eos_token"))
        pad = self._id(special.get("pad_token"))
        self.pad_id = pad if pad is not None else self.eos_id if self.eos_id is not None else 0
        self.has_pad = pad is not None
        template = getattr(hf, "chat_template", None) if hf is not None else None
        if isinstance(template, dict):  # named templates (tool use, RAG, ...): apply_chat_template's default
            template = template.get("default")
        self.template = template if isinstance(template, str) else None
        self.markers = bool(self.template and re.search(r"\{%-?\s*generation\s*-?%\}", self.template))
        self.end_of_turn = self._end_of_turn() if self.template else None
        # A reply ends at generation_config.json's eos ids (an int or a list), the tokenizer's
        # eos, or the token the template closes an assistant turn with.
        ends = eos if isinstance(eos, list) else [eos]
        self.stop_ids = sorted({t for t in (*ends, self.eos_id, self.end_of_turn)
                                if isinstance(t, int) and self.tok.id_to_token(t) is not None})

    def _id(self, token):
        return None if token is None else self.tok.token_to_id(token)

    def __len__(self):
        return self.tok.get_vocab_size()

    def vocab(self):
        """{token string: id}, added tokens included."""
        return self.tok.get_vocab()

    def token(self, i):
        """The token string of id i (None for an id outside the vocabulary)."""
        return self.tok.id_to_token(i)

    def specials(self):
        """[(id, token string)] of the added special tokens, by id."""
        return [(i, t.content) for i, t in sorted(self.tok.get_added_tokens_decoder().items()) if t.special]

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def decode_rows(self, tokens, mask):
        """Texts of each row's tokens where mask (B, N) is True (the Engine's generated ones), special
        tokens dropped; the batch is copied off its device once, not row by row."""
        return [self.decode([t for t, m in zip(row, keep) if m]) for row, keep in zip(tokens.tolist(), mask.tolist())]

    # ------------------------------------------------------------ chat

    def _render(self, messages, add_generation_prompt=False, **kw):
        """transformers' apply_chat_template on this directory's template, or a one-line error."""
        if self.template is None:
            raise ModelDirError(f"{self.where}: no chat template (chat_template.jinja or tokenizer_config.json's "
                                "chat_template); a base model: use `shoggoth sample`, or add a template")
        try:
            return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)
        except ModelDirError:
            raise
        except Exception as e:  # the template's own raise_exception, or a template bug
            raise ModelDirError(f"{self.where}: its chat template cannot render this conversation: {e}") from None

    def chat_text(self, messages, add_generation_prompt=False):
        return self._render(messages, add_generation_prompt, tokenize=False)

    def _end_of_turn(self):
        """The special token that follows an assistant turn's text in the template (<|im_end|>,
        <|eot_id|>, ...), found by rendering a probe reply; None if there is none."""
        try:
            text = self.chat_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}])
        except ModelDirError:
            return None
        if SENTINEL not in text:
            return None
        special = set(self.hf.all_special_ids) | {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        after = self.hf(text[text.index(SENTINEL) + len(SENTINEL):], add_special_tokens=False)["input_ids"]
        return next((t for t in after if t in special), None)

    def render_chat(self, messages, add_generation_prompt=False):
        """Token ids of a conversation in the directory's chat template, and the loss mask
        (1 on the tokens the assistant writes, 0 elsewhere).

        The ids are apply_chat_template's. Where the template marks assistant text with
        {% generation %} (Shoggoth's own ChatML does), the mask is transformers'
        return_assistant_tokens_mask. Otherwise it comes from the template itself: each
        assistant turn starts where the template's generation prompt for the conversation
        before it ends (the text a model is asked to continue; when that rendering is not
        a prefix of the whole, where the turn's content starts), and ends after the first
        reply-ending token (stop_ids) past its content, so the mask covers what a model
        must write to produce the turn and to stop, and nothing the template adds after."""
        if self.markers:
            out = self._render(messages, add_generation_prompt, return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            for i in range(1, len(ids)):  # a reply ends with its stop token, also where the markers leave it out
                if mask[i - 1] and not mask[i] and ids[i] in self.stop_ids:
                    mask[i] = 1
            return ids, mask
        text = self.chat_text(messages, add_generation_prompt)
        enc = self.hf(text, add_special_tokens=False)
        mask = [0] * len(enc["input_ids"])
        for start, end in self._assistant_spans(messages, text):
            first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
            for i in range(first, last + 1):
                mask[i] = 1
        return list(enc["input_ids"]), mask

    def _prefix(self, messages, text, add_generation_prompt=False):
        """Length of the rendering of messages where it is a prefix of text, else None."""
        if not messages:
            return 0 if not add_generation_prompt else None
        try:
            head = self.chat_text(messages, add_generation_prompt)
        except ModelDirError:  # a template may refuse a conversation cut short
            return None
        return len(head) if text.startswith(head) else None

    def _assistant_spans(self, messages, text):
        """Character spans (start, end) of each assistant turn in text, the rendering of messages.

        Turn i lies between the rendering of messages[:i] and that of messages[:i + 1],
        where those are prefixes of text (else between the previous and the next message's
        content): it starts at the end of the generation prompt, or at its
        content, and ends after the first stop token past its content."""
        stops = [self.tok.id_to_token(t) for t in self.stop_ids]
        spans, at = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            lo = self._prefix(messages[:i], text)
            if lo is None or lo < at:  # after the previous message's content, at least
                before = messages[i - 1]["content"].strip() if i else ""
                p = text.find(before, at) if before else -1
                lo = p + len(before) if p >= 0 else at
            start = self._prefix(messages[:i], text, add_generation_prompt=True)
            start = None if start is None or start < lo else start
            content = m["content"].strip()
            c = text.find(content, lo if start is None else start)
            if c < 0:
                raise ModelDirError(f"{self.where}: its chat template rewrites assistant message {i}, so the loss "
                                    "mask cannot be found; add {% generation %} markers to the template")
            start = c if start is None else start
            end = c + len(content)
            hi = self._prefix(messages[:i + 1], text)
            if hi is None or hi < end:
                after = messages[i + 1]["content"].strip() if i + 1 < len(messages) else ""
                p = text.find(after, end) if after else -1
                hi = p if p >= 0 else len(text)
            found = [(p, s) for s in stops if 0 <= (p := text.find(s, end, hi))]
            if found:
                pos, s = min(found)
                end = pos + len(s)
            if end > start:
                spans.append((start, end))
            at = max(end, lo)
        return spans

    def prompt_ids(self, messages):
        """Token ids a model continues to answer messages: apply_chat_template's with the
        generation prompt (no loss mask to work out, unlike render_chat)."""
        return list(self._render(messages, add_generation_prompt=True, return_dict=True)["input_ids"])

    def render_reply(self, prompt, reply):
        """(ids, mask) of prompt messages answered by reply: ids end with the reply's last
        token (its end of turn), mask is 1 on the reply's tokens only."""
        ids, mask = self.render_chat(prompt + [{"role": "assistant", "content": reply}])
        end = len(mask) - mask[::-1].index(1) if 1 in mask else len(ids)
        start = end
        while start > 0 and mask[start - 1]:  # the last assistant turn only, not earlier ones
            start -= 1
        return ids[:end], [0] * start + [1] * (end - start)

    def same_tokens(self, model_dir):
        """Whether the tokenizer of model_dir has this one's vocabulary: models that must read each
        other's token ids (policy, reference, reward model) need it."""
        return load(model_dir).tok.get_vocab() == self.tok.get_vocab()

    def check_model(self, vocab_size, where):
        """A tokenizer whose ids do not all fit the model's embedding is an error."""
        if len(self) > vocab_size:
            raise ModelDirError(f"{where}: tokenizer has {len(self)} tokens but the model's vocab_size is {vocab_size}")
