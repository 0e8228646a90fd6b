"""First-token handover on the decode side (SPEC §3): append the producer's first token.

A decode request whose connector hands over the token the producer sampled after the prompt
(``HandoverToken``) starts with that token as its first output: the connector then supplies the
KV of every prompt token, and the first step computes the handed-over token (its logits give
the second token) instead of recomputing the prompt's last token. Torch-free.
"""

from __future__ import annotations

from kvbridge.connector.types import HandoverToken
from kvbridge.engine.request import Request, TokenLogprobs


def take_handover(
    request: Request, token: HandoverToken, max_model_len: int, vocab_size: int | None
) -> bool:
    """Append ``token`` as ``request``'s first output if it may be; ``True`` if appended.

    Not appended (the plain path runs, the load still happens and releases the producer's
    blocks): the request asks for logprobs the token does not carry, or the token would end the
    request (a stop or EOS token, ``max_tokens`` 1, ``max_model_len`` reached). A token id
    outside the vocabulary raises ``ValueError`` naming the field.
    """
    if vocab_size is not None and not 0 <= token.token_id < vocab_size:
        raise ValueError(
            f"kv_transfer_params.first_token.token_id: {token.token_id} is outside the "
            f"vocabulary [0, {vocab_size})"
        )
    if request.num_tokens != request.num_prompt_tokens:
        return False
    params = request.sampling_params
    logprobs = None
    if token.logprob is not None and token.rank is not None:
        logprobs = TokenLogprobs(token.token_id, token.logprob, token.rank, token.top_logprobs)
    if params.logprobs is not None and (
        logprobs is None or len(token.top_logprobs) < params.logprobs
    ):
        return False
    ends = token.token_id in params.stop_token_ids or (
        not params.ignore_eos and token.token_id in request.eos_token_ids
    )
    if ends or params.max_tokens <= 1 or request.num_tokens + 1 >= max_model_len:
        return False
    if logprobs is not None and params.logprobs is not None:
        logprobs = logprobs._replace(top=logprobs.top[: params.logprobs])
    request.append_output_token(token.token_id, logprobs if params.logprobs is not None else None)
    return True
