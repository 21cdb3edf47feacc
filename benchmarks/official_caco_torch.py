"""The official CACo training step in PyTorch, rebuilt for timing it next to caco_jax's.

Follows `MocoV2` of utkarshmall13/CACo ``src/models/moco2_module.py`` with the change-aware data
module (``ChangeAwareContrastMultiAugDataModule``) on one GPU, operation for operation:

- query and key encoders: a torchvision ResNet without its ``fc``, flattened; the key encoder a
  copy of the query encoder, updated by EMA (``_momentum_update_key_encoder``, one parameter at a
  time) at the start of every forward;
- three projection heads per side (``Linear(d, d) - ReLU - Linear(d, emb_dim)``), the key heads an
  EMA copy too; one queue of ``num_negatives`` keys per subspace;
- for each subspace ``i``: the query projection, the key projections of all three key views by key
  head ``i``; for ``i = 1`` the change estimate (two more key-encoder forwards: of the query view
  and of the second key view), copied to the host and folded into the per-item running values with
  the official Python loop (factor 4); the positives and negatives split by window (even/odd
  items), the negatives = the queue's columns of that window plus the subspace's in-batch keys in
  the official order, the partner's logit pushed to -1e8 where the change weight is 0 (a float64
  matrix built on the host, as in the official code, which promotes those logits to float64), the
  logits over the temperature, then dequeue and enqueue;
- the loss: the sum of the three cross-entropies; top-1 accuracy per subspace; SGD with momentum
  and weight decay on the query encoder and heads.

The batch arrives on the device already augmented: the official code augments on the host in its
DataLoader workers, which is not part of the step. What the official step does on the host (the
change values, the weight matrices, Python loops over a device tensor) is kept, as it is part of
what one official step costs.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

MINUSINF = -100000000  # the official module's constant


def encoder_without_head(resnet: nn.Module) -> nn.Module:
    """A torchvision ResNet minus its ``fc``, flattened: the official encoder_q / encoder_k."""
    return nn.Sequential(*list(resnet.children())[:-1], nn.Flatten())


class OfficialCaco(nn.Module):
    """`MocoV2` with three embedding spaces, as the official CACo pretraining runs it."""

    def __init__(
        self,
        make_resnet,
        feature_dim: int,
        *,
        num_items: int,
        emb_dim: int = 128,
        num_negatives: int = 16384,
        emb_spaces: int = 3,
        temperature: float = 0.07,
        encoder_momentum: float = 0.999,
    ):
        super().__init__()
        self.emb_spaces, self.num_negatives = emb_spaces, num_negatives
        self.temperature, self.encoder_momentum = temperature, encoder_momentum
        self.encoder_q = encoder_without_head(make_resnet())
        self.encoder_k = encoder_without_head(make_resnet())
        self.heads_q = nn.ModuleList(self._head(feature_dim, emb_dim) for _ in range(emb_spaces))
        self.heads_k = nn.ModuleList(self._head(feature_dim, emb_dim) for _ in range(emb_spaces))
        for source, copy in ((self.encoder_q, self.encoder_k), (self.heads_q, self.heads_k)):
            for param_q, param_k in zip(source.parameters(), copy.parameters(), strict=True):
                param_k.data.copy_(param_q.data)
                param_k.requires_grad = False
        self.register_buffer(
            "queue", F.normalize(torch.randn(emb_spaces, emb_dim, num_negatives), dim=1)
        )
        self.register_buffer("queue_ptr", torch.zeros(emb_spaces, 1, dtype=torch.long))
        # The data module's per-item change values (long-term, short-term, ratio) and counts.
        self.change_values = np.zeros((num_items, 3))
        self.change_counts = np.zeros(num_items)

    @staticmethod
    def _head(feature_dim, emb_dim):
        return nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, emb_dim)
        )

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        em = self.encoder_momentum
        for source, copy in ((self.encoder_q, self.encoder_k), (self.heads_q, self.heads_k)):
            for param_q, param_k in zip(source.parameters(), copy.parameters(), strict=True):
                param_k.data = param_k.data * em + param_q.data * (1.0 - em)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys, queue_idx):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr[queue_idx])
        assert self.num_negatives % batch_size == 0
        self.queue[queue_idx, :, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[queue_idx] = (ptr + batch_size) % self.num_negatives

    @torch.no_grad()
    def _update_change(self, img_q, img_k1, inds):
        l_q = F.normalize(self.heads_k[1](self.encoder_k(img_q)), dim=1)
        l_k = F.normalize(self.heads_k[1](self.encoder_k(img_k1)), dim=1)
        # The other item of the same location (items come in pairs: one per window).
        zlt = torch.flip(l_q.view(-1, 2, l_q.size(1)), (1,)).view(l_q.size(0), l_q.size(1))
        short = torch.sqrt(torch.sum((l_q - l_k) * (l_q - l_k), dim=1)).cpu().numpy()
        long = torch.sqrt(torch.sum((l_q - zlt) * (l_q - zlt), dim=1)).cpu().numpy()
        ratios = long / (short + 0.0001)
        factor = 4
        for ind, diff_short, diff_long, ratio in zip(inds, short, long, ratios, strict=True):
            total = self.change_values[ind][:] * factor + np.array([diff_long, diff_short, ratio])
            self.change_values[ind] = total / (self.change_counts[ind] * factor + 1)
            self.change_counts[ind] = 1

    def forward(self, img_q, img_k, mmweights, inds):
        """(logits per subspace, targets) as the official forward returns them."""
        self._momentum_update_key_encoder()
        v_q = self.encoder_q(img_q)
        with torch.no_grad():
            v_k = [self.encoder_k(img_k[i]) for i in range(self.emb_spaces)]
        logits = []
        for i in range(self.emb_spaces):
            z_q = F.normalize(self.heads_q[i](v_q), dim=1)
            with torch.no_grad():
                z_k = [F.normalize(self.heads_k[i](v), dim=1) for v in v_k]
            if i == 1:
                self._update_change(img_q, img_k[1], inds)
            logits.append(self._subspace_logits(i, z_q, z_k, mmweights))
            self._dequeue_and_enqueue(z_k[i], queue_idx=i)
        targets = torch.zeros(logits[0].shape[0], dtype=torch.long, device=logits[0].device)
        return logits, targets

    def _subspace_logits(self, i, z_q, z_k, mmweights):
        z_pos = (z_k[i][0::2], z_k[i][1::2])
        z_qs = (z_q[0::2], z_q[1::2])
        queue = self.queue[i].clone().detach()
        # Subspace 0's negatives hold no keys of the other subspaces, as in the official code.
        others = [z_k[j].T for j in range(self.emb_spaces) if j != i] if i > 0 else []
        l_pos, l_neg = [], []
        for window in (0, 1):
            partner = z_k[i][1 - window :: 2].T  # the same location's item of the other window
            z_neg = torch.cat([queue[:, window::2], *others, partner], dim=1)
            half = z_pos[window].size(0)
            weights = np.zeros((half, half))
            for ind, mmweight in enumerate(mmweights[window::2]):
                if mmweight == 0:  # changed location: its partner is no negative
                    weights[ind, ind] = MINUSINF
            weights = np.concatenate([np.zeros((half, z_neg.size(1) - half)), weights], axis=1)
            weights = torch.from_numpy(weights).to(z_pos[window].device)
            l_pos.append(torch.einsum("nc,nc->n", z_qs[window], z_pos[window]).unsqueeze(-1))
            l_neg.append(torch.einsum("nc,ck->nk", z_qs[window], z_neg) + weights)
        lcat = torch.cat([torch.cat(l_pos, dim=0), torch.cat(l_neg, dim=0)], dim=1)
        return lcat / self.temperature

    def optimizer(self, learning_rate=0.03, momentum=0.9, weight_decay=1e-4):
        params = itertools.chain(self.encoder_q.parameters(), self.heads_q.parameters())
        return torch.optim.SGD(params, learning_rate, momentum=momentum, weight_decay=weight_decay)


def training_step(model: OfficialCaco, optimizer, batch, autocast_dtype=None):
    """One official step: forward, summed cross-entropies, backward, SGD. Returns (loss, accs)."""
    img_q, img_k, mmweights, inds = batch
    device_type = img_q.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output, target = model(img_q, img_k, mmweights, inds)
        losses = [F.cross_entropy(out.float(), target) for out in output]
        loss = torch.sum(torch.stack(losses))
    accuracies = [(out.argmax(dim=1) == target).float().mean() for out in output]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss, accuracies


def random_batch(batch_size: int, crop: int, device, seed: int = 0):
    """Already-augmented views (query, three keys), change weights and item indices on ``device``.

    Half the locations are marked changed (weight 0), as the official data module marks them.
    """
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch_size, 3, crop, crop, generator=generator) for _ in range(4)]
    mmweights = (torch.arange(batch_size) // 2 % 2).to(torch.long)
    inds = torch.arange(batch_size)
    moved = [view.to(device) for view in views]
    return moved[0], moved[1:], mmweights.to(device), inds.to(device)
