"""Tiny Hugging Face model directories that copy real families' tokenizer settings and chat templates.

`build(family, path)` writes a causal-LM directory with random weights (2 layers, hidden 64) whose
tokenizer files look like the real family's: the same special-token strings (at the same ids where
the family puts them first, after the trained vocabulary where it puts them last), the same
bos/eos/pad/unk settings, the family's real chat template (copied from a public source, named above
each constant), its tokenizer.json post-processor (Llama 3 adds BOS) and its generation_config.json
(eos lists included). The vocabulary itself is a small byte-level BPE trained on generated English,
so nothing is downloaded.

    FAMILIES   smollm2 (SmolLM2-135M-Instruct), qwen2.5 (Qwen2.5-0.5B-Instruct), qwen3 (Qwen3-0.6B),
               llama3 (Llama-3.2-1B-Instruct), plain (TinyLlama-1.1B-Chat-v1.0 template: no ChatML,
               no system default, pad left unset)
    build_strict(path)  (or build("nosystem", path)): the Gemma-2 template, which raises
               'System role not supported' when a system message is given; a Llama architecture so
               that only the template is unusual.

Where the template lives follows how the family ships it: inside tokenizer_config.json
("chat_template") for smollm2, qwen2.5, llama3 and nosystem; as chat_template.jinja (the layout
transformers >= 4.47 writes) for qwen3 and plain. No template has `{% generation %}` markers: none of
the real ones do. Llama 3.2's config keeps its rope_scaling "llama3" (factor 32 over 8,192 positions).
"""

import functools
import json
import random
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

FAMILIES = ("smollm2", "qwen2.5", "qwen3", "llama3", "plain")

# ---------------------------------------------------------------- chat templates (verbatim)

# huggingface/huggingface.js packages/ollama-utils/src/chat-template-automap.ts, entry
# "library/smollm2:135m" (the GGUF's tokenizer.chat_template = HuggingFaceTB/SmolLM2-135M-Instruct's).
# The '\n' here are real newline characters, as in the model's tokenizer_config.json.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# xoloki/jlib tests/jinja_templates.hh, family "qwen2.5" (Qwen/Qwen2.5-0.5B-Instruct, read from the official
# GGUF), with one change: the GGUF writes the tool-call example as `{{\"name\": ...}}` while the model's
# tokenizer_config.json writes `{\"name\": ...}`; we keep the tokenizer_config.json form, as do
# huggingface/trl trl/chat_templates/qwen2_5_training.jinja (the original plus generation markers) and the
# qwen2.5-coder entry of huggingface/huggingface.js packages/ollama-utils/src/chat-template-automap.ts.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# huggingface/trl trl/chat_templates/qwen3.jinja ("Original Qwen3 chat template", the current revision with
# the `content is string` checks; the first release, e.g. ggml-org/llama.cpp
# models/templates/Qwen-Qwen3-0.6B.jinja, differs only in reading message.content directly).
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# ggerganov/llama.cpp models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja; byte-identical to the
# meta-llama/Llama-3.2-1B-Instruct template in xoloki/jlib tests/jinja_templates.hh (family "llama3.2").
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# huggingface/huggingface.js packages/ollama-utils/src/chat-template-automap.ts, entry "library/tinyllama:1.1b"
# (TinyLlama/TinyLlama-1.1B-Chat-v1.0, a Zephyr-style template); the same text as xoloki/jlib
# tests/jinja_templates.hh family "tinyllama". The '\n' are real newlines.
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# ye-NX/llama.cpp models/templates/google-gemma-2-2b-it.jinja (google/gemma-2-2b-it); the same text as
# xoloki/jlib tests/jinja_templates.hh family "gemma2". The '\n' are real newlines.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# ---------------------------------------------------------------- tokenizer pipelines

# The pre-tokenizer regexes of the real tokenizer.json files (the Qwen one is also transformers'
# models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX); Llama 3 groups digits by up to three.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _split_then_bytes(regex):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _gpt2_bytes():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


# ---------------------------------------------------------------- the families

_QWEN_SPECIALS = [  # (content, special), in id order after the vocabulary, as in Qwen2.5's tokenizer.json
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
_QWEN_EXTRA = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
               "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN_CONFIG = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
                "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
                "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": None, "additional_special_tokens": _QWEN_EXTRA}

_LLAMA3_SPECIALS = [(t, True) for t in (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 8)),  # the real one runs to _247
)]

_SMOLLM2_FRONT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                  "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                  "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
                  "<empty_output>"]

SPECS = {
    # HuggingFaceTB/SmolLM2-135M-Instruct: specials first (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2).
    "smollm2": dict(
        arch="llama", pre=_gpt2_bytes, normalizer=None, front=_SMOLLM2_FRONT, back=[], bos_processor=None,
        template=SMOLLM2_TEMPLATE, template_file=False,
        tok_config={"add_prefix_space": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                    "bos_token": "<|im_start|>", "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
                    "model_max_length": 8192, "pad_token": "<|im_end|>", "tokenizer_class": "GPT2Tokenizer",
                    "unk_token": "<|endoftext|>"},
        model=dict(rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>"),
        generation=dict(bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>"),
    ),
    # Qwen/Qwen2.5-0.5B-Instruct: specials after the vocabulary, q/k/v bias, tied embeddings (0.5B only).
    "qwen2.5": dict(
        arch="qwen2", pre=lambda: _split_then_bytes(QWEN_SPLIT), normalizer=normalizers.NFC, front=[],
        back=_QWEN_SPECIALS, bos_processor=None, template=QWEN25_TEMPLATE, template_file=False,
        tok_config=_QWEN_CONFIG,
        model=dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   bos="<|endoftext|>", eos="<|im_end|>", pad=None),
        generation=dict(bos="<|endoftext|>", eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>",
                        do_sample=True, repetition_penalty=1.1, temperature=0.7, top_p=0.8, top_k=20),
    ),
    # Qwen/Qwen3-0.6B: Qwen2.5's tokens plus <tool_response>, </tool_response>, <think>, </think>; q/k norm.
    "qwen3": dict(
        arch="qwen3", pre=lambda: _split_then_bytes(QWEN_SPLIT), normalizer=normalizers.NFC, front=[],
        back=_QWEN_SPECIALS + [("<tool_response>", False), ("</tool_response>", False),
                               ("<think>", False), ("</think>", False)],
        bos_processor=None, template=QWEN3_TEMPLATE, template_file=True,
        tok_config=_QWEN_CONFIG,
        model=dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=32,
                   bos="<|endoftext|>", eos="<|im_end|>", pad=None),
        generation=dict(bos="<|endoftext|>", eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>",
                        do_sample=True, temperature=0.6, top_k=20, top_p=0.95),
    ),
    # meta-llama/Llama-3.2-1B-Instruct: specials after the vocabulary, tokenizer.json adds BOS, no pad token.
    "llama3": dict(
        arch="llama", pre=lambda: _split_then_bytes(LLAMA3_SPLIT), normalizer=None, front=[],
        back=_LLAMA3_SPECIALS, bos_processor="<|begin_of_text|>", template=LLAMA32_TEMPLATE, template_file=False,
        tok_config={"bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True,
                    "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
                    "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"},
        model=dict(rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192), shape=dict(max_position_embeddings=131072), rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   bos="<|begin_of_text|>", eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], pad=None),
        generation=dict(bos="<|begin_of_text|>", eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                        do_sample=True, temperature=0.6, top_p=0.9),
    ),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0's template and <unk>/<s>/</s> at 0/1/2 (the real tokenizer is
    # SentencePiece and sets pad to </s>; here a byte-level BPE, and no pad token, on purpose).
    "plain": dict(
        arch="llama", pre=_gpt2_bytes, normalizer=None, front=["<unk>", "<s>", "</s>"], back=[],
        bos_processor="<s>", template=TINYLLAMA_TEMPLATE, template_file=True,
        tok_config={"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                    "clean_up_tokenization_spaces": False, "eos_token": "</s>", "model_max_length": 2048,
                    "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"},
        model=dict(rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos="<s>", eos="</s>", pad=None),
        generation=dict(bos="<s>", eos="</s>"),
    ),
    # google/gemma-2-2b-it's template and specials (<pad> 0, <eos> 1, <bos> 2, <unk> 3, turn markers after
    # the vocabulary), on a Llama architecture: for tests of a template that refuses system messages.
    "nosystem": dict(
        arch="llama", pre=_gpt2_bytes, normalizer=None, front=["<pad>", "<eos>", "<bos>", "<unk>"],
        back=[("<start_of_turn>", True), ("<end_of_turn>", True)], bos_processor="<bos>",
        template=GEMMA2_TEMPLATE, template_file=False,
        tok_config={"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
                    "clean_up_tokenization_spaces": False, "eos_token": "<eos>", "model_max_length": 8192,
                    "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"},
        model=dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   bos="<bos>", eos=["<eos>", "<end_of_turn>"], pad="<pad>"),
        generation=dict(bos="<bos>", eos=["<eos>", "<end_of_turn>"], pad="<pad>"),
    ),
}

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)
ARCHS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
         "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}

# ---------------------------------------------------------------- training text

_WORDS = """the a an and or but if then so because when while after before of to in on at by for with from
about over under into through between cat dog bird fish horse cow tree river mountain city house road car
train boat book letter story song game school teacher student child friend mother father sister brother
people world water fire light night day morning evening week year time place way thing idea question answer
problem reason number money food bread apple tea coffee rain snow wind sun moon star sky sea green blue red
small big old new good bad happy quick slow warm cold bright dark quiet loud simple long short is are was were
be have has had do does did can will would should could may might must go went come came see saw make made
take took give gave find found think thought know knew say said tell told ask asked help helped work worked
play played read wrote write run ran walk walked like liked want wanted need needed look looked use used
I you he she it we they me him her us them my your his its our their this that these those here there
what which who how why where yes no not very also just only still even again always never often""".split()
_OPENERS = ["Hi there", "Hello", "Thanks", "Sure", "Well", "Please", "Okay", "You are a helpful assistant",
            "The user asked", "The assistant said", "In the morning", "Last year", "Today"]


def _corpus(n_lines=400, seed=0):
    """Deterministic English-like lines: sentences from a fixed word list, some numbers and punctuation."""
    rng = random.Random(seed)
    for i in range(n_lines):
        parts = []
        if i % 5 == 0:
            parts.append(rng.choice(_OPENERS) + rng.choice([",", "!", ".", ":"]))
        for _ in range(rng.randint(1, 3)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
            words[0] = words[0].capitalize()
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
            parts.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!", ";"]))
        yield " ".join(parts) + ("\n" if i % 7 == 0 else "")


# ---------------------------------------------------------------- building


@functools.lru_cache(maxsize=None)
def _tokenizer_json(family):
    """The family's tokenizer.json text (trained once per process; training is deterministic)."""
    s = SPECS[family]
    tok = Tokenizer(models.BPE())
    if s["normalizer"] is not None:
        tok.normalizer = s["normalizer"]()
    tok.pre_tokenizer = s["pre"]()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, min_frequency=2, special_tokens=list(s["front"]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    for content, special in s["back"]:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    byte_level = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    if s["bos_processor"] is not None:
        bos = s["bos_processor"]
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return tok.to_str(pretty=True)


def _added_tokens_decoder(tok):
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def _ids(tok, tokens):
    if tokens is None:
        return None
    if isinstance(tokens, list):
        return [_ids(tok, t) for t in tokens]
    i = tok.token_to_id(tokens)
    assert i is not None, tokens
    return i


def build(family: str, path) -> Path:
    """Write a HF causal-LM directory for `family` into path (created) and return it."""
    if family not in SPECS:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)}, or 'nosystem')")
    s = SPECS[family]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    text = _tokenizer_json(family)
    (out / "tokenizer.json").write_text(text)
    tok = Tokenizer.from_str(text)

    cfg = {"added_tokens_decoder": _added_tokens_decoder(tok), **s["tok_config"]}
    if s["template_file"]:
        (out / "chat_template.jinja").write_text(s["template"])
    else:
        cfg["chat_template"] = s["template"]
    (out / "tokenizer_config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2, ensure_ascii=False) + "\n")
    as_entry = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}  # noqa: E731
    special_map = {k: as_entry(cfg[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k)}
    if cfg.get("additional_special_tokens"):
        special_map["additional_special_tokens"] = cfg["additional_special_tokens"]
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    m = dict(s["model"])
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    config_cls, model_cls = ARCHS[s["arch"]]
    config = config_cls(
        **{**SHAPE, **m.pop("shape", {})}, vocab_size=-(-n_tokens // 64) * 64, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": m.pop("rope_theta"), **m.pop("rope_scaling", {})},
        bos_token_id=_ids(tok, m.pop("bos")), eos_token_id=_ids(tok, m.pop("eos")), pad_token_id=_ids(tok, m.pop("pad")),
        **m)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config).eval()
    model.save_pretrained(out)

    g = dict(s["generation"])
    gen = {k + "_token_id": _ids(tok, g.pop(k)) for k in ("bos", "eos", "pad") if k in g}
    transformers.GenerationConfig(**gen, **g).save_pretrained(out)  # replaces the one save_pretrained wrote
    return out


def build_strict(path) -> Path:
    """A directory whose chat template (Gemma 2's) raises 'System role not supported' on a system message."""
    return build("nosystem", path)
