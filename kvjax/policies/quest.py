"""``quest``: Quest (Tang et al., ICML 2024), query-aware page selection, on the ArkVale page machinery.

Quest keeps, per page of 16 tokens, the elementwise min and max of the page's keys (the same digest as ArkVale,
:func:`kvjax.policies.arkvale.page_digests`) and estimates a page's "criticality" for the current query as the
largest ``q·k`` the box allows, ``Σ_d max(q_d·min_d, q_d·max_d)``. The top pages are attended exactly.
Quest is not among the paper's baselines; it is here because it shares ArkVale's digest, and to make the
differences between the two explicit.

How this Quest differs from :class:`~kvjax.policies.arkvale.ArkValePolicy`, precisely:

1. **Scoring — the same function.** Quest scores per *query* head: bound(q_h, page) for every head h. Original
   Quest (MHA models) then selects pages per query head. A GQA model stores and fetches K/V per KV head, so here the
   per-head bounds are reduced by the max over the head's group G before top-k: a page is fetched for a KV head
   when the best of its G query heads ranks it in the top pages. ArkVale's fork (``group_size = 1``) also selects
   per KV head with the max over the group, so for the same digest and query both compute the identical score
   ``max_{g<G} Σ_d max(q_g,d·min_d, q_g,d·max_d)`` (one shared implementation, ``page_scores``). For G = 1 this
   is exactly Quest's per-head selection. The policies differ only in points 2–4.
2. **Budget.** Quest's token budget counts *every* attended prompt page, the always-kept page included:
   ``max(1, ceil(int(budget·T)/16) − n_win_pages)`` pages are chosen by top-k. ArkVale's budget counts only the
   top-k pages; its 2 sink and 5 window pages come on top.
3. **Always-kept pages.** Quest keeps no sink pages and only the last (possibly partial) prompt page (Quest always
   attends the page being written; generated tokens are on the device and always attended, as for ArkVale, so the
   prompt's last page plays that role). ArkVale keeps 2 sink + 5 window pages.
4. **Dense layers.** Quest does not apply to the first two layers (they attend every token); ArkVale's fork runs
   every layer sparse.

The default budget is the same fraction of the prompt as ArkVale's (1/128): Quest's own paper uses fixed token
budgets (e.g. 1024–4096), which for the short CPU-test prompts would cover the whole prompt.
"""
from __future__ import annotations

import dataclasses

from .arkvale import PageConfig, PagePolicy
from .common import budget_tokens


@dataclasses.dataclass(frozen=True)
class QuestConfig(PageConfig):
    """Quest: pages of 16 tokens, ``budget`` = every attended prompt token (fraction of the prompt or token
    count; default 1/128), no sink pages, the last prompt page always kept, the first 2 layers dense, pages fetched
    with one DMA each (page size, budget and fetch backend as :class:`PageConfig`)."""

    n_sink_pages: int = 0
    n_win_pages: int = 1
    dense_layers: int = 2


class QuestPolicy(PagePolicy):
    """Quest: per-query-head box bounds (max over the GQA group), top pages of the budget, first layers dense."""

    name = "quest"
    config_class = QuestConfig

    def selected_pages(self, n: int) -> int:
        """Top-k pages for a prompt of ``n`` tokens: the budget's pages minus the always-kept ones (at least 1)."""
        ps = self.config.page_size
        return max(1, -(-budget_tokens(self.config.budget, n) // ps) - self.config.n_win_pages)


__all__ = ["QuestConfig", "QuestPolicy"]
