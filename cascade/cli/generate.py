"""``cascade generate``: answer prompts with a cascade and show which tokens the target decided."""

from __future__ import annotations

import argparse
import time

from cascade.cli.options import add_model_options, add_policy_options, add_sampling_options, has_policy_options, \
    pair_kwargs, policy_from_args, sampling_from_args
from cascade.defaults import UNCALIBRATED_DEFAULT
from cascade.metrics import TokenSource

BUILTIN_PROMPTS = [
    "Write a Python function `is_prime(n)` that returns True when n is a prime number.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "A shop sells pencils at 3 for $1. How many dollars do 27 pencils cost? Answer step by step.",
]

_SOURCE_STYLE = {
    TokenSource.DRAFT: "",
    TokenSource.VERIFIED: "green",
    TokenSource.TARGET: "bold black on yellow",
    TokenSource.BONUS: "bold magenta",
}


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="answer prompts with a cascade and show which tokens the target decided",
                       description="Answer prompts with a cascade policy. Tokens the target decided are highlighted: "
                                   "green = draft token verified by the target, yellow = target replaced a rejected "
                                   "draft token (or decoded alone), magenta = bonus token after a fully accepted block.")
    g.add_argument("prompts", nargs="*", help="prompts to answer (default: a few built-in prompts)")
    add_policy_options(g)
    add_sampling_options(g)
    g.add_argument("--raw", action="store_true", help="send prompts as raw text instead of through the chat template")
    g.add_argument("--system", default=None, help="system message for the chat template")
    add_model_options(g)
    g.add_argument("--batch", action="store_true", help="decode all prompts together in one batch instead of one by one")
    g.add_argument("--no-color", action="store_true", help="plain output without highlighting")
    g.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from cascade.library import Cascade
    from cascade.models.backend import runner_label

    console = Console(no_color=args.no_color, highlight=False)
    policy_from_args(args)  # bad policy options fail before the models load
    params = sampling_from_args(args)
    prompts = args.prompts or BUILTIN_PROMPTS
    t0 = time.perf_counter()
    with console.status("loading the draft and target models"):
        cascade = Cascade.from_pretrained(args.draft, args.target, max_rows=max(1, len(prompts) if args.batch else 1),
                                          **pair_kwargs(args))
    default = cascade.default_policy()  # (needs to know the pair and whether a router loaded)
    policy = policy_from_args(args, default=default)
    shipped = ""
    if not args.policy and not has_policy_options(args):
        shipped = (" (the shipped calibrated default; README, \"The shipped default\")" if default != UNCALIBRATED_DEFAULT
                   else " (the uncalibrated default: the shipped one is calibrated on the default pair only)")
    console.print(f"[dim]loaded in {time.perf_counter() - t0:.1f}s · {cascade.engine.config.device} · draft "
                  f"{runner_label(cascade.draft)} · target {runner_label(cascade.target)} · policy "
                  f"{policy.describe()}{shipped}[/dim]")

    def as_prompt(text: str):
        if args.raw:
            return text
        messages = [{"role": "system", "content": args.system}] if args.system else []
        return messages + [{"role": "user", "content": text}]

    groups = [prompts] if args.batch else [[p] for p in prompts]
    for group in groups:
        t1 = time.perf_counter()
        results = cascade.generate([as_prompt(p) for p in group], params, policy=policy)
        elapsed = time.perf_counter() - t1
        for prompt, r in zip(group, results):
            console.rule(f"[bold]{prompt}")
            console.print(_highlight(cascade, r, Text))
            s = r.stats
            rate = s.emitted_tokens / elapsed if elapsed > 0 else 0.0
            by_draft = sum(1 for src in r.token_sources if src == TokenSource.DRAFT)
            console.print(
                f"[dim]tokens {s.emitted_tokens} · {by_draft} ({by_draft / max(1, s.emitted_tokens):.0%}) decided by the "
                f"draft alone{_target_part(r.token_sources)} · target read {s.target_tokens} answer positions "
                f"({s.target_token_fraction:.0%} of what target-only reads) · target passes "
                f"{s.escalations + s.target_only_steps} (escalations {s.escalations}, decoding alone {s.target_only_steps}) · "
                f"mean acceptance {s.mean_acceptance_length:.2f} · {rate:.2f} tok/s · finish "
                f"{r.finish_reason}{_routing(policy, s)}[/dim]"
            )
    console.print("[dim]legend: plain = draft · [green]green[/green] = verified by target · "
                  "[bold black on yellow]yellow[/bold black on yellow] = target replaced · "
                  "[bold magenta]magenta[/bold magenta] = bonus from target[/dim]")
    return 0


def _target_part(sources) -> str:
    """Where the target's tokens are in the answer: " · the target's from token N on" when every token after the
    first one it decided is the target's (a hand-over: ``takeover``, a window to the end), else how many."""
    first = next((i for i, src in enumerate(sources) if src != TokenSource.DRAFT), None)
    if first is None:
        return ""
    if all(src != TokenSource.DRAFT for src in sources[first:]):
        return f" · handed to the target at token {first + 1} (it decided all {len(sources) - first} after)"
    decided = sum(1 for src in sources if src != TokenSource.DRAFT)
    return f" · {decided} decided by the target (the first at token {first + 1})"


def _routing(policy, stats) -> str:
    """A request-level policy's decision, for the stats line ("" for token-level policies)."""
    if not policy.request_level:
        return ""
    if stats.routed_to_target:
        return f" · routed to the target (the draft's answer discarded; {stats.draft_tokens} draft tokens paid)"
    return " · the draft's answer kept (not routed)"


def _highlight(cascade, result, Text):
    """The answer as rich Text, each token styled by its source (incremental detokenization)."""
    from cascade.detokenize import extend_text

    text = Text()
    prefix = read = 0
    for i, src in enumerate(result.token_sources):
        piece, prefix, read = extend_text(cascade.decode, result.token_ids[: i + 1], prefix, read,
                                          final=i + 1 == len(result.token_ids))
        text.append(piece, style=_SOURCE_STYLE[src])
    if len(text.plain) > len(result.text):  # cut at a stop string
        text = text[: len(result.text)]
    return text
