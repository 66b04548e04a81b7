"""Training losses as the papers write them: small pure functions over tensors.

Each names its paper and equation, and spells out its steps with shapes.
"""

import torch
import torch.nn.functional as F


def ranking_loss(rewards, ranks, groups):
    """InstructGPT's reward-model loss over K-way rankings (Ouyang et al. 2022, eq. 1):

        loss(theta) = -1 / C(K, 2) * E_{(x, y_w, y_l) ~ D} [ log sigmoid(r(x, y_w) - r(x, y_l)) ]

    Every ranking (one prompt's K completions ranked by one labeler) is one batch
    element: all its pairs with different ranks (ties dropped) are averaged within
    it, so a prompt with a large K does not dominate, then the elements are averaged.

    rewards (N,) scores of all completions in the batch; ranks (N,) each completion's
    rank within its ranking (0 best, ties share a rank); groups (N,) which ranking
    (0..G-1) each completion belongs to. Returns (loss (), margins (P,)): the mean
    loss, and r_better - r_worse of every pair (accuracy is the share above 0)."""
    # 1. Pairs: i better than j within the same ranking; ties (equal ranks) are no pair.
    same = groups[:, None] == groups[None, :]  # (N, N)
    better = ranks[:, None] < ranks[None, :]  # (N, N)
    i, j = (same & better).nonzero(as_tuple=True)  # (P,), (P,)
    # 2. Reward margin of each pair: r(x, y_w) - r(x, y_l).
    margins = rewards[i] - rewards[j]  # (P,)
    # 3. Per-pair loss: -log sigmoid(margin).
    pair_loss = -F.logsigmoid(margins.float())  # (P,)
    # 4. Mean over each ranking's pairs (the 1 / C(K, 2), counting only untied pairs).
    G = int(groups.max()) + 1
    g = groups[i]  # (P,) the ranking each pair came from
    per_group = torch.zeros(G, device=rewards.device).index_add(0, g, pair_loss)  # (G,)
    n_pairs = torch.bincount(g, minlength=G)  # (G,)
    has = n_pairs > 0  # rankings with at least one untied pair
    # 5. Mean over the rankings of the batch.
    loss = (per_group[has] / n_pairs[has]).mean()  # ()
    return loss, margins
