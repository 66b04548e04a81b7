"""The language model and everything that runs it: the Llama-family modules (model.py), the
tokenizer, Hugging Face directories in and out (checkpoint.py), LoRA adapters, and sampling: the
KV-cache engine, its CPU (packed.py, kernels.py) and CUDA-graph (graphs.py) decode steps, and text
in, text out (sampling.py). Nothing here trains: the training stages import it."""
