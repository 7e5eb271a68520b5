"""A native vLLM implementation of GPT-NeoX (Polyglot-Ko, GPT-NeoX-Ko, hubkit's default model).

vLLM 0.32 no longer ships its own GPT-NeoX: it maps ``GPTNeoXForCausalLM`` to its Transformers modeling
backend, which runs transformers' Python modules layer by layer with vLLM attention swapped in. On CPU
that costs most of an engine step for hubkit's small models (profiled: 66% of the engine worker's time in
the model forward). This module is GPT-NeoX written with vLLM's own layers (fused QKV, vLLM's rotary
kernel, paged attention), in the shape of vLLM's GPT-J.

:func:`hubkit.backends.vllm_plugin.register` puts it in vLLM's model registry, in every vLLM process.

Engines started with vLLM's ``kv_sharing_fast_prefill`` (hubkit's ``VLLMBackend(prompt_logprobs=False)``,
which ``hubkit score`` uses for multiple-choice tasks) refuse prompt log-probs, so vLLM reads the hidden
state of one position per request in a prefill step. The last layer then writes every position's key and
value to the cache but runs its output projection and MLP at those positions only.

Weights load from the standard Hugging Face GPT-NeoX checkpoint. The one layout change is the fused
``query_key_value``: transformers interleaves it per head (``[heads, 3, head_size]``), vLLM's
``QKVParallelLinear`` wants ``[3, heads, head_size]`` (and shards each part for tensor parallelism).

This module imports torch and vLLM; only vLLM's model registry imports it. (No ``from __future__ import
annotations``: vLLM's ``support_torch_compile`` reads the forward's real type hints.)
"""

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors


def _rotary_dim_factor(config) -> float:
    # transformers 5 keeps it in rope_parameters; older configs only have rotary_pct
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0)))


class GPTNeoXAttention(nn.Module):
    def __init__(
        self,
        config,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.total_num_heads = config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.head_size = self.hidden_size // self.total_num_heads
        bias = getattr(config, "attention_bias", True)
        tp_size = get_tensor_model_parallel_world_size()
        assert self.total_num_heads % tp_size == 0
        self.num_heads = self.total_num_heads // tp_size

        self.query_key_value = QKVParallelLinear(
            config.hidden_size,
            self.head_size,
            self.total_num_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.query_key_value",
        )
        self.dense = RowParallelLinear(
            config.hidden_size,
            config.hidden_size,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.dense",
        )
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", getattr(config, "rotary_emb_base", 10000))
        rope["partial_rotary_factor"] = _rotary_dim_factor(config)
        self.rotary_emb = get_rope(
            self.head_size,
            max_position=config.max_position_embeddings,
            rope_parameters=rope,
            is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_size,
            self.head_size**-0.5,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(
        self, position_ids: torch.Tensor, hidden_states: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention output at every position, or at ``rows`` only (one output row per index).

        Keys and values of every position reach the KV cache either way (later tokens and the prefix
        cache read them).
        """
        qkv, _ = self.query_key_value(hidden_states)
        q, k, v = qkv.chunk(chunks=3, dim=-1)
        q, k = self.rotary_emb(position_ids, q, k)
        attended = self.attn(q, k, v)
        output, _ = self.dense(attended if rows is None else attended[rows])
        return output


class GPTNeoXMLP(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size,
            config.intermediate_size,
            quant_config=quant_config,
            prefix=f"{prefix}.dense_h_to_4h",
        )
        self.dense_4h_to_h = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            quant_config=quant_config,
            prefix=f"{prefix}.dense_4h_to_h",
        )
        self.act = get_act_fn(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, _ = self.dense_h_to_4h(hidden_states)
        hidden_states, _ = self.dense_4h_to_h(self.act(hidden_states))
        return hidden_states


class GPTNeoXLayer(nn.Module):
    def __init__(
        self,
        config,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, cache_config, quant_config, prefix=f"{prefix}.attention")
        self.mlp = GPTNeoXMLP(config, quant_config, prefix=f"{prefix}.mlp")

    def forward(
        self, position_ids: torch.Tensor, hidden_states: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's output at every position, or at ``rows`` only: past the attention (whose keys and
        values every position needs), the output projection and the MLP run only where read."""
        attn_output = self.attention(position_ids, self.input_layernorm(hidden_states), rows)
        if rows is not None:
            hidden_states = hidden_states[rows]
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x))
            mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
            return mlp_output + attn_output + hidden_states
        # x = x + attn(ln1(x)); x + mlp(ln2(x))
        attn_output = attn_output + hidden_states
        return self.mlp(self.post_attention_layernorm(attn_output)) + attn_output


@support_torch_compile
class GPTNeoXModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: GPTNeoXLayer(config, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.hidden_size
        )
        # vLLM's switch for models that may leave prompt positions' hidden states unfinished: it then
        # refuses prompt_logprobs, so only the last position of each request's tokens is ever read.
        self.skip_unread = bool(vllm_config.cache_config.kv_sharing_fast_prefill) and (
            vllm_config.speculative_config is None  # drafts read several positions per request
        )

    def read_rows(self) -> torch.Tensor | None:
        """The positions whose hidden states vLLM reads this step, when that is not all of them.

        With prompt log-probs refused, vLLM computes logits at the last scheduled token of each
        request only (``query_start_loc[1:] - 1``). None in decode-only steps (every position is read)
        and in vLLM's dummy runs.
        """
        if not self.skip_unread:
            return None
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict):
            return None
        layer = self.layers[self.end_layer - 1].attention.attn.layer_name
        step = metadata.get(layer)
        starts = getattr(step, "query_start_loc", None)
        if starts is None or getattr(step, "max_query_len", 1) <= 1:
            return None
        return (starts[1:] - 1).long()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_in(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
        last = get_pp_group().is_last_rank
        rows = self.read_rows() if last else None
        final = self.end_layer - 1
        for i, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), self.start_layer):
            hidden_states = layer(position_ids, hidden_states, rows if i == final else None)
        if not last:
            return IntermediateTensors({"hidden_states": hidden_states})
        if rows is None:
            return self.final_layer_norm(hidden_states)
        # Prefill steps: the last layer finished only the positions vLLM reads; the others stay zero
        # (vLLM never reads them: it refuses prompt log-probs in this mode).
        full = torch.zeros(
            (position_ids.shape[0], hidden_states.shape[1]),
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        return full.index_copy_(0, rows, self.final_layer_norm(hidden_states))


class GPTNeoXForCausalLM(nn.Module, SupportsPP):
    """GPT-NeoX causal LM for vLLM: the Hugging Face checkpoint's names (``gpt_neox.*``, ``embed_out``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.quant_config = quant_config
        self.gpt_neox = GPTNeoXModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "gpt_neox"))
        self.embed_out = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=quant_config,
            prefix=maybe_prefix(prefix, "embed_out"),
        )
        if getattr(config, "tie_word_embeddings", False):
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.gpt_neox.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.gpt_neox(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.embed_out, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        heads = self.config.num_attention_heads
        head_size = self.config.hidden_size // heads
        tied = getattr(self.config, "tie_word_embeddings", False)
        for name, weight in weights:
            if name.endswith((".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")):
                continue  # buffers of old checkpoints (causal mask, rotary table), not parameters
            if tied and name.startswith("embed_out."):
                continue
            if name not in params or is_pp_missing_parameter(name, self):
                continue
            param = params[name]
            if ".query_key_value." in name:
                # [heads * 3 * head_size, ...] (per head: q, k, v) -> q, k, v of [heads * head_size, ...]
                per_head = weight.view(heads, 3, head_size, *weight.shape[1:])
                for index, shard in enumerate(("q", "k", "v")):
                    part = per_head[:, index].reshape(heads * head_size, *weight.shape[1:])
                    param.weight_loader(param, part, shard)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, weight)
            loaded.add(name)
        return loaded
