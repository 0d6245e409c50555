"""The user API over prefill and decode: buckets, sampling, stopping, ragged batches, sessions.

Flow (DESIGN.md): ids (ragged batch, right-padded to a power-of-two prompt bucket ``Tb``) ->
:func:`kvjax.prefill.prefill` (exact attention layer by layer; each layer's dense K/V is turned into the policy's
state right away and its host part moved to ``pinned_host``) -> :func:`kvjax.decode.decode_step` per token, driven
either by :func:`kvjax.decode.generate_loop` (one ``lax.while_loop`` on the device: the default) or from Python
through a :class:`Session` (teacher forcing, forks, streaming, stop strings).

Compilation: prefill once per (batch, prompt bucket, policies, generation bucket); the decode step and the device
loop once per (batch, prompt bucket, policy budget bucket, generation bucket). The number of steps, the prompt
lengths inside a bucket and the sampling knobs never recompile (:meth:`Engine.compile_counts` says how many
programs each stage has compiled).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from models.config import ModelConfig
from models.transformer import embed_tokens, per_layer_params

from . import cache as cache_mod
from .compat import DEVICE_MEMORY_KIND, HOST_MEMORY_KIND
from . import decode as decode_mod
from . import memory as memory_mod
from . import prefill as prefill_mod
from .policies import Policy, make_policy
from .policies.base import bucket_size
from .sampling import SamplingConfig, sample

log = logging.getLogger("kvjax")

#: smallest generated-slot bucket: the state holds ``generation_bucket(max_new)`` slots for generated tokens
MIN_GENERATION_BUCKET = 64


def generation_bucket(max_new: int) -> int:
    """Generated-token slots a state is built with for ``max_new`` new tokens (a power of two, at least 64), so
    generation lengths inside a bucket share one compile."""
    return bucket_size(max_new, MIN_GENERATION_BUCKET)


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


@dataclasses.dataclass
class StepOut:
    """What one :meth:`Session.step` returns (device arrays): float32 ``logits [B, V]`` for the next token, the
    ``tokens [B]`` sampled from them, and the attention recall ``[B, L, Hkv]`` when the probe ran (else None)."""

    logits: jax.Array
    tokens: jax.Array
    recall: jax.Array | None = None


@struct.dataclass
class Sampler:
    """The per-call sampling inputs of a jitted step (all traced, so changing them never recompiles): PRNG ``key``,
    ``temperature`` (0 = greedy), ``top_k`` (0 = off), ``top_p`` (1 = off)."""

    key: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @staticmethod
    def of(sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None) -> "Sampler":
        return Sampler(jax.random.key(0) if key is None else key, jnp.float32(sampling.temperature),
                       jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))

    def __call__(self, logits: jax.Array) -> jax.Array:
        return sample(logits, self.key, self.temperature, self.top_k, self.top_p)


@struct.dataclass
class RecallProbe:
    """Inputs of the attention-recall probe: exact post-RoPE prompt keys ``[L, B, Hkv, Tb, D]``, prompt lengths
    ``[B]``, and whether to measure at this step (a traced bool: skipping does not recompile)."""

    exact_keys: jax.Array
    lengths: jax.Array
    measure: jax.Array


class _Prefill:
    """The two jitted programs of a prefill: the token embedding (into host memory with ``offload_hidden``) and the
    layer-by-layer prefill from it (:func:`kvjax.prefill.prefill_hidden`)."""

    def __init__(self, embed, run):
        self.embed, self.run = embed, run

    def _cache_size(self) -> int:
        return self.run._cache_size()


class _Owners:
    """How many sessions hold the same state buffers (a forked state must not be donated)."""

    def __init__(self):
        self.n = 1


class Session:
    """A prefilled batch under one policy, decoded token by token from Python.

    ``state`` is the layer-stacked policy state, ``lengths`` (numpy int32 ``[B]``) the prompt lengths, ``pos`` the
    next absolute position of every sequence, ``first_logits`` the float32 prefill logits ``[B, V]``.
    :meth:`step` feeds one token per sequence (teacher forcing feeds the reference's tokens) and returns the next
    logits and a sampled token; :meth:`fork` gives an independent copy (the next step of either runs without
    donating the shared state, once). With ``exact_keys`` (from :meth:`Engine.start`) the attention-recall probe
    of the same step is available (``step(..., recall=True)``).
    """

    def __init__(self, engine: "Engine", state, lengths: np.ndarray, first_logits: jax.Array, exact_keys=None,
                 exact: bool = False):
        self.engine = engine
        #: True when the requested policy could not prune these prompts and full attention runs instead
        self.exact = exact
        self.state = state
        self.lengths = np.asarray(lengths, np.int32)
        self.pos = self.lengths.copy()
        self.first_logits = first_logits
        self.exact_keys = exact_keys
        self._owners = _Owners()

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    def step(self, tokens, *, key: jax.Array | None = None, sampling: SamplingConfig = SamplingConfig(),
             recall: bool = False, measure: bool = True) -> StepOut:
        """Feed ``tokens`` (int ``[B]``) at :attr:`pos`, advance it, and return :class:`StepOut`.

        ``recall=True`` runs the attention-recall probe (compiled into the same step; ``measure=False`` skips
        the measurement at run time without recompiling). Sampling with ``key`` (default: key 0) and ``sampling``
        (default greedy) happens inside the same jitted step."""
        eng = self.engine
        if recall and self.exact_keys is None:
            raise ValueError("recall=True needs a session started with exact_keys=True (Engine.start)")
        donate = self._owners.n == 1
        fn = eng.step_program(self.state, recall=recall, donate=donate)
        probe = RecallProbe(self.exact_keys, eng.put(self.lengths), jnp.bool_(measure)) if recall else None
        logits, nxt, state, rec = fn(eng.decode_params, self.state, eng.put(np.asarray(tokens, np.int32)),
                                     eng.put(self.pos), Sampler.of(sampling, key), probe)
        if not donate:  # this session now owns a fresh state; the other holder keeps the old one
            self._owners.n -= 1
            self._owners = _Owners()
        self.state = state
        self.pos = self.pos + 1
        return StepOut(logits, nxt, rec)

    def fork(self) -> "Session":
        """An independent session at the same point (the state is shared until either steps)."""
        other = Session.__new__(Session)
        other.__dict__.update(self.__dict__)
        other.pos = self.pos.copy()
        self._owners.n += 1
        return other

    def memory_report(self) -> dict:
        return self.policy.memory_report(self.state, self.lengths)


# ----------------------------------------------------------------------------- engine
class Engine:
    """Runs a loaded model with a KV-cache policy. Jitted functions are cached per shape bucket.

    >>> eng = Engine(load_model("smollm2-135m", dtype="float32"), policy="full")
    >>> eng.generate(["What is the capital of Germany?"], GenerationConfig(max_new_tokens=32))[0].text
    'The capital of Germany is Berlin.'
    >>> Engine(eng.lm, policy=make_policy("yakv", sparse_budget=1 / 32)).generate([long_prompt])

    ``offload_hidden`` keeps the hidden states between layers in host memory during prefill (only one chunk of them
    on the device), for the longest prompts. ``exact_fallback`` (default) decodes prompts a policy cannot prune
    (:meth:`Policy.prunable`) with full attention; False runs the policy's own machinery on them anyway (tests of a
    whole-prompt budget use that).

    ``per_layer_decode`` makes the decode step read each layer's weights from its own buffer
    (:func:`models.transformer.per_layer_params`): on the CPU backend a scan over layer-stacked weights copies every
    layer's slice per step, so this makes CPU decode faster (BENCHMARKS.md) at the price of a second copy of the
    layer weights in host memory. None (default): on when the default backend is the CPU; prefill always reads the
    stacked weights.
    """

    def __init__(self, lm, policy: str | Policy = "full", mesh=None, prefill_chunk: int = 512,
                 min_prompt_bucket: int = 128, offload_hidden: bool = False, exact_fallback: bool = True,
                 per_layer_decode: bool | None = None):
        if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk={prefill_chunk} must be a power of two")
        self.lm = lm
        self.cfg: ModelConfig = lm.config
        self.params = lm.model.params()
        self.policy = make_policy(policy)
        self.mesh = mesh if mesh is not None else lm.mesh
        self.prefill_chunk = prefill_chunk
        self.min_prompt_bucket = min_prompt_bucket
        self.offload_hidden = offload_hidden
        self.exact_fallback = exact_fallback
        self.per_layer_decode = jax.default_backend() == "cpu" if per_layer_decode is None else per_layer_decode
        self._jits: dict = {}  # shared by with_policy() engines: keys carry the policy
        self._extras: dict = {}
        self.last_session: Session | None = None

    # -- helpers
    def with_policy(self, policy: str | Policy) -> "Engine":
        """Same model (and compiled programs), another policy."""
        eng = Engine.__new__(Engine)
        eng.__dict__.update(self.__dict__)
        eng.policy = make_policy(policy)
        eng.last_session = None
        return eng

    @property
    def decode_params(self) -> dict:
        """The parameters the decode programs take: :attr:`params`, plus per-layer buffers with
        ``per_layer_decode``."""
        return per_layer_params(self.params, self.cfg) if self.per_layer_decode else self.params

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        tok = self.lm.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        text = tok.apply_chat_template(prompt) if chat else prompt
        return tok.encode(text)

    def batch_sharding(self, ndim: int):
        """Sharding of a per-sequence array with ``ndim`` axes (batch over the mesh's ``data`` axis)."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(self.mesh, P("data", *([None] * (ndim - 1))))

    def put(self, x) -> jax.Array:
        """A per-sequence host value (numpy, list) as a device array sharded over the batch."""
        x = np.asarray(x)
        return jax.device_put(x, self.batch_sharding(x.ndim))

    def prepare(self, prompts: Sequence[Sequence[int]], max_new: int):
        """Validate, bucket and pad a ragged batch of token-id prompts: (tokens int32 ``[B, Tb]``, lengths, Tb)."""
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

    def extra(self, policy: Policy):
        """Per-layer static data of a policy computed from the weights (``policy.prepare``), cached."""
        if policy not in self._extras:
            self._extras[policy] = policy.prepare(self.cfg, self.params)
        return self._extras[policy]

    def _jit(self, kind: str, key, make: Callable):
        k = (kind, key)
        if k not in self._jits:
            self._jits[k] = make()
        return self._jits[k]

    def compile_counts(self) -> dict[str, int]:
        """Programs compiled so far per stage ("prefill", "build", "step", "loop"), over every policy of this model."""
        out = {"prefill": 0, "build": 0, "step": 0, "loop": 0}
        for (kind, _), fn in self._jits.items():
            out[kind] += fn._cache_size()
        return out

    def _state_shardings(self, policy: Policy, abstract):
        return cache_mod.state_shardings(abstract, self.mesh, self.cfg, policy)

    # -- prefill + build
    def _prefill_fn(self, policies: tuple, B: int, Tb: int, max_new: int):
        chunk = min(self.prefill_chunk, Tb)

        def make():
            fn = functools.partial(prefill_mod.prefill_hidden, cfg=self.cfg, policies=policies, max_new=max_new,
                                   chunk=chunk, hidden_on_host=self.offload_hidden)
            extras = tuple(self.extra(p) if isinstance(p, Policy) else None for p in policies)
            x = jax.ShapeDtypeStruct((B, Tb, self.cfg.hidden_size), self.params["embed"].dtype)
            lens = jax.ShapeDtypeStruct((B,), jnp.int32)
            _, states = jax.eval_shape(lambda p, x, l, e: fn(p, x=x, lengths=l, extras=e), self.params, x,
                                       lens, extras)
            shard = tuple(self._state_shardings(p, s) for p, s in zip(policies, states))
            run = jax.jit(lambda p, x, l, e: fn(p, x=x, lengths=l, extras=e),
                          out_shardings=(self.batch_sharding(2), shard),
                          donate_argnums=(1,) if self.offload_hidden else ())
            kind = HOST_MEMORY_KIND if self.offload_hidden else DEVICE_MEMORY_KIND
            embed = jax.jit(embed_tokens, out_shardings=self.batch_sharding(3).with_memory_kind(kind))
            return _Prefill(embed, run)

        return self._jit("prefill", (policies, B, Tb, max_new, chunk, self.offload_hidden), make)

    def prefill(self, toks: np.ndarray, lengths: np.ndarray, max_new: int, policies: Sequence | None = None):
        """Exact prefill that builds the policies' states layer by layer (:mod:`kvjax.prefill`).

        ``max_new``: generated-token slots (use :func:`generation_bucket`). ``policies`` (default: this engine's
        policy) may hold several policies and :class:`kvjax.prefill.DenseCapture`. Returns (float32 last-token
        logits ``[B, V]``, tuple of states).
        """
        policies = tuple(policies) if policies is not None else (self.policy,)
        for p in policies:
            if isinstance(p, Policy):
                p.validate(self.cfg, lengths, max_new)
        B, Tb = toks.shape
        fn = self._prefill_fn(policies, B, Tb, max_new)
        extras = tuple(self.extra(p) if isinstance(p, Policy) else None for p in policies)
        x = fn.embed(self.params, self.put(toks))
        with memory_mod.explain_oom("prefill", fn.run, self.params, x, lengths, extras):
            return fn.run(self.params, x, self.put(lengths), extras)

    def dense_prefill(self, toks: np.ndarray, lengths: np.ndarray, queries: bool = False):
        """The prefill with the dense capture (:class:`kvjax.prefill.DenseCapture`): (float32 last-token logits,
        :class:`kvjax.cache.KVCache` of every layer's post-RoPE k, v ``[L, B, Hkv, Tb, D]`` and, with ``queries``, q
        ``[L, B, H, Tb, D]``), e.g. to build several policies from one synthetic or real cache (:meth:`build`)."""
        logits, (kv,) = self.prefill(toks, lengths, 1, (prefill_mod.DenseCapture(values=True, queries=queries),))
        return logits, kv

    def build(self, kv: cache_mod.KVCache, lengths: np.ndarray, max_new: int):
        """This policy's state from given dense post-RoPE K/V (``kv.k``/``kv.v`` ``[L, B, Hkv, Tb, D]``, ``kv.q``
        for policies that need the queries: :meth:`dense_prefill` or a synthetic cache in benchmarks and tests),
        one layer at a time exactly as the prefill builds it (:func:`kvjax.prefill.build_from_kv`)."""
        k, v, q = kv.k, kv.v, kv.q if self.policy.needs_queries else None
        pol = self.policy
        pol.validate(self.cfg, lengths, max_new)
        extra = self.extra(pol)
        fn = functools.partial(prefill_mod.build_from_kv, pol, self.cfg, max_new=max_new)

        def make():
            abstract = jax.eval_shape(lambda k, v, q, l, e: fn(k=k, v=v, q=q, lengths=l, extra=e), k, v, q,
                                      jax.ShapeDtypeStruct(lengths.shape, jnp.int32), extra)
            return jax.jit(lambda k, v, q, l, e: fn(k=k, v=v, q=q, lengths=l, extra=e),
                           out_shardings=self._state_shardings(pol, abstract))

        jitted = self._jit("build", (pol, k.shape, str(k.dtype), q is None, max_new), make)
        return jitted(k, v, q, self.put(lengths), extra)

    def runnable_policy(self, policy: Policy, lengths) -> tuple[Policy, bool]:
        """The policy that serves these prompts: ``policy`` itself, or full attention (and True) when it prunes
        none of them (prompts at or below ``min_seqlen_to_prune``, or budgets covering the prompt), with a one-line
        notice. A batch mixing both is an error for policies that cannot keep exact rows in their state
        (:attr:`Policy.mixes_exact_rows`); :meth:`generate` splits such batches."""
        mask = policy.prunable(self.cfg, lengths)
        if mask.all() or not policy.prunes or not self.exact_fallback:
            return policy, False
        if not mask.any():
            log.warning("kvjax: %s cannot prune prompts of %s tokens (min_seqlen_to_prune or budgets covering the "
                        "prompt): decoding them exactly (full attention)", policy.name,
                        "/".join(str(int(t)) for t in np.asarray(lengths)))
            return make_policy("full"), True
        if policy.mixes_exact_rows:
            return policy, False
        raise ValueError(f"{policy.name} prunes prompts {np.flatnonzero(mask).tolist()} but not "
                         f"{np.flatnonzero(~mask).tolist()} of this batch (lengths {np.asarray(lengths).tolist()} "
                         f"tokens); start them as separate batches (Engine.generate splits them itself)")

    def start(self, prompts: Sequence[Sequence[int]], max_new: int, policies: Sequence[Policy] | None = None,
              exact_keys: bool = False):
        """Prefill a batch of token-id prompts and return a :class:`Session` (or, with ``policies``, one session per
        policy, all built from the same exact prefill). ``exact_keys`` keeps the exact post-RoPE prompt keys
        ``[L, B, Hkv, Tb, D]`` on the device for the attention-recall probe (``Session.step(recall=True)``).
        A policy that cannot prune these prompts is replaced by full attention (:meth:`runnable_policy`; the
        session's ``exact`` is then True)."""
        asked = tuple(make_policy(p) for p in policies) if policies is not None else (self.policy,)
        toks, lengths, _ = self.prepare(prompts, max_new)
        runs = [self.runnable_policy(p, lengths) for p in asked]
        pols = tuple(dict.fromkeys(p for p, _ in runs))  # one build per distinct policy
        capture = (prefill_mod.DenseCapture(),) if exact_keys else ()
        logits, states = self.prefill(toks, lengths, generation_bucket(max_new), pols + capture)
        keys = states[-1].k if exact_keys else None
        by_policy = dict(zip(pols, states))
        sessions = [Session(self.with_policy(p) if p != self.policy else self, by_policy[p], lengths, logits, keys,
                            exact) for p, exact in runs]
        if len(sessions) > 1 and len(pols) < len(sessions):  # two sessions share a state: make them forks
            seen = {}
            for i, (p, exact) in enumerate(runs):
                if p in seen:
                    sessions[i] = sessions[seen[p]].fork()
                    sessions[i].exact = exact  # e.g. full asked for, and a policy that fell back to full
                seen.setdefault(p, i)
        return sessions if policies is not None else sessions[0]

    # -- decode
    def step_program(self, state, *, recall: bool = False, donate: bool = True):
        """The jitted decode step for states laid out like ``state`` (compiled once per layout):
        ``fn(params, state, tokens [B], positions [B], sampler: Sampler, probe: RecallProbe | None) ->
        (logits [B, V], next tokens [B], state, recall [B, L, Hkv] | None)``, with the state donated unless
        ``donate=False`` and the recall probe compiled in when ``recall``. :class:`Session` drives it."""
        pol = self.policy
        layout = jax.tree.map(lambda x: (x.shape, x.dtype), state)

        def make():
            shard = jax.tree.map(lambda x: x.sharding, state)
            rec_s = self.batch_sharding(3) if recall else None

            def fn(params, state, tok, pos, sampler, probe):
                logits, state, rec = decode_mod.decode_step(
                    params, self.cfg, pol, state, tok, pos, probe_recall=recall,
                    exact_keys=probe.exact_keys if recall else None, prompt_lengths=probe.lengths if recall else None,
                    do_recall=probe.measure if recall else True)
                return logits, sampler(logits), state, rec

            return jax.jit(fn, donate_argnums=(1,) if donate else (),
                           out_shardings=(self.batch_sharding(2), self.batch_sharding(1), shard, rec_s))

        return self._jit("step", (pol, str(layout), recall, donate), make)

    def _loop_jit(self, state, gen_bucket: int, keep_logits: bool):
        pol = self.policy
        layout = jax.tree.map(lambda x: (x.shape, x.dtype), state)

        def make():
            shard = jax.tree.map(lambda x: x.sharding, state)
            fn = functools.partial(decode_mod.generate_loop, cfg=self.cfg, policy=pol, gen_bucket=gen_bucket,
                                   keep_logits=keep_logits)
            b1, b2 = self.batch_sharding(1), self.batch_sharding(2)

            def run(params, state, first, lengths, sampler, stop_ids, max_new):
                return fn(params, state=state, first=first, lengths=lengths, key=sampler.key,
                          temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p,
                          stop_ids=stop_ids, max_new=max_new)

            return jax.jit(run, donate_argnums=(1,),
                           out_shardings=(b2, b1, b1, shard, self.batch_sharding(3) if keep_logits else None))

        return self._jit("loop", (pol, str(layout), gen_bucket, keep_logits), make)

    # -- user API
    def generate(self, prompts: Sequence[str | Sequence[int]], gen: GenerationConfig = GenerationConfig(),
                 chat: bool = True, on_text: Callable[[int, str], None] | None = None,
                 loop: str | None = None) -> list[Generation]:
        """Generate for a batch of prompts (text, chat-templated when ``chat``, or token ids).

        Sequences stop on stop ids, stop strings or ``max_new_tokens``; the batch runs until every sequence has
        stopped. ``loop="device"`` runs the whole generation as one ``lax.while_loop`` on the device (the default);
        ``"host"`` steps from Python, which stop strings and the streaming callback ``on_text(i, delta)`` need
        (the default when either is given). Both give the same tokens.
        """
        if loop is None:
            loop = "host" if (gen.stop_strings or on_text is not None) else "device"
        if loop not in ("device", "host"):
            raise ValueError(f"loop={loop!r} must be 'device' or 'host'")
        if loop == "device" and (gen.stop_strings or on_text is not None):
            raise ValueError("stop strings and on_text need loop='host' (the device loop stops on token ids only)")
        ids = [self.encode(p, chat) if isinstance(p, str) else list(p) for p in prompts]
        mask = self.policy.prunable(self.cfg, [len(i) for i in ids])
        if (self.exact_fallback and self.policy.prunes and mask.any() and not mask.all()
                and not self.policy.mixes_exact_rows):
            out: list = [None] * len(ids)  # a mixed batch: the prunable prompts and the others separately
            for group in (np.flatnonzero(mask), np.flatnonzero(~mask)):
                for i, r in zip(group, self.generate([ids[i] for i in group], gen, False,
                                                     None if on_text is None else
                                                     (lambda j, d, g=group: on_text(int(g[j]), d)), loop)):
                    out[i] = r
            return out
        tok = self.lm.tokenizer
        stop_ids = tuple(gen.stop_ids if gen.stop_ids is not None else (tok.stop_ids() if tok
                                                                         else self.cfg.eos_token_ids))
        max_new = gen.max_new_tokens
        gb = generation_bucket(max_new)
        t0 = time.perf_counter()
        sess = self.start(ids, max_new)
        key = jax.random.key(gen.seed)
        s = gen.sampling
        first = Sampler.of(s, jax.random.fold_in(key, 0))(sess.first_logits)
        jax.block_until_ready(first)
        t1 = time.perf_counter()
        if loop == "device":
            out, reason = self._generate_device(sess, first, Sampler.of(s, key), stop_ids, max_new, gb)
        else:
            out, reason = self._generate_host(sess, first, key, s, set(stop_ids), max_new, gen.stop_strings, on_text)
        t2 = time.perf_counter()
        self.last_session = sess
        self.last_exact = sess.exact
        res = []
        for b in range(len(ids)):
            text = (reason[b][1] if isinstance(reason[b], tuple) else
                    (tok.decode(out[b], skip_special_tokens=True) if tok is not None else ""))
            why = reason[b][0] if isinstance(reason[b], tuple) else reason[b]
            res.append(Generation(out[b], text, why, int(sess.lengths[b]), t1 - t0, t2 - t1))
        return res

    def _generate_device(self, sess: Session, first, sampler: Sampler, stop_ids, max_new, gb):
        n_stop = bucket_size(max(len(stop_ids), 1), 8)
        stops = np.full((n_stop,), -1, np.int32)
        stops[:len(stop_ids)] = stop_ids
        fn = sess.engine._loop_jit(sess.state, gb, False)
        args = (first, self.put(sess.lengths), sampler, jnp.asarray(stops), jnp.int32(max_new))
        params = self.decode_params
        with memory_mod.explain_oom("decode", fn, params, sess.state, *args):
            toks, n, reason, state, _ = fn(params, sess.state, *args)
        sess.state = state
        toks, n, reason = np.asarray(toks), np.asarray(n), np.asarray(reason)
        out = [toks[b, :n[b]].tolist() for b in range(len(n))]
        return out, [decode_mod.STOP_REASONS.get(int(r), "length") for r in reason]

    def _generate_host(self, sess: Session, first, key, s: SamplingConfig, stop_ids: set, max_new: int,
                       stop_strings, on_text):
        tok = self.lm.tokenizer
        B = len(sess.lengths)
        out = [[] for _ in range(B)]
        texts = [""] * B
        reason: list = [None] * B
        track_text = tok is not None and (on_text is not None or bool(stop_strings))
        cur = np.asarray(first)
        for i in range(max_new):
            for b in range(B):
                if reason[b] is not None:
                    continue
                t = int(cur[b])
                if t in stop_ids:
                    reason[b] = "stop_id"
                    continue
                out[b].append(t)
                if track_text:
                    new_text = tok.decode(out[b], skip_special_tokens=True)
                    hit = next((ss for ss in stop_strings if ss in new_text), None)
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
            cur = np.asarray(sess.step(cur, key=jax.random.fold_in(key, i + 1), sampling=s).tokens)
        reason = [r or "length" for r in reason]
        if track_text:
            return out, [(r, texts[b]) for b, r in enumerate(reason)]
        return out, reason

    @property
    def last_state(self):
        """The policy state after the last :meth:`generate` (for memory reports and inspection)."""
        return None if self.last_session is None else self.last_session.state

    def memory_report(self, state=None, lengths=None) -> dict:
        """Bytes per memory kind and component of the last generation's (or the given) policy state."""
        if state is None:
            if self.last_session is None:
                raise ValueError("no state yet: call generate() first or pass state and lengths")
            state, lengths = self.last_session.state, self.last_session.lengths
        return self.policy.memory_report(state, lengths)


__all__ = ["Engine", "Generation", "GenerationConfig", "MIN_GENERATION_BUCKET", "RecallProbe", "Sampler", "Session",
           "StepOut", "generation_bucket"]
