"""Inputs of the SFT benchmark (shoggoth vs TRL's SFTTrainer): a model directory and a JSONL of chats.

make_model_dir(path) writes a Hugging Face directory with SmolLM2-135M's shape
(LlamaForCausalLM: vocab 49152, hidden 576, intermediate 1536, 30 layers, 9 heads,
3 kv heads, tied embeddings, 8192 positions, rope_theta 1e5, rms_norm_eps 1e-5) and
RANDOM weights (seeded), in float32, with a tokenizer shaped like SmolLM2-Instruct's:
byte-level BPE, `<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2, bos `<|im_start|>`,
eos and pad `<|im_end|>`, and SmolLM2-Instruct's ChatML chat template with its default
system prompt. No hub is reachable here, so the BPE is trained on text generated
from the word lists below; it learns fewer than 49152 tokens (the text has a few
thousand distinct words), and the model's embedding keeps SmolLM2's 49152 rows
(the ids above the trained vocabulary are never seen, as with any padded vocab).
With shape="qwen2.5-0.5b" or "llama3.2-1b" (for memory benchmarks) the model takes
that checkpoint's public config.json values instead (Qwen2ForCausalLM with its q/k/v
bias, or LlamaForCausalLM with llama3 RoPE scaling; each with its own vocab size),
and keeps the same SmolLM2-like tokenizer and template.

make_data(path, n) writes n conversations {"messages": [user, assistant, ...]},
generated deterministically (seeded) from the same word lists: 1-3 exchanges, most
between 100 and 600 tokens with the chat template applied. The same file is given
to both trainers.

    python bench/sft_data.py --model-dir runs/bench-sft/smollm2-135m --data runs/bench-sft/chats.jsonl --n 5000
    python bench/sft_data.py --model-dir DIR --shape tiny ...   # 2 small layers, same vocab (smoke tests)
"""

import argparse
import json
import random
import statistics
from pathlib import Path

# SmolLM2-135M's config.json, with SmolLM2-135M-Instruct's token ids (bos 1, eos/pad 2).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    hidden_act="silu",
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.041666666666666664,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
SHAPES = {
    "135m": {},
    # Qwen/Qwen2.5-0.5B's config.json (Qwen2: q/k/v bias, tied embeddings), SmolLM2's token ids.
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         initializer_range=0.02),
    # meta-llama/Llama-3.2-1B's config.json (tied embeddings, llama3 RoPE scaling), SmolLM2's token ids.
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                               high_freq_factor=4.0,
                                                               original_max_position_embeddings=8192),
                        rms_norm_eps=1e-5, initializer_range=0.02),
    # For smoke tests only: SmolLM2's vocab and attention layout, 2 narrow layers.
    "tiny": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=3,
                 num_key_value_heads=1),
}

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2 as in SmolLM2
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-135M-Instruct's tokenizer_config.json "chat_template".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ---------------------------------------------------------------- text generator

NOUNS = """garden river engine window kitchen teacher student village market bridge mountain forest
library computer program battery signal network window farmer harvest recipe bread oven city street
train station ticket journey letter message museum painting artist song guitar piano orchestra
planet star telescope ocean island boat harbor storm cloud rain winter summer season lesson
question answer problem solution method theory experiment sample result measure number table
chair door house roof wall floor lamp light shadow mirror camera picture story novel chapter
author reader language word sentence grammar dictionary country border government law court
company market price budget account customer product service contract meeting office manager
worker team project deadline schedule calendar morning evening night animal horse dog cat bird
fish tree flower seed soil water fire stone metal wood glass paper cotton wool coffee tea sugar
salt pepper apple orange lemon potato tomato onion carrot cheese butter milk egg soup salad
doctor patient hospital medicine health exercise muscle heart brain memory habit routine
friend family neighbor child parent festival holiday gift game match player coach score field
road bicycle car engine wheel bridge tunnel map compass direction distance speed weight height
""".split()
VERBS = """build carry check choose clean climb collect compare cook cover create cross describe
design develop discover explain follow gather grow guide help improve include join keep learn
measure move notice open organize paint plan plant prepare protect reach read repair replace
return save share show solve start study support teach test touch travel turn use visit wash
watch write answer borrow change count deliver divide fill finish fix hold lift mix order pack
print push record reduce remove search send serve sort store train wrap""".split()
IRREGULAR_PAST = dict(build="built", choose="chose", grow="grew", keep="kept", hold="held",
                      teach="taught", write="wrote", read="read", send="sent", show="showed")
ADJECTIVES = """small large quiet busy bright dark warm cold fresh simple careful quick slow heavy
light strong gentle modern ancient local distant narrow wide useful common rare clear early late
happy curious patient honest friendly serious expensive cheap clean green blue red yellow golden
silver wooden soft hard smooth rough deep shallow tall short young old new important difficult
easy private public safe dangerous healthy tired hungry careful practical technical natural
""".split()
ADVERBS = """quickly slowly carefully quietly easily often rarely usually always sometimes nearly
almost really simply clearly gently firmly early later together again""".split()
PREPS = "in on near under behind beside across through around between during after before with".split()
NAMES = """Anna Ben Clara David Elena Farid Grace Hugo Ines Jonas Kira Leo Maya Noah Olga Pablo
Rosa Samir Tara Umar Vera Wen Yusuf Zoe""".split()
OPENERS = ["Sure.", "Of course.", "Good question.", "Here is a short answer.", "Let me explain.",
           "That depends on a few things.", "Happy to help.", "In short, yes.", "Not exactly."]
ASKS = ["Can you explain how", "Why does", "Could you tell me whether", "I wonder if",
        "Do you know how", "What happens when", "Is it true that", "Please describe how"]


def _plural(noun):
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun == "child":
        return "children"
    return noun + "s"


def _third(verb):
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _past(verb):
    if verb in IRREGULAR_PAST:
        return IRREGULAR_PAST[verb]
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


def _sentence(r: random.Random):
    """One English-like sentence of roughly 8-20 words."""
    n, n2, n3 = r.choice(NOUNS), r.choice(NOUNS), r.choice(NOUNS)
    a, a2 = r.choice(ADJECTIVES), r.choice(ADJECTIVES)
    v, v2 = r.choice(VERBS), r.choice(VERBS)
    adv, p, name = r.choice(ADVERBS), r.choice(PREPS), r.choice(NAMES)
    num = r.choice([2, 3, 4, 5, 7, 10, 12, 15, 20, 25, 40, 100, 250, 1000, 2024])
    forms = [
        f"The {a} {n} {_third(v)} the {n2} {p} the {n3}.",
        f"{name} {_past(v)} a {a} {n} {p} the {n2} and {_past(v2)} it {adv}.",
        f"If you {v} the {n} {adv}, the {n2} will {v2} {p} the {a} {n3}.",
        f"Many {_plural(n)} {v} {adv} when the {n2} is {a}.",
        f"About {num} {_plural(n)} were {a} {p} the {n2}, so {name} had to {v} them.",
        f"A {a} {n} is more {a2} than a {n2}, because it can {v} the {n3}.",
        f"You should {v} the {n} first, then {v2} the {a} {n2} {adv}.",
        f"In the {a} {n}, every {n2} {_third(v)} a {a2} {n3} {p} the {_plural(r.choice(NOUNS))}.",
        f"It is {a} to {v} a {n} without a {n2}, but {name} {_third(v2)} it {adv}.",
        f"Most {_plural(n)} {p} the {n2} need about {num} minutes to {v}.",
    ]
    return r.choice(forms)


def _question(r: random.Random):
    ask, n, n2 = r.choice(ASKS), r.choice(NOUNS), r.choice(NOUNS)
    v, a, p = r.choice(VERBS), r.choice(ADJECTIVES), r.choice(PREPS)
    verb = v if ask == "Why does" else _third(v)
    body = f"the {a} {n} {verb} {p} the {n2}"
    return f"{ask} {body}?"


def _user_turn(r: random.Random):
    context = " ".join(_sentence(r) for _ in range(r.choice([0, 0, 1, 1, 2, 3])))
    return (context + " " if context else "") + _question(r)


def _assistant_turn(r: random.Random, sentences):
    parts = [r.choice(OPENERS)]
    if sentences >= 6 and r.random() < 0.3:  # sometimes a numbered list
        k = r.randint(3, min(6, sentences - 2))
        parts.append("Here are the main steps:\n" + "\n".join(f"{i}. {_sentence(r)}" for i in range(1, k + 1)))
        sentences -= k
    parts += [_sentence(r) for _ in range(max(1, sentences))]
    return " ".join(parts)


def conversation(r: random.Random):
    """[user, assistant, ...] with 1-3 exchanges; most are 100-600 tokens once rendered."""
    exchanges = r.choices([1, 2, 3], weights=[6, 3, 1])[0]
    # Total assistant sentences (about 13 tokens each) drawn so that lengths spread over 100-600 tokens.
    total = max(exchanges * 2, int(r.lognormvariate(2.75, 0.55)))
    msgs = []
    for i in range(exchanges):
        share = total // exchanges + (1 if i < total % exchanges else 0)
        msgs.append({"role": "user", "content": _user_turn(r)})
        msgs.append({"role": "assistant", "content": _assistant_turn(r, share)})
    return msgs


def conversations(n, seed=0):
    r = random.Random(seed)
    return [conversation(r) for _ in range(n)]


def render(messages):
    """The chat template's output (what the model is trained on), without jinja."""
    out = "" if messages[0]["role"] == "system" else f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
    return out + "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


# ---------------------------------------------------------------- tokenizer, model, data


def train_tokenizer(vocab_tokenizer=49152, n_docs=20000, seed=12345):
    """A SmolLM2-like byte-level BPE trained on generated text; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_tokenizer, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    docs = [render(c) for c in conversations(n_docs, seed)]  # a different seed from make_data's
    tok.train_from_iterator(docs, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=IM_START, eos_token=IM_END, pad_token=IM_END,
                                 unk_token=ENDOFTEXT, model_max_length=8192, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_model_dir(path, vocab_tokenizer=49152, shape="135m", seed=0):
    """Write the model directory (config, random float32 weights, tokenizer); returns its Path.

    vocab_tokenizer: the BPE's target vocabulary (it stops earlier when the text has no
    more pairs to merge); the model's vocab_size stays the shape's (49152 for SmolLM2) whatever it learns.
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(min(vocab_tokenizer, SMOLLM2_135M["vocab_size"]))
    assert len(tok) <= SMOLLM2_135M["vocab_size"]
    tok.save_pretrained(path)

    values = {**SMOLLM2_135M, **SHAPES[shape]}
    arch = {"llama": "Llama", "qwen2": "Qwen2"}[values.pop("arch", "llama")]
    config = getattr(transformers, arch + "Config")(**values)
    torch.manual_seed(seed)
    model = getattr(transformers, arch + "ForCausalLM")(config).float()  # weights from config.initializer_range
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(path)
    return path


def make_data(path, n, seed=0):
    """Write n conversations as JSONL {"messages": [...]}; returns the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for msgs in conversations(n, seed):
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def token_lengths(model_dir, data_path):
    """Tokens per conversation with the chat template applied (as the trainers see them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(data_path) as f:
        chats = [json.loads(line)["messages"] for line in f]
    return [len(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
            for m in chats]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="write the model directory here")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    ap.add_argument("--vocab-tokenizer", type=int, default=49152, help="BPE target vocab (model vocab stays 49152)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="write the JSONL of conversations here")
    ap.add_argument("--n", type=int, default=5000, help="conversations in --data")
    a = ap.parse_args()
    if a.model_dir:
        d = make_model_dir(a.model_dir, a.vocab_tokenizer, a.shape, a.seed)
        from transformers import AutoTokenizer
        print(f"model dir {d}: shape {a.shape}, tokenizer vocab {len(AutoTokenizer.from_pretrained(d))}")
    if a.data:
        p = make_data(a.data, a.n, a.seed)
        print(f"data {p}: {a.n} conversations")
        if a.model_dir:
            lens = sorted(token_lengths(a.model_dir, p))
            q = statistics.quantiles(lens, n=20)
            print(f"tokens per conversation: min {lens[0]} p5 {q[0]:.0f} median {statistics.median(lens):.0f} "
                  f"p95 {q[-1]:.0f} max {lens[-1]} mean {statistics.mean(lens):.1f}; "
                  f"{sum(100 <= x <= 600 for x in lens) / len(lens):.0%} in [100, 600]")


if __name__ == "__main__":
    main()
