"""The target as a server of verifications (``cascade target-serve``): the verify endpoint that lets a
remote cascade front end pay for an escalation's new positions only.

- ``wire``: the endpoint's request / answer format (shared with the client, ``cascade.models.vllm``);
- ``runner_scorer``: scoring on the project's own runner, its KV rows as a prefix cache;
- ``app``: the FastAPI app over a ``RunnerScorer`` (``--target DIR``);
- ``vllm_route``: the same endpoint inside ``vllm serve`` as an ASGI middleware (``--target vllm:DIR``),
  beside vLLM's own OpenAI routes, on vLLM's async engine with prefix-cache reads on.

Importing this package starts nothing and imports neither FastAPI nor vLLM.
"""
