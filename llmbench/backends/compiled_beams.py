"""Beam search of the compile backend (llmbench/backends/compiled.py): its loop over the compiled one-token step, the
prompt's pass shared by a prompt's beams, and the cache's rows reordered in place between steps."""

from __future__ import annotations

import functools
import os

import torch
from transformers import StaticCache

from llmbench.backends import cpu_kernels
from llmbench.backends.static_caches import cache_tensors, keeps_every_position, layer_states
from llmbench.timing import StepTimer

TOPK_ROWS_MOST = 64  # the most candidates per row llmbench_cpu.topk_rows keeps (cpu_gemv_beams.h's kMaxTop)


class BeamSearch:
    """Mixed into CompileBackend, whose prepared state (device, details, caches, compiled steps) it uses."""

    @functools.cached_property
    def _beam_ops(self) -> bool:
        """Whether beam search reorders the cache by one C++ call for every cache tensor (cpu; two aten ops per
        tensor, 60 for the default model, took ~1 ms of a 7 ms INT4 beam-4 step) and takes each step's choice by
        one more, llmbench_cpu.beam_choose: each beam's best candidates from the step's logits (topk_rows, which
        takes their log-softmax itself: aten's add and topk over the default model's 4 x 49152 took ~200 us of
        every beam-4 step on 2 cores, the compiled step's log-softmax ~180 us more), each prompt's best of them, the
        scores and the sequences (the dozen tensor ops that did the rest took ~80 us a step). Decided at the first
        beam search, before its steps are compiled (they return logits where it holds), so greedy runs never build
        the kernels for it."""
        use = self.device.type == "cpu" and os.environ.get("LLMBENCH_CPU_KERNELS", "1") != "0" and \
            cpu_kernels.load() is None
        reorder = "llmbench_cpu.reorder_rows, one call per step (where a prompt's beams share its positions: only " \
            "the generated ones where a beam's source holds another step's keys)"
        self.details["beam_cache_reorder"] = reorder if use else "index_select and copy_ per cache tensor"
        self.details["beam_candidates"] = f"llmbench_cpu.beam_choose, one call per step: topk_rows over the " \
            f"logits' log-softmax, then each prompt's best (up to {TOPK_ROWS_MOST} beams; torch.topk for more)" \
            if use else "torch.topk"
        return use

    def _eos_columns(self, vocab: int) -> torch.Tensor | None:
        """float32, -inf for the EOS tokens and 0 elsewhere (zeros with EOS forbidden), for topk_rows (None: no
        EOS)."""
        return self._forbid_eos(torch.zeros(vocab, device=self.device)) if self._eos.numel() else None

    def _prefill_beams(self, input_ids: torch.Tensor, cache: StaticCache,
                       num_beams: int) -> tuple[torch.Tensor, bool]:
        """The prefill of beam search; -> (every beam's first step output (batch x beams rows: logits where
        _beam_ops, else log-probabilities),
        whether the prompt's positions of the cache are the same in each of a prompt's beams).
        A prompt's beams start identical, so where the cache keeps every position, the prompt runs once (batch rows,
        into a cache of the prompt's length) and its keys and values are copied into each of its beams' rows: the
        first token costs 1/num_beams of the work (IPEX's beam search does the same). Otherwise every beam's row
        runs the prompt, as transformers' generate() does."""
        batch, length = input_ids.shape
        positions = self._positions(0, length)
        if not keeps_every_position(cache):
            self.details["beam_prefill"] = "every beam's row (the cache has sliding-window layers)"
            return self._prefill(self._beam_prefill, input_ids.repeat_interleave(num_beams, dim=0), cache,
                                 positions), False
        self.details["beam_prefill"] = "one row per prompt, its keys and values copied into its beams' rows"
        prompt = self._cache_for(batch, length)
        log_probs = self._prefill(self._beam_prefill, input_ids, prompt, positions)
        for index, (keys, values) in enumerate(layer_states(prompt)):
            cache.update(keys.repeat_interleave(num_beams, dim=0), values.repeat_interleave(num_beams, dim=0), index,
                         {"cache_position": positions})
        return log_probs.repeat_interleave(num_beams, dim=0), True

    def _beam_search(self, input_ids: torch.Tensor, max_new_tokens: int, num_beams: int,
                     timer: StepTimer | None) -> torch.Tensor:
        """Beam search as transformers runs it when EOS is forbidden: no beam finishes early, all hypotheses have
        the same length, so the best is the one with the highest summed log-probability."""
        batch, length = input_ids.shape
        rows = batch * num_beams
        normalize = self._beam_ops  # decided before the steps compile: they return logits where it holds
        cache = self._cache_for(rows, length + max_new_tokens)
        positions = self._step_positions(length, max_new_tokens)
        sequences = torch.empty(rows, length + max_new_tokens, dtype=torch.long, device=self.device)
        sequences[:, :length] = input_ids.repeat_interleave(num_beams, dim=0)
        out, shared_prompt = self._prefill_beams(input_ids, cache, num_beams)  # logits where `normalize`
        scores = torch.zeros(batch, num_beams, device=self.device)
        scores[:, 1:] = -1e9  # the beams start identical: expand only the first one
        scores = scores.view(-1)  # per row: its beam's sum of log-probabilities
        row_offset = (torch.arange(batch, device=self.device) * num_beams).unsqueeze(1)
        vocab = out.shape[-1]
        eos = self._eos_columns(vocab) if normalize else None
        beam_offset = (torch.arange(num_beams, device=self.device) * vocab).view(1, -1, 1)
        tensors = cache_tensors(cache)
        # per row and generated position, the row whose step wrote what the row holds there (reorder_rows fills it)
        writers = torch.empty(rows, max_new_tokens, dtype=torch.long) if self._beam_ops and shared_prompt else None
        for i in range(max_new_tokens):
            column = length + i
            if normalize and num_beams <= TOPK_ROWS_MOST:  # the choice below in one call
                source_rows, tokens = torch.ops.llmbench_cpu.beam_choose(out.reshape(rows, vocab), scores,
                                                                         num_beams, eos, sequences, column)
            else:
                # the best num_beams of all beams' candidates are among each beam's best num_beams
                log_probs = self._log_probs(out) if normalize else out
                best, index = (log_probs.view(batch, num_beams, vocab) + scores.view(batch, num_beams, 1)).topk(
                    num_beams, dim=2)
                top, pick = best.view(batch, -1).topk(num_beams, dim=1)
                scores = top.view(-1)
                flat = (index + beam_offset).view(batch, -1).gather(1, pick)
                source_rows = (row_offset + torch.div(flat, vocab, rounding_mode="floor")).view(-1)
                tokens = (flat % vocab).view(-1, 1)
                sequences[:, :column] = sequences[:, :column].index_select(0, source_rows)
                sequences[:, column] = tokens.view(-1)
            if timer is not None:
                timer.step()
            if i == max_new_tokens - 1:
                break
            # In place (the compiled step reads these very tensors); where the prompt's positions are the same in
            # every beam of a prompt (a beam only takes rows of its own prompt), only the generated positions move.
            start, end = (length, length + i) if shared_prompt else (0, -1)  # end -1: every position
            if start == end:
                pass
            elif self._beam_ops:
                torch.ops.llmbench_cpu.reorder_rows(tensors, source_rows, start, end, writers)
            else:
                for tensor in tensors:
                    moving = tensor[:, :, start:end] if shared_prompt else tensor
                    moving.copy_(moving.index_select(0, source_rows))
            out = self._call_step(self._beam_step, tokens, cache, positions[i])
        best = scores.view(batch, num_beams).argmax(dim=1) + row_offset.squeeze(1)
        return sequences.index_select(0, best)
