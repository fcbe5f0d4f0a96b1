"""The multi-stream model: CTR-GCN streams over joints, bones and their motions, fused into one score.

``MultiStream`` takes normalised joints ``(N, 3, T, 25, M)`` (what the features stage stores as the
joint stream, and what the server produces from a client's clip) and derives the other streams inside
the module with the shared feature math (:mod:`models.features`), so training, evaluation, export and
serving cannot drift apart. The classic two-stream model is ``streams=("joint", "bone")``; the
4-stream ensemble adds ``joint_motion`` and ``bone_motion``.

Fusions:

- ``sum`` (default): weighted sum of the streams' class scores (logits), as the CTR-GCN/2s-AGCN
  ensembles do. No parameters to learn.
- ``concat``: the streams' pooled features concatenated, then one linear classifier (learned).
- ``attention``: a learned gate (softmax over streams, per sample) from the concatenated features
  weighs the streams' scores.

The learned fusions are fitted on frozen streams (:func:`fit_fusion_head`).
"""

from __future__ import annotations

import torch
from torch import nn

from models import features
from models.ctrgcn import CTRGCN, CTRGCNConfig
from models.skeleton import NUM_JOINTS

FUSIONS = ("sum", "concat", "attention")


def stream_input(joints: torch.Tensor, stream: str, num_persons: int) -> torch.Tensor:
    """The named stream of folded joints ``(N, C, T, V*M)`` (see :data:`models.features.STREAMS`)."""
    if stream not in features.STREAMS:
        raise ValueError(f"unknown stream {stream!r}; valid: {', '.join(features.STREAMS)}")
    x = features.bones_folded(joints, num_persons) if stream.startswith("bone") else joints
    return features.motion_folded(x) if stream.endswith("_motion") else x


class MultiStream(nn.Module):
    """Joints ``(N, 3, T, 25, M)`` -> fused class scores ``(N, K)``; ``per_stream`` gives each stream's too.

    ``weights`` are the score-sum weights (one per stream, fusion ``sum``); they are a buffer, so they
    travel with the state dict and the exported graph.
    """

    def __init__(
        self,
        configs: dict[str, CTRGCNConfig],
        fusion: str = "sum",
        weights: dict[str, float] | None = None,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
        for name in configs:
            if name not in features.STREAMS:
                raise ValueError(f"unknown stream {name!r}; valid: {', '.join(features.STREAMS)}")
        classes = {c.num_classes for c in configs.values()}
        if len(classes) != 1:
            raise ValueError(f"streams disagree on the number of classes: {sorted(classes)}")
        self.names = tuple(configs)
        self.fusion = fusion
        self.streams = nn.ModuleDict({name: CTRGCN(cfg) for name, cfg in configs.items()})
        weights = weights or {}
        self.register_buffer("weights", torch.tensor([float(weights.get(n, 1.0)) for n in self.names]))
        num_classes = classes.pop()
        feature_dim = sum(m.feature_dim for m in self.streams.values())
        self.head = None
        if fusion == "concat":
            self.head = nn.Linear(feature_dim, num_classes)
        elif fusion == "attention":
            self.head = nn.Linear(feature_dim, len(self.names))

    def per_stream(self, joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(S, N, K)`` of each stream and pooled features ``(N, sum of feature dims)``."""
        folded = features.fold(joints)  # N, C, T, V*M
        m = joints.shape[-1]
        feats = [
            self.streams[n].features_folded(stream_input(folded, n, m)) for n in self.names
        ]  # S x (N, F)
        scores = torch.stack([self.streams[n].fc(f) for n, f in zip(self.names, feats, strict=True)])
        return scores, torch.cat(feats, dim=1)

    def fuse(self, scores: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Fused scores ``(N, K)`` from per-stream scores ``(S, N, K)`` and features ``(N, F)``."""
        if self.fusion == "concat":
            return self.head(feats)
        if self.fusion == "attention":
            gate = torch.softmax(self.head(feats), dim=1)  # N, S
            return (scores * gate.t().unsqueeze(2)).sum(0)  # N, K
        return (scores * self.weights.view(-1, 1, 1)).sum(0)  # N, K

    def forward(self, joints: torch.Tensor) -> torch.Tensor:
        scores, feats = self.per_stream(joints)
        return self.fuse(scores, feats)


class SoloStreams(nn.Module):
    """A trained :class:`MultiStream` for clips whose later person slots are empty: the same scores
    from one person's work instead of ``M``'s.

    Takes joints ``(N, 3, frames, 25, 1)`` (person 1) and returns the fused scores the full model
    gives that clip with the other slots all zeros, as the pipeline stores a one-person sample and
    as every one-person action of NTU arrives. Every layer of a stream treats the persons
    separately until their pooled features are averaged, and an absent person's input is zeros, so
    its pooled features are a constant for a given number of frames: computed once here (eval mode,
    so ``model``'s BN statistics are frozen) and added back. Only valid for ``frames`` frames, the
    window the loader samples; inference only.
    """

    def __init__(self, model: MultiStream, frames: int):
        super().__init__()
        self.model = model.eval()
        self.frames = frames
        persons = {m.cfg.num_persons for m in model.streams.values()}
        if len(persons) != 1:
            raise ValueError(f"streams disagree on the number of persons: {sorted(persons)}")
        self.persons = persons.pop()
        with torch.no_grad():
            zeros = features.fold(torch.zeros(1, 3, frames, NUM_JOINTS, self.persons))
            absent = [
                model.streams[n].person_features_folded(stream_input(zeros, n, self.persons))[0, 1:].sum(0)
                for n in model.names
            ]  # S x (F,): the absent slots' pooled features, summed
        self.register_buffer("absent", torch.cat(absent))

    def forward(self, person: torch.Tensor) -> torch.Tensor:
        folded = features.fold(person)  # N, C, T, V
        feats, start = [], 0
        for name in self.model.names:
            stream = self.model.streams[name]
            own = stream.person_features_folded(stream_input(folded, name, 1))[:, 0]  # N, F
            absent = self.absent[start : start + stream.feature_dim]
            feats.append((own + absent) / self.persons)
            start += stream.feature_dim
        names = self.model.names
        scores = torch.stack([self.model.streams[n].fc(f) for n, f in zip(names, feats, strict=True)])
        return self.model.fuse(scores, torch.cat(feats, dim=1))


def fit_fusion_head(
    model: MultiStream,
    scores: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> list[float]:
    """Fit the learned fusion head on frozen streams' ``scores (S, N, K)`` and ``feats (N, F)``.

    Full-batch AdamW on cross-entropy (the inputs are precomputed, so this takes seconds); returns the
    loss per epoch. Does nothing for ``sum`` fusion.
    """
    if model.head is None:
        return []
    # Outputs of a torch.inference_mode pass (evaluate's, finetune_video's) are inference tensors,
    # which autograd cannot save for the backward pass: their clones are ordinary tensors.
    scores, feats = scores.clone(), feats.clone()
    torch.manual_seed(seed)
    nn.init.normal_(model.head.weight, 0, 0.01)
    nn.init.zeros_(model.head.bias)
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    model.head.train()
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model.fuse(scores, feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
