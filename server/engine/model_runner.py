"""Turns a SchedulerOutput into one forward pass: flattens the batch, runs the model over the paged KV cache,
and samples. It owns the KV cache tensors and the sampler; it never decides what runs (the scheduler does)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from model import distributed
from model.attention_metadata import AttentionMetadata
from model.config import ModelConfig
from server.engine.config import EngineConfig
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.sampler import Sampler, TokenLogprobs, compute_prompt_logprobs
from server.engine.scheduler import ScheduledRequest, SchedulerOutput
from server.engine.worker import TPExecutor, allocate_kv_caches, run_forward

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request id -> logprobs of prompt positions [first, first + len) (each predicts the token at that position)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # Reward models: request id -> the head's values at the last prompt token, for requests whose prompt ended
    rewards: dict[str, list[float]] = field(default_factory=dict)


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block on this rank (which holds num_key_value_heads / tensor-parallel size heads)."""
    element = torch.empty((), dtype=dtype).element_size()
    heads = config.num_key_value_heads // distributed.tp_world_size()
    return 2 * config.num_hidden_layers * block_size * heads * config.head_dim * element


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, engine_config: EngineConfig,
                 num_blocks: int, kv_cache_dtype: torch.dtype, executor: TPExecutor | None = None):
        self.model = model
        self.model_config = model_config
        self.block_size = engine_config.block_size
        self.device = torch.device(engine_config.device)
        self.executor = executor  # ranks 1..N-1 under tensor parallelism, else None
        self.is_reward = model_config.is_reward  # the head gives num_labels values per row, not logits
        # One tensor per layer: [2 (K, V), num_blocks, block_size, this rank's KV heads, head_dim].
        self.kv_caches = allocate_kv_caches(model_config, num_blocks, self.block_size, kv_cache_dtype, self.device)
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        # CUDA graphs would have to capture the collectives too; under TP steps run eagerly (not measured yet).
        # A reward model never decodes, so it has no decode graphs to capture.
        # Only the Triton backend is capturable: the torch references index with boolean masks and call nonzero()
        # (rope_kv_write_ref's `slot_mapping[keep]`, paged_decode_attention_ref's `outside`), each a device-to-host
        # sync that a capturing stream refuses, so capturing them failed the engine's start on a GPU.
        backend = getattr(model, "kernel_backend", engine_config.kernel_backend)
        if backend != "triton" and self.device.type == "cuda" and not engine_config.enforce_eager:
            logger.info("decode steps run eagerly: the %r kernel backend cannot be captured in CUDA graphs", backend)
        if (self.device.type == "cuda" and not engine_config.enforce_eager and executor is None
                and not self.is_reward and backend == "triton"):
            max_blocks = -(-engine_config.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(model, self.kv_caches, engine_config.max_num_seqs, max_blocks,
                                       engine_config.max_model_len, self.device)
            self.graphs.capture_all()

    def free_request(self, request_id: str) -> None:
        self.sampler.free(request_id)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> RunnerOutput:
        input_ids, positions, metadata = self._prepare_inputs(batch.scheduled)
        # Only rows that need logits go through lm_head (a 256k-wide GEMM on the real models).
        sample_rows, prompt_rows, prompt_spans = self._logit_rows(batch.scheduled, self.is_reward)
        rows = sample_rows + prompt_rows
        output = RunnerOutput()
        if self.executor is not None:
            row_ids = torch.tensor(rows, dtype=torch.int64, device=self.device)  # [N]
            with self.executor.guard():
                self.executor.send_step(input_ids, positions, metadata, row_ids)
                logits = run_forward(self.model, self.kv_caches, input_ids, positions, metadata, row_ids)
            if not rows:
                return output
        else:
            if self.graphs is not None and self.graphs.can_run(metadata):
                hidden = self.graphs.run(input_ids, positions, metadata)         # [T, hidden]
            else:
                hidden = self.model(input_ids, positions, self.kv_caches, metadata)  # [T, hidden]
            if not rows:
                return output
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [N, vocab] fp32

        if self.is_reward:  # logits are the head's values [N, num_labels], one row per prompt that ended
            ended = [s.request for s in batch.scheduled if _ends_prompt(s)]
            for request, values in zip(ended, logits.tolist()):
                output.rewards[request.request_id] = values
            return output
        sampled = [s.request for s in batch.scheduled if s.needs_sample]
        if sampled:
            result = self.sampler(logits[: len(sample_rows)], sampled)
            for request, token_id, logprobs in zip(sampled, result.token_ids, result.logprobs):
                output.sampled_token_ids[request.request_id] = token_id
                if logprobs is not None:
                    output.logprobs[request.request_id] = logprobs

        offset = len(sample_rows)
        for request, first, count in prompt_spans:
            targets = request.prompt_token_ids[first: first + count]
            span_logits = logits[offset: offset + count]                        # [count, vocab]
            offset += count
            entries = compute_prompt_logprobs(span_logits, targets, request.sampling_params.prompt_logprobs)
            output.prompt_logprobs[request.request_id] = (first, entries)
        return output

    def _prepare_inputs(self, scheduled: list[ScheduledRequest]):
        token_ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens, block_tables = [], [], []
        for s in scheduled:
            request, start, count = s.request, s.start, s.num_new_tokens
            if count == 1:   # a decode step (this loop runs per request per step: no list per token)
                token_ids.append(request.token_at(start))
                positions.append(start)
            else:
                token_ids.extend(request.token_ids_between(start, start + count))
                positions.extend(range(start, start + count))
            query_lens.append(count)
            seq_lens.append(start + count)
            block_tables.append(request.block_ids)
        metadata = AttentionMetadata.build(query_lens, seq_lens, block_tables, self.block_size, self.device)
        input_ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)   # [T]
        position_ids = torch.tensor(positions, dtype=torch.int64, device=self.device)  # [T]
        return input_ids, position_ids, metadata

    @staticmethod
    def _logit_rows(scheduled: list[ScheduledRequest], reward: bool = False):
        """Rows of the flat batch whose logits are needed: the last row of each sequence that samples (for a
        reward model: whose prompt ends in this step), then the rows whose next-token distribution scores a prompt
        token (prompt logprobs)."""
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        prompt_spans: list[tuple] = []
        row = 0
        for s in scheduled:
            request = s.request
            if _ends_prompt(s) if reward else s.needs_sample:
                sample_rows.append(row + s.num_new_tokens - 1)
            if request.sampling_params.prompt_logprobs is not None:
                # Position p's logits score prompt token p + 1; positions already scored (before a preemption)
                # are skipped.
                first = max(s.start, request.num_prompt_logprobs_done)
                last = min(s.start + s.num_new_tokens, request.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows.extend(range(row + first - s.start, row + last - s.start))
                    prompt_spans.append((request, first + 1, last - first))
            row += s.num_new_tokens
        return sample_rows, prompt_rows, prompt_spans


def _ends_prompt(s: ScheduledRequest) -> bool:
    return s.start + s.num_new_tokens == s.request.num_prompt_tokens
