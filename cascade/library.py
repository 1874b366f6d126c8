"""The Python library entry point: ``Cascade`` loads a draft/target pair and generates with a policy.

    from cascade import Cascade, SamplingParams
    cascade = Cascade.from_pretrained()                      # the default pair (after `cascade fetch-models`)
    [r] = cascade.generate("def fib(n):", SamplingParams(max_tokens=64), policy="chow(alpha=0.2)")
    print(r.text, r.stats.target_token_fraction)

Prompts are raw strings, chat conversations (a list of ``{"role", "content"}`` dicts, rendered with the
tokenizer's chat template), or token-id lists.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

from cascade.config import EngineConfig, SamplingParams
from cascade.defaults import default_policy
from cascade.engine import Engine, RequestOutput
from cascade.metrics import EmittedToken, RequestStats, TokenSource, top_logprob_lists
from cascade.models.base import ModelRunner
from cascade.policies import Policy, parse_policy
from cascade.router import DeferralRouter, load_router

if TYPE_CHECKING:
    from cascade.models.vllm import VLLMTargetOptions

Message = dict  # {"role": "user" | "system" | "assistant", "content": str}
Prompt = Union[str, Sequence[Message], Sequence[int]]


DRAFT_GRAPH_LOOPS = (1, 2, 3, 4)  # greedy draft blocks captured at start-up (k - 1 steps: k = 2 .. 5, the default k's range)


@dataclass
class GenerationResult:
    """One request's answer: text, token ids, who decided each token, and its cascade stats."""

    text: str
    tokens: list[EmittedToken]  # one record per emitted token: id, who decided it, its natural log-prob under
    #   the model that decided it, and (with ``SamplingParams.logprobs`` > 0) that model's most likely tokens
    finish_reason: str | None
    stats: RequestStats
    policy: str
    prompt_token_ids: list[int]
    index: int = 0  # which of the prompt's ``n`` choices this is
    outputs: list["GenerationResult"] = field(default_factory=list, repr=False, compare=False)  # every choice
    #   of the prompt, this one first (vLLM's ``RequestOutput.outputs``); each has the fields above

    # views of the records, per field
    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def token_sources(self) -> list[TokenSource]:
        return [t.source for t in self.tokens]

    @property
    def token_logprobs(self) -> list[float]:
        """Per emitted token: its natural log-prob under the model that decided it."""
        return [t.logprob for t in self.tokens]

    @property
    def top_logprobs(self) -> list[list[tuple[int, float]]]:
        """Per token, when asked (``SamplingParams.logprobs`` > 0): the deciding model's most likely tokens,
        (id, natural log-prob); [] when not asked."""
        return top_logprob_lists(self.tokens)

    @property
    def cumulative_logprob(self) -> float:
        """Sum of the natural log-probs of the emitted tokens (as vLLM's ``CompletionOutput``)."""
        return float(sum(self.token_logprobs))

    @property
    def target_decided(self) -> list[bool]:
        """Per emitted token: True where a target pass decided it (verified, replaced or bonus)."""
        return [src.target_decided for src in self.token_sources]


def _is_cached_model(model_dir: str | Path, spec) -> bool:
    """Whether ``model_dir`` is the cache's copy of the known model ``spec``: converted, or its GGUF for llama.cpp
    (the same weights, dequantized or not)."""
    from cascade.weights import cached_gguf_dir, cached_model_dir

    return Path(model_dir).resolve() in (cached_model_dir(spec).resolve(), cached_gguf_dir(spec).resolve())


class Cascade:
    """A draft/target pair with its tokenizer and an engine that runs cascade rounds over them."""

    def __init__(self, draft: ModelRunner, target: ModelRunner, tokenizer: Any | None = None, *,
                 eos_token_ids: Sequence[int] | None = None, config: EngineConfig | None = None,
                 router: "DeferralRouter | None" = None, vocab_size: int | None = None,
                 default_pair: bool = False) -> None:
        """``vocab_size``: the ids the pair cascades over (default: the tokenizer's length; see ``Engine``);
        ``default_pair``: these runners are the project's default pair, the one the shipped default policy
        was calibrated on (``from_pretrained`` sets it; any other pair defaults to ``speculative``)."""
        self.draft, self.target, self.tokenizer = draft, target, tokenizer
        self.default_pair = default_pair
        if eos_token_ids is None:
            eos_token_ids = _eos_ids(tokenizer)
        # the server encodes on its event loop while the engine thread detokenizes: one lock serializes them
        self._tokenizer_lock = threading.Lock()
        self._token_bytes = None  # TokenBytes of the tokenizer, made on first use
        # the engine works on the tokenizer's ids; the runners' padding rows above them are masked
        vocab = vocab_size
        if vocab is None and hasattr(tokenizer, "__len__"):
            vocab = min(len(tokenizer), draft.vocab_size, target.vocab_size)
        self.engine = Engine(draft, target, eos_token_ids=eos_token_ids,
                             detokenize=self.decode if tokenizer is not None else None, config=config,
                             router=router, vocab_size=vocab)
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, draft: str | Path | None = None, target: str | Path | None = None, *,
                        max_rows: int = 8, max_len: int = 2048, device: str = "auto", dtype: str | None = "auto",
                        max_draft_block: int = 16, target_url: str | Sequence[str] | None = None,
                        vllm_options: "VLLMTargetOptions | None" = None, on_target_error: str = "fail",
                        exact_verify: bool = False, adaptive_k: bool = False,
                        llamacpp: dict[str, Any] | None = None, backend: str = "auto") -> "Cascade":
        """Load a pair from local HF checkpoint directories or known model names; with no arguments, the
        default pair from the cache (``cascade fetch-models`` puts it there).

        The target can live in vLLM instead (``cascade.models.vllm``): ``target="vllm:<dir or name>"`` loads
        it into an in-process vLLM engine, ``target_url="http://host:port"`` reaches a running ``vllm serve``
        (a list of URLs: replicas, used round-robin with failover; ``target``, if given, is then only read
        for its config.json, for cost accounting).
        ``on_target_error`` says what a request does when that target cannot be reached: "fail" or
        "draft-only" (its escalations are kept as drafted). ``exact_verify``: verify through batch-1 target-only
        decoding's calls, so lossless policies are token-exact in any dtype at any batch; ``adaptive_k``: dynamic
        speculation for lossless requests (``EngineConfig``), seeded by a start-up profile of the pair
        (``Engine.profile_speculation``: a few synthetic passes per batch bucket, seconds on a CPU).

        A model named ``llama.cpp:<name, dir or file>`` or by a ``.gguf`` path runs on llama.cpp as it ships
        (``cascade.models.llamacpp``; ``llama.cpp:`` alone is the default pair's model, after ``cascade
        fetch-models --backend llama.cpp``); ``llamacpp``: its runner's options (``threads``, ``n_batch``,
        ``kv_dtype``). ``backend`` ("auto", "torch" or "llama.cpp"): the runner of the default pair's members where
        a name is None; "auto" runs them on llama.cpp on a CPU where no dtype is asked for and the bindings and
        both GGUFs are there, on the torch runner otherwise (``cascade.models.backend``)."""
        from cascade.models.backend import default_member_name, pick_backend
        from cascade.models.factory import RunnerOptions, load_pair_runners
        from cascade.weights import DEFAULT_PAIR

        config = EngineConfig(max_rows=max_rows, max_len=max_len, device=device, dtype=dtype,
                              max_draft_block=max_draft_block, on_target_error=on_target_error,
                              exact_verify=exact_verify, adaptive_k=adaptive_k)
        # "auto" resolved: CUDA when present, dtype per device
        options = RunnerOptions(max_rows=max_rows, max_len=max_len, device=config.device, dtype=config.dtype,
                                llamacpp=dict(llamacpp or {}))
        chosen = pick_backend(backend, device, dtype)  # the runner of the default pair's unnamed members
        draft = default_member_name(draft, chosen)
        target = target if target_url is not None else default_member_name(target, chosen)
        pair = load_pair_runners(draft, target, options, target_url=target_url, vllm_options=vllm_options,
                                 draft_extra={"graph_loops": DRAFT_GRAPH_LOOPS})
        draft_runner, target_runner, draft_dir, target_dir = pair.draft, pair.target, pair.draft_dir, pair.target_dir
        tokenizer = load_tokenizer(draft_dir)
        if target_dir is not None and has_tokenizer(target_dir):
            check_same_tokenizer(tokenizer, load_tokenizer(target_dir))
        eos = set(_eos_ids(tokenizer)) | generation_config_eos(draft_dir)
        if target_dir is not None:
            eos |= generation_config_eos(target_dir)
        router = load_router(draft_dir, device=draft_runner.device)  # the learned deferral router, if trained
        # the shipped default policy was calibrated on the default pair: only it gets that default
        is_default_pair = target_dir is not None and all(
            _is_cached_model(d, spec) for d, spec in ((draft_dir, DEFAULT_PAIR[0]), (target_dir, DEFAULT_PAIR[1])))
        cascade = cls(draft_runner, target_runner, tokenizer, eos_token_ids=sorted(eos), config=config, router=router,
                      default_pair=is_default_pair)
        if adaptive_k:  # measured costs from the start: no warm-up rounds at a block length the load makes slow
            cascade.engine.profile_speculation()
        return cascade

    def default_policy(self) -> str:
        """The policy a request without one runs: the shipped calibrated default (``cascade.defaults``) on the
        default pair, or lossless ``speculative`` on any other pair and where that default needs a learned
        router and this pair has none."""
        return default_policy(router_loaded=self.engine.router is not None, default_pair=self.default_pair)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a raw string, a chat conversation, a token-id list, or vLLM's prompt dicts
        (``{"prompt_token_ids": [...]}``, ``{"prompt": "..."}``)."""
        if isinstance(prompt, dict) and not _is_message(prompt):
            if "prompt_token_ids" in prompt:
                return self.encode(list(prompt["prompt_token_ids"]))
            if "prompt" in prompt:
                return self.encode(prompt["prompt"])
            raise ValueError("prompt: a prompt dict needs 'prompt_token_ids' or 'prompt'")
        if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        tokenizer = self._require_tokenizer() if isinstance(prompt, (str, Sequence)) and prompt else None
        with self._tokenizer_lock:
            return encode_text(tokenizer, prompt)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens skipped); safe to call from any thread."""
        tokenizer = self._require_tokenizer()
        with self._tokenizer_lock:
            return tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each token's own bytes, from the tokenizer's vocabulary (``cascade.detokenize.TokenBytes``); safe
        to call from any thread."""
        tokenizer = self._require_tokenizer()
        with self._tokenizer_lock:
            if self._token_bytes is None:
                from cascade.detokenize import TokenBytes

                self._token_bytes = TokenBytes(tokenizer)
            return self._token_bytes(ids)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("prompt: text prompts need a tokenizer; pass token ids or load the pair with one")
        return self.tokenizer

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 policy: str | Policy | None = None, *, progress: bool = False,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """Generate for one prompt or a batch; returns one result per prompt, in order.

        vLLM's call shape works as well: ``generate(prompts, sampling_params=SamplingParams(n=2))``, prompts as
        strings or ``{"prompt_token_ids": [...]}`` dicts, and each result's ``outputs`` holds the prompt's
        ``n`` choices (choice i with a seed draws with seed + i; the result itself is choice 0). Where our
        ``SamplingParams`` defaults differ from vLLM's, see its docstring.

        ``policy`` is a name with parameters (``"chow(alpha=0.2)"``, ``"chow:0.2"``) or a Policy; None runs
        the project's calibrated default (``cascade.defaults.default_policy``)."""
        if sampling_params is not None:
            if params is not None:
                raise ValueError("sampling_params: give params or sampling_params, not both")
            params = sampling_params
        batch = _as_batch(prompts)
        if not batch:
            raise ValueError("prompts: must not be empty")
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(batch)
        if len(plist) != len(batch):
            raise ValueError(f"params: {len(plist)} sampling params for {len(batch)} prompts")
        pol = parse_policy(self.default_policy() if policy is None else policy)
        encoded = [self.encode(p) for p in batch]
        # one engine request per choice: (prompt index, choice index, params)
        choices = [(i, j, p.choice(j)) for i, p in enumerate(plist) for j in range(p.n)]
        results = self._run([encoded[i] for i, _, _ in choices], [p for _, _, p in choices], pol, progress)
        out: list[GenerationResult] = []
        for (i, j, _), r in zip(choices, results):
            r.index = j
            if j == 0:
                out.append(r)
            out[-1].outputs.append(r)
        return out

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             policy: str | Policy | None = None, *, progress: bool = False) -> list[GenerationResult]:
        """vLLM's ``LLM.chat``: one conversation or a list of them, rendered with the chat template."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        return self.generate(list(messages), sampling_params=sampling_params, policy=policy, progress=progress)

    def _run(self, encoded: list[list[int]], plist: list[SamplingParams], pol: Policy,
             progress: bool) -> list[GenerationResult]:
        """Run one engine request per (prompt ids, params) to the end; results in order."""
        ids = [f"gen-{next(self._ids)}" for _ in encoded]
        finals: dict[str, RequestOutput] = {}
        try:
            for rid, prompt_ids, p in zip(ids, encoded, plist):
                self.engine.add_request(rid, prompt_ids, p, pol)
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        tokens: dict[str, list[EmittedToken]] = {rid: [] for rid in ids}
        bar = _progress(progress, sum(p.max_tokens for p in plist))
        try:
            while len(finals) < len(ids):
                for out in self.engine.step():
                    if out.request_id not in tokens:
                        continue
                    tokens[out.request_id] += out.new_tokens
                    if bar is not None:
                        bar.update(len(out.new_tokens))
                    if out.finished:
                        finals[out.request_id] = out
        except BaseException:
            for rid in ids:
                if rid not in finals:
                    self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [
            GenerationResult(text=finals[rid].text, tokens=tokens[rid], finish_reason=finals[rid].finish_reason,
                             stats=finals[rid].stats, policy=pol.describe(), prompt_token_ids=list(pids))
            for rid, pids in zip(ids, encoded)
        ]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               policy: str | Policy | None = None) -> Iterator[RequestOutput]:
        """Yield one RequestOutput per round for a single prompt (new tokens as they are decided).

        Held-back output comes later: a request-level policy (``quantile``) streams nothing while the draft
        answers; a kept draft answer arrives whole in the round it finished (an escalated request then
        streams the target's tokens), and BiLD's unchecked draft tokens arrive once the target has
        checked them or the request has ended."""
        pol = parse_policy(self.default_policy() if policy is None else policy)
        rid = f"gen-{next(self._ids)}"
        self.engine.add_request(rid, self.encode(prompt), params or SamplingParams(), pol)
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort(rid)


def encode_text(tokenizer, prompt: "str | Sequence[Message]") -> list[int]:
    """Token ids of a raw string (no special tokens added) or of a chat conversation (the tokenizer's chat
    template, with the generation prompt): how ``Cascade.encode`` turns text into a prompt."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt: must not be empty")
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        for i, m in enumerate(prompt):
            if "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: needs 'role' and 'content'")
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    raise ValueError("prompt: must be a non-empty string, a list of chat messages or a list of token ids")


def load_tokenizer(path: str | Path):
    """The HF tokenizer saved beside a checkpoint (local files only; no hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def check_same_tokenizer(draft_tokenizer, target_tokenizer) -> None:
    """Raise ValueError unless the two tokenizers map every token to the same id: a cascade compares the
    draft's and the target's distributions id by id, so they must share one tokenizer (their checkpoints may
    still pad the embedding matrices to different sizes)."""
    a, b = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    if a == b:
        return
    only = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
    raise ValueError(f"target: its tokenizer differs from the draft's ({len(a)} vs {len(b)} tokens; first differing "
                     f"(token, id): {only}); a cascade needs a draft and a target that share one tokenizer")


def _eos_ids(tokenizer) -> list[int]:
    if tokenizer is None or tokenizer.eos_token_id is None:
        return []
    return [int(tokenizer.eos_token_id)]


def generation_config_eos(path: str | Path) -> set[int]:
    import json

    cfg = Path(path) / "generation_config.json"
    if not cfg.exists():
        return set()
    eos = json.loads(cfg.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def _as_batch(prompts) -> list:
    """One prompt (a string, a vLLM-style prompt dict, a chat, a token-id list) or a batch of them -> a list."""
    if isinstance(prompts, str) or (isinstance(prompts, dict) and not _is_message(prompts)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and (_is_message(prompts[0]) or isinstance(prompts[0], int)):
        return [prompts]  # one chat or one token-id list
    return list(prompts)


def _is_message(x) -> bool:
    return isinstance(x, dict) and "role" in x


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="generating", leave=False)
