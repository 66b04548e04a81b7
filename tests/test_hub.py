"""Hugging Face hub ids wherever a model directory is taken, resolved offline against a cache laid
out as huggingface_hub lays it out: models--org--name/ with blobs/ (the files, named by hash),
snapshots/<commit>/ (symlinks to the blobs), refs/main (the commit) and trees/<commit>.json (the
repository's file list, which newer huggingface_hub writes). No hub is reachable here."""

import hashlib
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from common import shoggoth, tiny_model_dir
from shoggoth.lm import checkpoint
from shoggoth import config
from shoggoth.lm.model import RewardModel

REV = "0123456789abcdef0123456789abcdef01234567"
RM_REV = "89abcdef0123456789abcdef0123456789abcdef"  # org/rm's main: REV is not a commit of it
OFFLINE = "is not a local directory and is not in the Hugging Face cache"


def cache_repo(cache, repo_id, model_dir, rev=REV, refs=("main",), listed=()):
    """model_dir's files put into the hub cache `cache` as a download leaves them; listed: file names
    the repository's tree listing adds (a file the hub has that the cache lacks). Returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    files = {}
    for f in sorted(model_dir.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        files[f.name] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(rev)
    if listed:
        (repo / "trees").mkdir()
        files.update({name: {"size": 1, "blob_id": "0" * 40} for name in listed})
        (repo / "trees" / f"{rev}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return snap


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: local directory}: a tiny language model and a reward model on it."""
    root = tmp_path_factory.mktemp("models")
    lm = tiny_model_dir(root / "lm")
    torch.manual_seed(0)
    checkpoint.save_reward(RewardModel(checkpoint.load_pretrained(lm).config), root / "rm", shift=0.5, tokenizer_dir=lm)
    return {"lm": lm, "rm": root / "rm"}


@pytest.fixture
def hub(models, tmp_path, monkeypatch):
    """A hub cache holding org/name (the language model, main = REV), org/rm (the reward model) and
    org/partial (a snapshot lacking a file the hub lists), with HF_HUB_CACHE and HF_HUB_OFFLINE=1 set
    both in the environment (what a fresh process reads) and in huggingface_hub.constants (which
    this process read when it first imported huggingface_hub; the library reads them from there)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snaps = {"org/name": cache_repo(cache, "org/name", models["lm"]), "org/rm": cache_repo(cache, "org/rm", models["rm"], RM_REV),
             "org/partial": cache_repo(cache, "org/partial", models["lm"], listed=["merges.txt"])}
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snaps


def test_sample_chat_score_and_generate_take_a_hub_id(hub, models, tmp_path):
    lm, rm = str(models["lm"]), str(models["rm"])
    greedy = ("--max-new-tokens", 8, "--temperature", 0)
    want = shoggoth("sample", lm, "--prompt", "And the", *greedy).stdout
    assert shoggoth("sample", "org/name", "--prompt", "And the", *greedy).stdout == want
    assert shoggoth("sample", "org/name", "--revision", REV, "--prompt", "And the", *greedy).stdout == want
    want = shoggoth("chat", lm, "--prompt", "Hello", *greedy).stdout
    assert shoggoth("chat", "org/name", "--prompt", "Hello", *greedy).stdout == want
    r = shoggoth("chat", "org/name", *greedy, input="Hello\n/quit\n")
    assert "chatting with org/name" in r.stdout
    args = ("--prompt", "What is AI?", "--completion", "Thinking machines.")
    assert shoggoth("score", "org/rm", *args).stdout == shoggoth("score", rm, *args).stdout
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    r = shoggoth("feedback", "generate", "--policy", "org/name", "--revision", REV, "--prompts", prompts, "-k", 2,
                 "--db", tmp_path / "f.db", "--max-new-tokens", 4)
    assert "1 tasks of 2 completions" in r.stdout
    r = shoggoth("feedback", "compare", "--models", "a=org/name", f"b={lm}", "--prompts", prompts,
                 "--db", tmp_path / "f.db", "--max-new-tokens", 4)
    assert "one answer from each of 2 models" in r.stdout


def test_every_stage_resolves_its_model_fields_and_the_revision_goes_to_the_first(hub):
    for command, module in config.STAGES.items():
        cls = importlib.import_module(module).Config
        names = [n for n in config.MODELS if hasattr(cls, n)]
        assert names, command
        cfg = config.build(cls, None, command, **{n: "org/name" for n in names})
        assert all(getattr(cfg, n) == str(hub["org/name"]) for n in names), command
        # org/rm has no commit REV: it resolves only if the revision stays with the first field
        cfg = config.build(cls, None, command, revision=REV, **{n: "org/rm" for n in names[1:]}, **{names[0]: "org/name"})
        assert [getattr(cfg, n) for n in names] == [str(hub["org/name"])] + [str(hub["org/rm"])] * (len(names) - 1)
        with pytest.raises(checkpoint.ModelDirError, match=f"model 'org/rm' \\(revision '{REV}'\\) {OFFLINE}"):
            config.build(cls, None, command, revision=REV, **{names[0]: "org/rm"})


def one_line_error(args, status=1):
    r = shoggoth(*args, check=False)
    assert r.returncode == status and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_what_cannot_be_found_is_one_line(hub, models, tmp_path):
    cache = os.environ["HF_HUB_CACHE"]
    assert f"error: model 'org/name' (revision 'v9') {OFFLINE} {cache} (HF_HUB_OFFLINE=1): download it on a " \
           "machine with access, or give a directory" in one_line_error(("sample", "org/name", "--revision", "v9"))
    assert f"error: model 'org/missing' {OFFLINE}" in one_line_error(("sample", "org/missing"))
    assert f"error: model 'nosuch/sft' {OFFLINE}" in one_line_error(("chat", "nosuch/sft"))  # a missing org/name-like path
    assert f"error: model 'org/missing' {OFFLINE}" in one_line_error(("sft", "--init", "org/missing"))
    assert f"error: model 'org/missing' {OFFLINE}" in one_line_error(("ppo", "--policy", "org/name", "--reward",
                                                                      "org/missing"))
    assert "only partly in the Hugging Face cache" in one_line_error(("sample", "org/partial"))
    err = one_line_error(("sample", "org/bad name"))
    assert "error: model 'org/bad name' is not a local directory, nor a valid Hugging Face hub id" in err
    assert "nor a valid Hugging Face hub id" in one_line_error(("score", "a--b", "--prompt", "x", "--completion", "y"))
    # what can only be a path keeps the loader's message
    for path in ("./missing", "missing/a/b", str(tmp_path / "missing"), "~/missing"):
        assert "no such model directory" in one_line_error(("sample", path)), path
    assert "is a local path, and a revision picks a version of a Hugging Face hub id" in \
        one_line_error(("sample", models["lm"], "--revision", "v1"))
    assert "error: --revision v1 needs --init" in one_line_error(("sft", "--revision", "v1"), status=2)


@pytest.mark.slow
def test_sft_from_a_hub_id_at_a_revision(hub, models, tmp_path):
    out = tmp_path / "sft"
    shoggoth("sft", "--init", "org/name", "--revision", REV, "--out", out, "--max-steps", 2, "--sample-every", 0,
             "--batch-size", 4)
    assert checkpoint.load_pretrained(out).config.n_layer == 2
    for name in ("tokenizer.json", "tokenizer_config.json"):  # copied as files, not as links into the cache
        assert not (out / name).is_symlink() and (out / name).read_bytes() == (models["lm"] / name).read_bytes()


@pytest.mark.slow
def test_a_fresh_process_reads_hf_home_and_hf_hub_offline(models, tmp_path):
    """huggingface_hub reads its environment when first imported: a process of its own shows that it does."""
    home = tmp_path / "home"
    cache_repo(home / "hub", "org/name", models["lm"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    greedy = ("--max-new-tokens", "8", "--temperature", "0")
    run = [sys.executable, "-m", "shoggoth", "sample", "org/name", "--prompt", "And the", *greedy]
    r = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == shoggoth("sample", models["lm"], "--prompt", "And the", *greedy).stdout
