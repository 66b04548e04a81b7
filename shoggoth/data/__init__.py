"""Data on disk and the batches the stages train on, in the formats users already have. One
module a subject; callers import from the module that holds what they need (nothing here):

- rows.py: where every reader gets its records (`iter_rows`): JSONL lines, or through the
  `datasets` library (the extra shoggoth[datasets]) Parquet and Arrow files, `save_to_disk`
  folders and hub dataset ids; the column formats it converts (HH transcripts, scored
  completions); `read_records`, the counted reader of every kind of record below;
- corpus.py: pretraining corpora as documents: .txt/.md files and folders, rows with `text`,
  the built-in `builtin:bible` and `builtin:chitchat`;
- shards.py: a corpus tokenized into memory-mapped token shards (`build_shards`) and the
  deterministic random windows pretraining reads from them (`TokenShards`);
- conversations.py: SFT conversations (TRL's conversational and prompt/completion records, the
  built-in chatterbot-corpus split by question): checked, encoded with the loss mask, packed;
- prompts.py: prompts for PPO, GRPO and `feedback generate` (the built-in ones with their
  references);
- rankings.py: rankings (K completions ranked, or TRL pairs): checked, split into train and
  held-out (never a held-out evaluation prompt), encoded and batched for the reward model and DPO;
- files.py: atomic writes and what can only be a local path.

Bad input gets a DataError naming the file (or dataset) and line (or row); every reader counts
what it read and what it skipped. rows.py, corpus.py and files.py import neither numpy nor torch;
the others import torch only inside the functions that make tensors."""
