"""Token usage: the normalised record, readers for OpenAI shapes, estimation, cost.

Pure: no sockets, no SQLite, no loop. Anthropic and Gemini usage shapes are normalised by
their dialect modules into the same ``Usage``.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeproxy.config import Price


@dataclass(slots=True)
class Usage:
    """Normalised per SPEC §4.

    ``prompt`` includes cached and cache-write tokens; ``completion`` includes reasoning.
    """

    prompt: int = 0
    completion: int = 0
    cached: int = 0  # cache reads, part of prompt
    cache_write: int = 0  # cache creation (Anthropic), part of prompt
    estimated: bool = False


# A token count beyond this for one request is an upstream's nonsense (no model's context
# comes near it) and counts as none: billed, it would be absurd, and SQLite's integers end
# at 2**63, so a larger one made every batch of the ledger fail from then on.
MAX_TOKENS = 2**31 - 1


def token_count(value: object) -> int:
    """A token count an upstream reported; 0 for anything that is not one (negative, not
    an integer, or beyond ``MAX_TOKENS``)."""
    return value if isinstance(value, int) and 0 < value <= MAX_TOKENS else 0


def from_openai(usage: object) -> Usage | None:
    """Read an OpenAI ``usage`` object (chat, completions, embeddings, responses)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int):
        total = usage.get("total_tokens")
        if not isinstance(total, int):
            return None
        prompt = total - (completion if isinstance(completion, int) else 0)
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return Usage(
        prompt=token_count(prompt),
        completion=token_count(completion),
        cached=token_count(cached),
    )


def estimate_tokens(n_bytes: int) -> int:
    """A rough token count for text of ``n_bytes`` bytes: about 4 bytes a token."""
    return (n_bytes + 3) // 4


def cost_usd(price: Price | None, usage: Usage) -> float:
    """SPEC §4: (prompt − cached − cache_write) × input + cached × cached_input
    + cache_write × cache_write_price + completion × output, per 1M tokens."""
    if price is None:
        return 0.0
    cached_price = price.input if price.cached_input is None else price.cached_input
    write_price = price.input if price.cache_write is None else price.cache_write
    fresh = max(0, usage.prompt - usage.cached - usage.cache_write)
    micro = (
        fresh * price.input
        + usage.cached * cached_price
        + usage.cache_write * write_price
        + usage.completion * price.output
    )
    return micro / 1_000_000
