"""Generation engine: chunked exact prefill, policy build, and a decode step compiled once.

Flow (DESIGN.md): ids (ragged batch, right-padded to a power-of-two bucket) -> :func:`prefill_pure`
(exact causal attention in chunks of ``prefill_chunk`` tokens, bounded activation memory) -> dense
post-RoPE K/V ``[L, B, Hkv, Tb, D]`` -> ``policy.build`` per layer (device / pinned_host placement) ->
:func:`decode_step_pure` (all layers in one ``lax.scan``, state donated) called once per token.

Compilation: prefill once per (batch, prompt bucket); decode once per (batch, prompt bucket, policy
budget bucket, generation bucket). The number of steps and the prompt lengths inside a bucket never
recompile (tested by counting compilations).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from models.config import ModelConfig
from models.transformer import Params, embed_tokens, logits_from_hidden, run_layers_carry

from . import cache as cache_mod
from .policies import Policy, make_policy
from .policies.base import bucket_size
from .offload import place_on_host
from .sampling import SamplingConfig, sample


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate. ``stop_ids=None`` uses the tokenizer's EOS / end-of-turn ids."""

    max_new_tokens: int = 256
    sampling: SamplingConfig = SamplingConfig()
    stop_strings: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclasses.dataclass
class Generation:
    """One sequence's result: generated ids (stop token excluded), text, why it stopped, timings in seconds."""

    ids: list[int]
    text: str
    stop_reason: str
    prompt_tokens: int
    prefill_s: float = 0.0
    decode_s: float = 0.0


# ----------------------------------------------------------------------------- pure functions
def _prefill_attention(q, kc, vc, q_pos, lengths, start):
    """Chunk queries against the cache with causal + length masks, visiting only the key blocks at or
    before the chunk (block-causal online softmax: the work is the causal half, not the whole buffer).

    q ``[B, C, H, D]``, kc/vc ``[B, Hkv, S, D]`` (S a multiple of C), q_pos ``[B, C]``, ``start`` the
    chunk's first position (traced). Returns ``[B, C, H, D]``.
    """
    B, C, H, D = q.shape
    Hkv = kc.shape[1]
    G = H // Hkv
    qg = q.reshape(B, C, Hkv, G, D).transpose(0, 2, 3, 1, 4).astype(jnp.float32) * (1.0 / float(np.sqrt(D)))

    def body(j, carry):
        m, l, acc = carry
        kb = jax.lax.dynamic_slice_in_dim(kc, j * C, C, axis=2).astype(jnp.float32)
        vb = jax.lax.dynamic_slice_in_dim(vc, j * C, C, axis=2).astype(jnp.float32)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kb)
        kpos = j * C + jnp.arange(C)
        mask = (kpos[None, None, :] <= q_pos[:, :, None]) & (kpos[None, None, :] < lengths[:, None, None])
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bhgqk,bhkd->bhgqd", p, vb)
        return m_new, l, acc

    init = (jnp.full((B, Hkv, G, C), -jnp.inf, jnp.float32), jnp.zeros((B, Hkv, G, C), jnp.float32),
            jnp.zeros((B, Hkv, G, C, D), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, start // C + 1, body, init)
    o = acc / jnp.maximum(l, 1e-30)[..., None]
    return o.transpose(0, 3, 1, 2, 4).reshape(B, C, H, D).astype(q.dtype)


def prefill_pure(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, chunk: int,
                 keep_q: bool = False):
    """Exact causal prefill in chunks. tokens int32 ``[B, Tb]`` (right-padded), lengths int32 ``[B]``.

    Returns (float32 logits ``[B, V]`` of each sequence's last prompt token, :class:`KVCache` with
    post-RoPE k and v ``[L, B, Hkv, Tb, D]``, and post-RoPE queries ``[L, B, H, Tb, D]`` if ``keep_q``).
    """
    B, Tb = tokens.shape
    dt = params["embed"].dtype
    shape = (cfg.num_layers, B, cfg.num_kv_heads, Tb, cfg.head_dim)
    q0 = jnp.zeros((cfg.num_layers, B, cfg.num_heads, Tb, cfg.head_dim), dt) if keep_q else None
    kv0 = cache_mod.KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), q0)

    def chunk_body(carry, c):
        kv, last_h = carry
        start = c * chunk
        toks = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
        pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (B, chunk))

        def attend(st, layer, q, k_pre, k, v, hn):
            z = jnp.zeros((), jnp.int32)
            kc = jax.lax.dynamic_update_slice(st.k, k.transpose(0, 2, 1, 3)[None], (layer, z, z, start, z))
            vc = jax.lax.dynamic_update_slice(st.v, v.transpose(0, 2, 1, 3)[None], (layer, z, z, start, z))
            out = _prefill_attention(q, kc[layer], vc[layer], pos, lengths, start)
            qc = st.q
            if keep_q:
                qc = jax.lax.dynamic_update_slice(st.q, q.transpose(0, 2, 1, 3)[None], (layer, z, z, start, z))
            return out, cache_mod.KVCache(kc, vc, qc)

        x, kv = run_layers_carry(params, cfg, embed_tokens(params, toks), pos, kv, attend)
        idx = lengths - 1 - start
        inside = (idx >= 0) & (idx < chunk)
        h = jnp.take_along_axis(x, jnp.clip(idx, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
        return (kv, jnp.where(inside[:, None], h, last_h)), None

    last0 = jnp.zeros((B, cfg.hidden_size), dt)
    (kv, last_h), _ = jax.lax.scan(chunk_body, (kv0, last0), jnp.arange(Tb // chunk))
    return logits_from_hidden(params, cfg, last_h), kv


def decode_step_pure(params: Params, cfg: ModelConfig, policy: Policy, state, tok: jax.Array, pos: jax.Array):
    """One decode step for all layers. tok int32 ``[B]`` at absolute positions ``pos [B]``.

    Returns (float32 logits ``[B, V]``, new layer-stacked policy state).
    """

    def attend(st, layer, q, k_pre, k, v, hn):
        out, st = policy.decode(cfg, st, layer, q[:, 0], k_pre[:, 0], k[:, 0], v[:, 0], pos, hn[:, 0])
        return out[:, None], st

    x, state = run_layers_carry(params, cfg, embed_tokens(params, tok[:, None]), pos[:, None], state, attend)
    return logits_from_hidden(params, cfg, x[:, 0]), state


def _step_and_sample(params, cfg, policy, state, tok, pos, key, temperature, top_k, top_p):
    logits, state = decode_step_pure(params, cfg, policy, state, tok, pos)
    return sample(logits, key, temperature, top_k, top_p), logits, state


# ----------------------------------------------------------------------------- engine
class Engine:
    """Runs a loaded model with a KV-cache policy. Jitted functions are cached per shape bucket.

    >>> eng = Engine(load_model("smollm2-135m", dtype="float32"), policy="full")
    >>> eng.generate(["What is the capital of Germany?"], GenerationConfig(max_new_tokens=32))[0].text
    'The capital of Germany is Berlin.'
    >>> Engine(eng.lm, policy=make_policy("yakv", sparse_budget=1 / 32)).generate([long_prompt])
    """

    def __init__(self, lm, policy: str | Policy = "full", mesh=None, prefill_chunk: int = 512,
                 min_prompt_bucket: int = 128):
        if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk={prefill_chunk} must be a power of two")
        self.lm = lm
        self.cfg: ModelConfig = lm.config
        self.params = lm.model.params()
        self.policy = make_policy(policy)
        self.mesh = mesh if mesh is not None else getattr(lm, "mesh", None)
        self.prefill_chunk = prefill_chunk
        self.min_prompt_bucket = min_prompt_bucket
        self._prefill_jit = {}
        self._build_jit = {}
        self._step_jit = {}

    # -- helpers
    def with_policy(self, policy: str | Policy) -> "Engine":
        """Same model and compiled prefill, another policy."""
        eng = Engine.__new__(Engine)
        eng.__dict__.update(self.__dict__)
        eng.policy = make_policy(policy)
        eng._build_jit, eng._step_jit = {}, {}
        return eng

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        tok = self.lm.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        text = tok.apply_chat_template(prompt) if chat else prompt
        return tok.encode(text)

    def _batch_sharding(self, ndim: int):
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(self.mesh, P("data", *([None] * (ndim - 1))))

    def _put(self, x, ndim=None):
        x = np.asarray(x)
        return jax.device_put(x, self._batch_sharding(x.ndim))

    def prepare(self, prompts: Sequence[Sequence[int]], max_new: int):
        """Validate, bucket and pad a ragged batch of token-id prompts."""
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if (lengths == 0).any():
            raise ValueError(f"prompt {int(np.argmin(lengths))} is empty")
        ctx = self.cfg.max_position_embeddings
        if lengths.max() > ctx:
            raise ValueError(f"prompt of {int(lengths.max())} tokens is longer than the model's context of {ctx} tokens")
        if lengths.max() + max_new > ctx:
            raise ValueError(f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                             f"context of {ctx} tokens; lower max_new_tokens to {ctx - int(lengths.max())} or less")
        cache_mod.check_divisible(self.mesh, len(prompts), self.cfg.num_kv_heads)
        Tb = bucket_size(int(lengths.max()), self.min_prompt_bucket)
        toks = np.zeros((len(prompts), Tb), np.int32)
        for i, p in enumerate(prompts):
            ids = np.asarray(p, np.int64)
            if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.cfg.vocab_size})")
            toks[i, :len(p)] = ids
        return toks, lengths, Tb

    # -- stages
    def prefill(self, toks: np.ndarray, lengths: np.ndarray):
        """Exact chunked prefill; returns (last-token logits ``[B, V]``, dense KVCache)."""
        B, Tb = toks.shape
        chunk = min(self.prefill_chunk, Tb)
        keep_q = bool(getattr(self.policy, "needs_queries", False))
        key = (B, Tb, chunk, keep_q)
        if key not in self._prefill_jit:
            self._prefill_jit[key] = jax.jit(functools.partial(prefill_pure, cfg=self.cfg, chunk=chunk, keep_q=keep_q))
        return self._prefill_jit[key](self.params, tokens=self._put(toks), lengths=self._put(lengths))

    def build(self, kv: cache_mod.KVCache, lengths: np.ndarray, max_new: int):
        """Policy state from the dense prefill cache, placed in device / host memory."""
        pol, cfg = self.policy, self.cfg
        pol.validate(cfg, lengths, max_new)
        key = (pol, kv.k.shape, max_new, pol.static_key(lengths, max_new))
        if key not in self._build_jit:
            def build_all(kv, lens, extra):
                # one layer at a time (lax.map), so build temporaries (SVD, quantizer) stay one layer big
                st = jax.lax.map(lambda a: pol.build(cfg, a[0], a[1], lens, max_new, extra=a[3], q=a[2]),
                                 (kv.k, kv.v, kv.q, extra))
                # explicit move of the host fields: out_shardings alone leave a device-typed aval (offload docs)
                return st.replace(**{f: jax.tree.map(place_on_host, getattr(st, f)) for f in pol.host_fields
                                     if getattr(st, f, None) is not None})

            abstract = jax.eval_shape(build_all, kv, jax.ShapeDtypeStruct(lengths.shape, jnp.int32), self._extra())
            shard = cache_mod.state_shardings(abstract, self.mesh, cfg.num_kv_heads, pol.host_fields)
            self._build_jit[key] = (jax.jit(build_all, out_shardings=shard), shard)
        fn, _ = self._build_jit[key]
        return fn(kv, self._put(lengths), self._extra())

    def _extra(self):
        """Per-layer static data of the policy computed from the weights (``policy.prepare``), cached."""
        if getattr(self, "_extra_for", None) is not self.policy:
            self._extra_val = self.policy.prepare(self.cfg, self.params)
            self._extra_for = self.policy
        return self._extra_val

    def step_fn(self, state):
        """The jitted decode step for this state's shapes (compiled once per bucket, state donated)."""
        key = (self.policy, str(jax.tree.map(lambda x: (x.shape, x.dtype), state)))
        if key not in self._step_jit:
            shard = jax.tree.map(lambda x: x.sharding, state)
            bs = self._batch_sharding(1)
            ls = self._batch_sharding(2)
            fn = functools.partial(_step_and_sample, cfg=self.cfg, policy=self.policy)
            self._step_jit[key] = jax.jit(
                lambda params, state, tok, pos, key, t, k, p: fn(params, state=state, tok=tok, pos=pos, key=key,
                                                                  temperature=t, top_k=k, top_p=p),
                donate_argnums=(1,), out_shardings=(bs, ls, shard))
        return self._step_jit[key]

    # -- user API
    def generate(self, prompts: Sequence[str | Sequence[int]], gen: GenerationConfig = GenerationConfig(),
                 chat: bool = True, on_text: Callable[[int, str], None] | None = None) -> list[Generation]:
        """Generate for a batch of prompts (text, chat-templated when ``chat``, or token ids).

        ``on_text(i, delta)`` streams new text of sequence i. Sequences stop on stop ids, stop strings or
        ``max_new_tokens``; the batch runs until every sequence has stopped.
        """
        ids = [self.encode(p, chat) if isinstance(p, str) else list(p) for p in prompts]
        tok = self.lm.tokenizer
        stop_ids = set(gen.stop_ids if gen.stop_ids is not None else (tok.stop_ids() if tok else self.cfg.eos_token_ids))
        max_new = gen.max_new_tokens
        toks, lengths, Tb = self.prepare(ids, max_new)
        gen_bucket = bucket_size(max_new, 64)
        self.policy.validate(self.cfg, lengths, gen_bucket)  # before anything is compiled
        t0 = time.perf_counter()
        logits, kv = self.prefill(toks, lengths)
        state = self.build(kv, lengths, gen_bucket)
        del kv
        key = jax.random.key(gen.seed)
        s = gen.sampling
        first = sample(logits, jax.random.fold_in(key, 0), jnp.float32(s.temperature), jnp.int32(s.top_k),
                       jnp.float32(s.top_p))
        cur = np.asarray(first)
        t1 = time.perf_counter()
        B = len(ids)
        out = [[] for _ in range(B)]
        texts = [""] * B
        reason = [None] * B
        step = self.step_fn(state)
        params = self.params
        t_arr, k_arr, p_arr = jnp.float32(s.temperature), jnp.int32(s.top_k), jnp.float32(s.top_p)
        for i in range(max_new):
            for b in range(B):
                if reason[b] is not None:
                    continue
                t = int(cur[b])
                if t in stop_ids:
                    reason[b] = "stop_id"
                    continue
                out[b].append(t)
                if tok is not None and (on_text or gen.stop_strings):
                    new_text = tok.decode(out[b], skip_special_tokens=True)
                    hit = next((ss for ss in gen.stop_strings if ss in new_text), None)
                    if hit is not None:
                        new_text = new_text[:new_text.index(hit)]
                        reason[b] = "stop_string"
                    if on_text and len(new_text) > len(texts[b]):
                        on_text(b, new_text[len(texts[b]):])
                    texts[b] = new_text
                if reason[b] is None and len(out[b]) >= max_new:
                    reason[b] = "length"
            if all(r is not None for r in reason):
                break
            pos = self._put(lengths + i)
            nxt, _, state = step(params, state, self._put(cur), pos, jax.random.fold_in(key, i + 1), t_arr, k_arr, p_arr)
            cur = np.asarray(nxt)
        t2 = time.perf_counter()
        self.last_state = state
        self.last_lengths = lengths
        res = []
        for b in range(B):
            text = texts[b] if (tok is not None and (on_text or gen.stop_strings)) else (
                tok.decode(out[b], skip_special_tokens=True) if tok is not None else "")
            res.append(Generation(out[b], text, reason[b] or "length", int(lengths[b]), t1 - t0, t2 - t1))
        return res

    def memory_report(self, state=None, lengths=None) -> dict:
        """Bytes per memory kind and component of the last (or given) policy state."""
        state = state if state is not None else self.last_state
        lengths = lengths if lengths is not None else self.last_lengths
        return self.policy.memory_report(state, lengths)
