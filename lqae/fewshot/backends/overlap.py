"""`--llm overlap`: no LLM, token-overlap nearest neighbour; the baseline an LLM has to beat."""

from __future__ import annotations

from lqae.fewshot.backends.base import Backend, BackendOptions, Request
from lqae.fewshot.episodes import shared_tokens, token_bag


class OverlapBackend(Backend):
    """No LLM: each label scores the largest token overlap (multiset intersection, as a fraction of
    the query's tokens; a global word counts `global_weight` times) between the query and one of
    that label's supports; ties go to the larger mean overlap. The honest baseline: how much class
    information the tokens carry on their own."""

    name = "overlap"
    reads_text = False
    supports_constrained = True

    @classmethod
    def from_llm(cls, target: str, options: BackendOptions) -> "OverlapBackend | None":
        return None if target else cls()

    def loglik(self, request: Request) -> list[list[tuple[float, int]]]:
        def bag(ids):
            return token_bag(ids, request.layout, request.global_weight)

        supports = [bag(ids) for ids in request.support_ids]
        results = []
        for query in request.query_ids:
            query_bag = bag(query)
            size = max(sum(query_bag.values()), 1)
            overlaps: list[list[float]] = [[] for _ in request.labels]
            for support, label in zip(supports, request.support_labels):
                overlaps[label].append(shared_tokens(query_bag, support) / size)
            results.append([
                (max(values) + 1e-3 * sum(values) / len(values), 0) if values else (float("-inf"), 0)
                for values in overlaps
            ])
        return results

    def generate(self, request: Request, max_new_tokens: int) -> list[str]:
        return [request.labels[j] for j in self.constrained(request)]

    def constrained(self, request: Request) -> list[int]:
        return [max(range(len(row)), key=lambda j: row[j][0]) for row in self.loglik(request)]
