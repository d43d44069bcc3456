"""``model.generate`` of a decode-patched model: greedy decoding through the fast path.

The wrapper accepts the arguments a greedy ``generate()`` call uses (ids, an all-ones
attention mask, lengths, eos / pad ids, a ``GenerationConfig``) and refuses everything else
with an error naming the argument: a request the fast path cannot honour (sampling, beams,
logits processors of its own, left padding) is never run silently on another path. Logits
processors the caller passes (``logits_processor=``) run on every step's scores, as in
transformers; ``min_new_tokens`` masks the eos ids; ``return_dict_in_generate`` gives
``sequences`` only.
"""

from __future__ import annotations

import copy
import functools

import torch

# GenerationConfig fields that change greedy decoding's result (logits processors, stopping).
_MUST_BE_DEFAULT = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length",
                    "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
                    "sequence_bias", "exponential_decay_length_penalty", "encoder_repetition_penalty",
                    "renormalize_logits", "stop_strings", "max_time", "guidance_scale", "num_return_sequences",
                    "output_scores", "output_logits", "output_attentions",
                    "output_hidden_states", "prompt_lookup_num_tokens", "assistant_model")
_ONE_IS_OFF = ("repetition_penalty", "encoder_repetition_penalty", "num_return_sequences", "guidance_scale")
_IGNORED = ("use_cache", "cache_implementation")  # the fast path always uses its own static cache


class FastGenerate:
    """Replaces ``model.generate`` on the instance while decode-patched (``runner``: ``FastRunner``)."""

    def __init__(self, model, runner, generate):
        self.model = model
        self.runner = runner
        self.generate = generate  # the bound original, restored by unpatch()
        functools.update_wrapper(self, generate, assigned=("__module__", "__name__", "__qualname__", "__doc__"),
                                 updated=())

    def __deepcopy__(self, memo):
        raise TypeError("effllm: a model patched with decode=... cannot be copied or pickled (its compiled step "
                        "is bound to this instance); call handle.unpatch() first and patch the copy")

    def __reduce_ex__(self, protocol):
        self.__deepcopy__(None)

    def __call__(self, inputs=None, generation_config=None, **kwargs):
        ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        if inputs is not None and "input_ids" in kwargs:
            raise ValueError("generate(): pass the prompt once (inputs or input_ids)")
        processors = kwargs.pop("logits_processor", None) or None
        ids, gc, max_new, eos, pad = _plan(self.model, self.runner.decoder.window, ids, generation_config, kwargs)
        sequences = self.runner.generate(ids, max_new, eos, pad, min_new_tokens=gc.min_new_tokens or 0,
                                         processors=processors)
        if gc.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences


def _plan(model, window, ids, generation_config, kwargs):
    where = "generate() of a model patched with decode=..."
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) \
            or ids.shape[1] == 0:
        raise ValueError(f"{where}: input_ids must be a (batch, seq>0) integer tensor, got {_describe(ids)}")
    if ids.device != model.device:
        raise ValueError(f"{where}: input_ids must be on {model.device}, got {ids.device}")
    mask = kwargs.pop("attention_mask", None)
    if mask is not None and (tuple(mask.shape) != tuple(ids.shape) or not bool((mask == 1).all())):
        raise ValueError(f"{where}: attention_mask must be all ones with input_ids' shape {tuple(ids.shape)} "
                         "(padded batches are not supported by the fast path; unpatch, or generate row by row)")
    for name in _IGNORED:
        kwargs.pop(name, None)
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unused = gc.update(**kwargs)
    if unused:
        raise ValueError(f"{where}: arguments the fast path does not support: {sorted(unused)} (it runs greedy "
                         "decoding of input_ids; unpatch to use the rest of generate())")
    if gc.do_sample or (gc.num_beams or 1) != 1 or (gc.num_beam_groups or 1) != 1 \
            or getattr(gc, "penalty_alpha", None) is not None:
        raise ValueError(f"{where}: only greedy decoding is supported (do_sample=False, num_beams=1), got "
                         f"do_sample={gc.do_sample}, num_beams={gc.num_beams}")
    for name in _MUST_BE_DEFAULT:
        value = getattr(gc, name, None)
        if not (not value or (name in _ONE_IS_OFF and value == 1)):
            raise ValueError(f"{where}: {name}={getattr(gc, name)!r} is not supported by the fast path "
                             f"(greedy decoding without logits processors); unpatch to use it")
    if gc.max_new_tokens is not None:
        max_new = gc.max_new_tokens
    else:
        max_new = (gc.max_length if gc.max_length is not None else 20) - ids.shape[1]
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"{where}: max_new_tokens must be an int >= 0 (or max_length >= the prompt), got {max_new}")
    limit = model.config.max_position_embeddings
    total = ids.shape[1] + max_new
    if total > limit:
        raise ValueError(f"{where}: prompt + max_new_tokens = {total} exceeds max_position_embeddings={limit}")
    if window is not None and total > window:
        raise ValueError(f"{where}: prompt + max_new_tokens = {total} exceeds the model's sliding window {window}; "
                         "sliding-window attention is not yet supported by the fast path")
    eos = gc.eos_token_id
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
    return ids.long(), gc, max_new, set(eos), pad


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return repr(type(x).__name__)
