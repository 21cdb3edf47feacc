"""The contrastive objectives: CACo, TeCo, SeCo and MoCo v2, as pure jit-able functions.

Shapes (S subspaces, N items in the global batch, n query rows on this device, D embedding width, K
queue length):

- ``z_q`` [S, n, D]: L2-normalised query embeddings, ``z_q[s]`` from query head s.
- ``z_k`` [S, S, N, D]: L2-normalised key embeddings of the whole (global) batch, ``z_k[s, v]`` =
  key head s applied to key view v (CACo/SeCo views: v = 0 time and augmentation differ, v = 1 time
  only, v = 2 augmentation only).
- ``queue``: CACo/TeCo [S, 2, K/2, D], ``queue[s, h]`` = queued subspace-s keys from window-h items;
  SeCo/MoCo [S, K, D].
- CACo/TeCo batch layout: rows 2l and 2l+1 are location l's early-window (h=0) and late-window (h=1)
  items (the official ``FirstSecondSampler``).

Each function returns ``(loss, metrics)``: the loss is the sum over subspaces of the mean
cross-entropy over the given query rows, metrics hold ``loss/subspace{s}`` and
``accuracy/subspace{s}`` (top-1 of the positive, a fraction in [0, 1]; the official log is a
percentage) for the same rows.

Data parallelism. Inside ``jax.shard_map`` pass this device's query rows (``z_q`` [S, n, D], and
``changed`` [n]) with keys all-gathered over the data axes (``z_k`` [S, S, N, D], global batch
order), and ``query_offset`` = the global row index of the first local query row (``axis_index *
n``; it must be even, and n even, so that both items of a location sit on one device). Every query
then sees the in-batch negatives of the whole batch, as in the official single-GPU code (its DDP
path would only see the local ones), and the ``pmean`` of the per-device losses over equal shards
equals the single-device loss. Keys and queue carry no gradient (``stop_gradient``), as in the
official code.

What the official code (``utkarshmall13/CACo``, ``src/models/moco2_module.py``) does, and we
reproduce:

- Positive of subspace s: key head s on key view s of the same item.
- CACo negatives of a window-h query, in the official column order: the queued keys from window-h
  items (the official queue alternates windows column by column: even columns hold early-window
  keys, odd columns late-window keys, because the pointer advances by the even batch size and row
  parity is the window; we hold the two halves explicitly); then s=0: the other-window items' k0;
  s=1: all items' k0, all items' k2, the other-window items' k1; s=2: all items' k0, all items' k1,
  the other-window items' k2. "All items" includes the query's own item and both windows.
- Change mask: in that last block (other-window items, ordered by location), the entry of the
  query's own location (its long-term partner, in subspace s's own view) is removed when the QUERY's
  item is not labelled changed. The official code adds -1e8 to that logit before dividing by the
  temperature; we set it to -inf after scaling (exactly zero probability in float32 and bfloat16,
  never a NaN: the positive is never masked). The same-location other-window k0/k2 (s=1) and k0/k1
  (s=2) in the all-items blocks are never masked. All three subspaces are masked.
- TeCo: the same negatives with no mask. The official TeCo puts the other-window block before the
  all-items blocks; that is a permutation of the negatives, so the loss is identical.
- SeCo: negatives = the whole subspace-s queue; for s > 0 then all items' keys of the other views in
  view order (s=1: k0, k2; s=2: k0, k1). MoCo v2 is SeCo with one subspace and one key view.
- Row order: the official CACo/TeCo stacks even rows then odd rows; the mean cross-entropy does not
  depend on row order, so we keep the batch order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Key views whose every item is a negative in subspace s (CACo, TeCo and SeCo), in column order.
ALL_ITEM_NEGATIVE_VIEWS = {0: (), 1: (0, 2), 2: (0, 1)}


def _accumulation_dtype(*arrays):
    """Logits are computed and reduced in at least float32 (bfloat16 inputs accumulate in f32)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _dot(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=_accumulation_dtype(a, b))


def _check_shapes(z_q, z_k, query_offset, *, num_subspaces=None, pairs=False):
    """Static checks; a traced ``query_offset`` is the caller's contract (documented above)."""
    if z_q.ndim != 3:
        raise ValueError(f"z_q must be [S, n, D], got shape {z_q.shape}")
    s, n, d = z_q.shape
    if num_subspaces is not None and s != num_subspaces:
        raise ValueError(f"z_q has {s} subspaces, this objective needs {num_subspaces}")
    if z_k.ndim != 4 or z_k.shape[:2] != (s, s) or z_k.shape[3] != d:
        raise ValueError(f"z_k must be [S, S, N, D] = [{s}, {s}, N, {d}], got shape {z_k.shape}")
    num_items = z_k.shape[2]
    if pairs and (n % 2 or num_items % 2):
        raise ValueError(
            f"CACo/TeCo rows come in location pairs: z_q rows ({n}) and z_k items ({num_items}) "
            "must be even"
        )
    if isinstance(query_offset, int) and not (
        0 <= query_offset <= num_items - n and (query_offset % 2 == 0 or not pairs)
    ):
        raise ValueError(
            f"query_offset {query_offset} does not place the {n} query rows inside the {num_items} "
            "key items" + (" at an even row" if pairs else "")
        )


def _local_rows(x, query_offset, n):
    """Rows [query_offset, query_offset + n) of x along axis 0 (query_offset may be traced)."""
    return jax.lax.dynamic_slice_in_dim(x, query_offset, n, axis=0)


def _cross_entropy_and_metrics(logits_per_subspace):
    """Column 0 is the positive. Returns (sum of mean losses, metrics)."""
    metrics = {}
    total = 0.0
    for s, logits in enumerate(logits_per_subspace):
        losses = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
        loss = jnp.mean(losses)
        total = total + loss
        metrics[f"loss/subspace{s}"] = loss
        # argmax returns the first maximum: a tie counts for the positive.
        metrics[f"accuracy/subspace{s}"] = jnp.mean(jnp.argmax(logits, axis=1) == 0)
    return total, metrics


def caco_logits(z_q, z_k, queue, changed, temperature, *, query_offset=0):
    """Per-subspace logits [n, 1 + K/2 + ...] in the official column order, removed entries = -inf.

    Column 0 is the positive. See the module docstring for shapes and the negative sets.
    """
    _check_shapes(z_q, z_k, query_offset, num_subspaces=3, pairs=True)
    num_subspaces, n, dim = z_q.shape
    num_items = z_k.shape[2]
    if queue.ndim != 4 or queue.shape[:2] != (num_subspaces, 2) or queue.shape[3] != dim:
        raise ValueError(f"queue must be [S, 2, K/2, D] = [3, 2, K/2, {dim}], got {queue.shape}")
    if changed.shape != (n,):
        raise ValueError(
            f"changed must be [n] = [{n}] (one label per query row), got {changed.shape}"
        )
    z_k = jax.lax.stop_gradient(z_k)
    queue = jax.lax.stop_gradient(queue)
    changed = changed.astype(bool)  # ~ on 0/1 integers would flip bits, not truth values

    # Query row 2l + h is (local location l, window h).
    pair_location = query_offset // 2 + jnp.arange(n // 2)  # global location of each local pair
    is_partner = pair_location[:, None, None] == jnp.arange(num_items // 2)[None, None, :]
    removed = is_partner & ~changed.reshape(n // 2, 2)[:, :, None]  # [n/2, 2, N/2]

    logits = []
    for s in range(num_subspaces):
        queries = z_q[s]
        queries_by_pair = queries.reshape(n // 2, 2, dim)
        positive = _dot("nd,nd->n", queries, _local_rows(z_k[s, s], query_offset, n))
        own_window_queue = _dot("lhd,hkd->lhk", queries_by_pair, queue[s]).reshape(n, -1)
        all_items = [_dot("nd,md->nm", queries, z_k[s, v]) for v in ALL_ITEM_NEGATIVE_VIEWS[s]]
        # other_window[m, h] = the own-view key of location m's item from the window that is not h.
        other_window = z_k[s, s].reshape(num_items // 2, 2, dim)[:, ::-1]
        long_term = _dot("lhd,mhd->lhm", queries_by_pair, other_window)
        long_term = jnp.where(removed, -jnp.inf, long_term / temperature).reshape(n, -1)
        scaled = [positive[:, None], own_window_queue, *all_items]
        scaled = jnp.concatenate(scaled, axis=1) / temperature
        logits.append(jnp.concatenate([scaled, long_term], axis=1))
    return logits


def caco_loss(z_q, z_k, queue, changed, temperature, *, query_offset=0):
    """CACo: window-aware queues, long-term negatives, and the change mask.

    Args:
      z_q: [3, n, D] query embeddings of this device's rows (rows 2l, 2l+1: a location's windows).
      z_k: [3, 3, N, D] key embeddings of the global batch, ``z_k[s, v]`` = key head s on view v.
      queue: [3, 2, K/2, D], ``queue[s, h]`` = queued subspace-s keys from window-h items.
      changed: [n] bool, the change label of each query row's item (the long-term partner is a
        negative only when True).
      temperature: softmax temperature (0.07).
      query_offset: global row index of z_q's first row in z_k (even; may be traced).

    Returns:
      (loss, metrics): sum over subspaces of the mean cross-entropy, per-subspace loss and accuracy.
    """
    return _cross_entropy_and_metrics(
        caco_logits(z_q, z_k, queue, changed, temperature, query_offset=query_offset)
    )


def teco_loss(z_q, z_k, queue, temperature, *, query_offset=0):
    """TeCo: CACo's structure with every long-term partner a negative (everything "changed")."""
    changed = jnp.ones((z_q.shape[1],), dtype=bool)
    return caco_loss(z_q, z_k, queue, changed, temperature, query_offset=query_offset)


def seco_logits(z_q, z_k, queue, temperature, *, query_offset=0):
    """Per-subspace SeCo logits [n, 1 + K + ...] in the official column order; column 0 positive."""
    _check_shapes(z_q, z_k, query_offset)
    num_subspaces, n, dim = z_q.shape
    if queue.ndim != 3 or queue.shape[0] != num_subspaces or queue.shape[2] != dim:
        raise ValueError(
            f"queue must be [S, K, D] = [{num_subspaces}, K, {dim}], got {queue.shape}"
        )
    z_k = jax.lax.stop_gradient(z_k)
    queue = jax.lax.stop_gradient(queue)
    logits = []
    for s in range(num_subspaces):
        queries = z_q[s]
        positive = _dot("nd,nd->n", queries, _local_rows(z_k[s, s], query_offset, n))
        negatives = [_dot("nd,kd->nk", queries, queue[s])]
        negatives += [
            _dot("nd,md->nm", queries, z_k[s, v]) for v in range(num_subspaces) if v != s and s > 0
        ]
        logits.append(jnp.concatenate([positive[:, None], *negatives], axis=1) / temperature)
    return logits


def seco_loss(z_q, z_k, queue, temperature, *, query_offset=0):
    """SeCo: three subspaces, one queue [3, K, D] each, other views of every item as negatives.

    Shapes as ``caco_loss`` except ``queue`` [3, K, D]; no window structure and no change mask.
    """
    if z_q.shape[0] != 3:
        raise ValueError(f"seco_loss needs 3 subspaces, z_q has shape {z_q.shape}")
    return _cross_entropy_and_metrics(
        seco_logits(z_q, z_k, queue, temperature, query_offset=query_offset)
    )


def moco_loss(z_q, z_k, queue, temperature, *, query_offset=0):
    """MoCo v2 (one subspace): positive = the other augmented view, negatives = the queue only.

    Shapes keep the subspace axes so that every objective takes the same arguments:
    ``z_q`` [1, n, D], ``z_k`` [1, 1, N, D], ``queue`` [1, K, D]. In-batch keys are not negatives
    here, so ``z_k`` may also hold just the local rows (then ``query_offset`` = 0).
    """
    if z_q.shape[0] != 1:
        raise ValueError(f"moco_loss needs 1 subspace: z_q [1, n, D], got shape {z_q.shape}")
    return _cross_entropy_and_metrics(
        seco_logits(z_q, z_k, queue, temperature, query_offset=query_offset)
    )


def _per_window_loss(z_q, z_k, queue, labels, temperature, query_offset):
    # Without a change estimate (TeCo) every long-term partner is a negative.
    changed = jnp.ones((z_q.shape[1],), dtype=bool) if labels is None else labels
    return caco_loss(z_q, z_k, queue, changed, temperature, query_offset=query_offset)


def _single_queue_loss(z_q, z_k, queue, labels, temperature, query_offset):
    del labels  # no long-term partners, nothing to mask
    return _cross_entropy_and_metrics(
        seco_logits(z_q, z_k, queue, temperature, query_offset=query_offset)
    )


# `methods.Method.queue` -> its objective (z_q, z_k, queue, labels | None, temperature,
# query_offset) -> (loss, metrics); ``labels`` [n] are the change labels of the query rows' items,
# None for a method without a change estimate. Per window: `caco_loss` (TeCo: `teco_loss`);
# single: `seco_loss` or `moco_loss` by the number of subspaces.
LOSSES = {"per_window": _per_window_loss, "single": _single_queue_loss}
