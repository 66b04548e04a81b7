"""Real checkpoints end to end: each family's own tokenizer, chat template and pad/eos settings.

The directories (hf_families.py) copy SmolLM2's, Qwen2.5's, Qwen3's and Llama 3's
tokenizer settings and chat templates, and a Zephyr-style template, with tiny
random weights. Rendering is held to transformers' apply_chat_template; every
stage runs on each and writes a directory whose template renders as the input's.
"""

import json
import sqlite3

import pytest
import torch
import transformers

import hf_families
from common import shoggoth
from shoggoth.lm import checkpoint, sampling, tokenizer
from shoggoth.data.prompts import load_prompts
from shoggoth.train import rl
from shoggoth.evaluation import scoring
from shoggoth.stages import dpo, grpo, ppo, reward, sft

CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! é 😀"}, {"role": "user", "content": "How are you?"},
     {"role": "assistant", "content": "Fine, thanks. <b>x</b>"}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
]
# What each family's template closes an assistant turn with, and the reply ends generation
# stops at (generation_config.json's eos ids, the tokenizer's eos and that end of turn).
END = {"smollm2": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "plain": "</s>"}
STOPS = {"smollm2": ["<|im_end|>"], "qwen2.5": ["<|endoftext|>", "<|im_end|>"], "qwen3": ["<|endoftext|>", "<|im_end|>"],
         "llama3": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "plain": ["</s>"]}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: hf_families.build(f, root / f) for f in hf_families.FAMILIES}


pytestmark = pytest.mark.usefixtures("one_thread")


def masked_spans(tok, ids, mask):
    """The text of each run of masked tokens."""
    spans, run = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(t)
        elif run:
            spans.append(tok.decode(run, skip_special=False))
            run = []
    return spans


@pytest.mark.parametrize("family", hf_families.FAMILIES)
def test_rendering_is_apply_chat_template(dirs, family):
    tok = tokenizer.load(dirs[family])
    hf = transformers.AutoTokenizer.from_pretrained(dirs[family])
    assert [tok.token(t) for t in tok.stop_ids] == sorted(STOPS[family], key=hf.convert_tokens_to_ids)
    for conv in CONVS:
        ids, mask = tok.render_chat(conv)
        assert ids == hf.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        prompt = tok.render_chat(conv[:-1], add_generation_prompt=True)[0]
        assert prompt == hf.apply_chat_template(conv[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert tok.prompt_ids(conv[:-1]) == prompt
        # The mask covers what a model writes after each turn's generation prompt, through the end of turn.
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        spans = masked_spans(tok, ids, mask)
        assert len(spans) == len(replies)
        for span, reply in zip(spans, replies):
            assert span.endswith(reply + END[family]), (span, reply)
            if family == "qwen3" and reply == replies[-1]:
                assert span == "<think>\n\n</think>\n\n" + reply + END[family]  # what Qwen3 writes without thinking
            else:
                assert span == reply + END[family], (span, reply)
        # The last turn's ids continue the generation prompt: what a policy samples is what SFT trained.
        ids2, mask2 = tok.render_reply(conv[:-1], replies[-1])
        assert ids2[:len(prompt)] == prompt and sum(mask2) == len(ids2) - len(prompt)
    if family == "smollm2":  # BOS is <|im_start|>: no doubled <|im_start|>, and the default system prompt is there
        text = tok.chat_text(CONVS[0][:1], add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert tok.pad_id == tok.eos_id
    if family == "llama3":
        assert prompt[0] == hf.convert_tokens_to_ids("<|begin_of_text|>") and prompt.count(prompt[0]) == 1
        assert not tok.has_pad


def with_template(src, dst, template):
    """A copy of the model directory src whose chat template is `template`."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    (dst / "chat_template.jinja").write_text(template)
    return dst


# DeepSeek-R1's shape: the generation prompt opens a think block the rendered turn does not have.
R1_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>{{ m['content'] }}{% else %}"
           "<|im_end|>{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|im_end|><think>\n{% endif %}")
# No stop token between turns: the end of text closes the conversation only.
PLAIN_TURNS = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{{ eos_token }}"
# Markers around the content only: the end of turn is outside them.
MARKED_CONTENT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                  "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_masks_of_unusual_templates(dirs, tmp_path):
    conv = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Yes or no?"}, {"role": "assistant", "content": "Yes"}]
    r1 = tokenizer.load(with_template(dirs["smollm2"], tmp_path / "r1", R1_LIKE))
    # The reply "Hello" also starts the user's message: the mask holds the reply, not the user's text.
    assert masked_spans(r1, *r1.render_chat(conv)) == ["Hello<|endoftext|>", "Yes<|endoftext|>"]
    plain = tokenizer.load(with_template(dirs["smollm2"], tmp_path / "plain", PLAIN_TURNS))
    # Without a stop token after a turn, a turn ends with its content (the token holding " Hello").
    assert [s.strip() for s in masked_spans(plain, *plain.render_chat(conv))] == ["Hello", "Yes\n<|im_end|>"]
    marked = tokenizer.load(with_template(dirs["smollm2"], tmp_path / "marked", MARKED_CONTENT))
    assert marked.markers
    # The stop token after the marked content is trained too: a policy must learn to stop.
    assert masked_spans(marked, *marked.render_chat(conv)) == ["Hello<|im_end|>", "Yes<|im_end|>"]
    ids, mask = marked.render_reply(conv[:3], "Yes")
    assert masked_spans(marked, ids, mask) == ["Yes<|im_end|>"] and mask[-1] == 1


def test_markers_mask_is_transformers(dirs, tmp_path):
    """A template with {% generation %} markers: the mask is return_assistant_tokens_mask, and it agrees
    with the mask derived from the template without them."""
    d = tmp_path / "marked"
    d.mkdir()
    src = dirs["smollm2"]
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert turn in hf_families.SMOLLM2_TEMPLATE
    marked_turn = ("{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
                   "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
                   "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(hf_families.SMOLLM2_TEMPLATE.replace(turn, marked_turn))
    plain = tokenizer.load(src)
    marked = tokenizer.load(d)
    assert marked.markers and not plain.markers
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for conv in CONVS:
        out = hf.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
        assert marked.render_chat(conv) == (out["input_ids"], out["assistant_masks"])
        assert plain.render_chat(conv) == (out["input_ids"], out["assistant_masks"])


def test_template_that_cannot_render_is_one_clear_error(tmp_path):
    d = hf_families.build_strict(tmp_path / "strict")
    convs = tmp_path / "c.jsonl"
    convs.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "x"}, *c]}) + "\n" for c in CONVS[:2]))
    out = tmp_path / "out"
    r = shoggoth("sft", "--init", d, "--data", convs, "--out", out, "--max-steps", 1, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(d) in r.stderr and "System role not supported" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_chat_and_sample_on_real_families(dirs):
    for family in ("smollm2", "llama3"):
        r = shoggoth("chat", dirs[family], "--prompt", "What is the capital of France?", "--max-new-tokens", 8,
                     "--seed", 0)
        assert r.stdout.strip(), r.stdout
        r = shoggoth("sample", dirs[family], "--prompt", "The capital", "--max-new-tokens", 8)
        assert r.stdout.startswith("The capital")
    # A pad that is the eos (SmolLM2) ends replies by their lengths, not at the first pad.
    model, tok = sampling.load(dirs["smollm2"])
    assert tok.pad_id in tok.stop_ids
    replies = sampling.chat_replies((model, tok), [CONVS[0][:1]] * 3, max_new_tokens=6, seed=0)
    assert len(replies) == 3


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def same_text_files(a, b):
    names = [n for n in checkpoint.TOKENIZER_FILES if (a / n).exists()]
    assert names and all((a / n).read_bytes() == (b / n).read_bytes() for n in names), names
    hf_a, hf_b = transformers.AutoTokenizer.from_pretrained(a), transformers.AutoTokenizer.from_pretrained(b)
    for conv in CONVS:
        assert hf_a.apply_chat_template(conv, tokenize=False) == hf_b.apply_chat_template(conv, tokenize=False)


@pytest.mark.slow
@pytest.mark.parametrize("family", hf_families.FAMILIES)
def test_every_stage_runs_and_keeps_the_template(dirs, family, tmp_path):
    src = dirs[family]
    words = "alpha beta gamma delta light water stone river".split()
    convs = [[{"role": "user", "content": f"Tell me about {w}."},
              {"role": "assistant", "content": f"The {w} is {v}."}] for w in words for v in words[:4]]
    data_path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in convs])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {w}.", "references": [f"The {w}."]}
                                                       for w in words])
    ranks = write_jsonl(tmp_path / "rankings.jsonl", [
        {"prompt": f"Tell me about {w}.", "completions": [f"The {w} is good.", "No.", f"{w} {w}"], "ranks": [0, 2, 1]}
        for w in words] * 2)
    common = dict(dtype="fp32", device="cpu")
    sft_out = sft.run(sft.Config(init=str(src), data=str(data_path), out=str(tmp_path / "sft"), max_steps=2,
                                 batch_size=4, sample_every=1, eval_every=2, **common))
    rm_out = reward.run(reward.Config(init=str(sft_out), rankings=str(ranks), out=str(tmp_path / "rm"), max_steps=2,
                                      batch_size=4, normalize_samples=4, normalize_max_new_tokens=8, **common))
    rl_common = dict(prompts=str(prompts), eval_prompts=str(prompts), max_new_tokens=8, eval_samples=4,
                     batch_size=4, minibatch_size=4, iterations=1, eval_every=1, **common)
    ppo_out = ppo.run(ppo.Config(policy=str(sft_out), reward=str(rm_out), out=str(tmp_path / "ppo"), ppo_epochs=1,
                                 **rl_common))
    grpo_out = grpo.run(grpo.Config(policy=str(sft_out), reward=str(rm_out), out=str(tmp_path / "grpo"), group_size=2,
                                    **rl_common))
    dpo_out = dpo.run(dpo.Config(policy=str(sft_out), rankings=str(ranks), out=str(tmp_path / "dpo"), max_steps=2,
                                 batch_size=4, **common))
    for out in (sft_out, rm_out, ppo_out, grpo_out, dpo_out):
        same_text_files(src, out)
    for out in (sft_out, ppo_out, grpo_out, dpo_out):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    # The reward model scores as transformers' sequence classification does, padded batches included.
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(rm_out).eval()
    tok = tokenizer.load(rm_out)
    rows = [tok.render_reply(CONVS[0][:1], c)[0] for c in ("Paris.", "It is Paris, of course.")]
    ours = scoring.score_texts(str(rm_out), CONVS[0][:1], ["Paris.", "It is Paris, of course."], raw=True)
    pad = hf_rm.config.pad_token_id
    if pad is not None:
        assert pad not in tok.stop_ids
        T = max(map(len, rows))
        batch = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        with torch.no_grad():
            theirs = hf_rm(batch).logits[:, 0].tolist()
        assert theirs == pytest.approx(ours, abs=1e-4)
    # feedback generate samples from the same template, stopping at the family's reply ends.
    db = tmp_path / "fb.db"
    shoggoth("feedback", "generate", "--policy", sft_out, "--prompts", prompts, "-k", 2, "--db", db,
             "--max-new-tokens", 6)
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from tasks").fetchone()[0] == len(words)
    # The prompts PPO optimised are those transformers would render.
    recs = load_prompts(str(prompts), log=lambda *a: None)
    hf = transformers.AutoTokenizer.from_pretrained(src)
    assert rl.encode_prompts(tok, recs[:1], 1000)[0] == hf.apply_chat_template(
        recs[0]["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]


def test_outputs_replace_stale_text_files_and_keep_eos_lists(dirs, tmp_path):
    """An output directory that already holds another template (an earlier run's) gets the input's
    files only; a directory saved in place keeps its eos list and generation settings."""
    src, out = dirs["llama3"], tmp_path / "out"
    out.mkdir()
    (out / "chat_template.jinja").write_text(hf_families.SMOLLM2_TEMPLATE)  # would win over tokenizer_config's
    model = checkpoint.load_pretrained(src)
    checkpoint.save_pretrained(model, out, tokenizer_dir=src)
    assert not (out / "chat_template.jinja").exists()
    same_text_files(src, out)
    gen = json.loads((src / "generation_config.json").read_text())
    assert isinstance(gen["eos_token_id"], list)
    checkpoint.save_pretrained(model, out, tokenizer_dir=out)  # in place, as `pretrain --init X --out X`
    assert json.loads((out / "generation_config.json").read_text()) == gen
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == json.loads((src / "config.json").read_text())["eos_token_id"]
