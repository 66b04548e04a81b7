"""Byte-level BPE with Hugging Face `tokenizers`: train, save, load.

Saved as `tokenizer.json` + `tokenizer_config.json`, which
`transformers.AutoTokenizer.from_pretrained(dir)` loads offline.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import ModelDirError

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
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(f"{d}: no such model directory")
    if not (d / "tokenizer.json").exists():
        raise ModelDirError(f"{d}: no tokenizer.json")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    special = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        v = cfg.get(key)
        special[key] = v["content"] if isinstance(v, dict) else v
    return Tok(Tokenizer.from_file(str(d / "tokenizer.json")), special)


class Tok:
    """The tokenizer and its special-token ids; plain lists of ints in and out."""

    def __init__(self, tok: Tokenizer, special: dict):
        self.tok, self.special = tok, special
        self.bos_id = self._id(special.get("bos_token"))
        self.eos_id = self._id(special.get("eos_token"))
        pad = self._id(special.get("pad_token"))
        self.pad_id = pad if pad is not None else self.eos_id

    def _id(self, token):
        return None if token is None else self.tok.token_to_id(token)

    def __len__(self):
        return self.tok.get_vocab_size()

    def token_id(self, token):
        return self.tok.token_to_id(token)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages, add_generation_prompt=False):
        """Token ids of a conversation in the chat template, and the loss mask:
        1 on each assistant turn's text and its <|im_end|>, 0 elsewhere.
        Same ids and mask as transformers' apply_chat_template with
        return_assistant_tokens_mask=True (a test holds us to it)."""
        for token in (IM_START, IM_END):
            if self.token_id(token) is None:
                raise ModelDirError(f"tokenizer has no {token} token, which the chat template needs")
        bos = self.special.get("bos_token") or ""
        text, spans = bos, []
        for m in messages:
            text += f"{IM_START}{m['role']}\n"
            start = len(text)
            text += m["content"] + IM_END
            if m["role"] == "assistant":
                spans.append((start, len(text)))
            text += "\n"
        if add_generation_prompt:
            text += f"{IM_START}assistant\n"
        enc = self.tok.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        for start, end in spans:  # tokens from the one holding `start` to the one holding `end - 1`
            first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
            for i in range(first, last + 1):
                mask[i] = 1
        return enc.ids, mask

    def check_model(self, vocab_size, where):
        """A tokenizer whose ids do not all fit the model's embedding is an error."""
        if len(self) > vocab_size:
            raise ModelDirError(f"{where}: tokenizer has {len(self)} tokens but the model's vocab_size is {vocab_size}")
