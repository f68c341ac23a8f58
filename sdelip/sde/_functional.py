"""Batched functional gradients over trajectories and samples (torch.func).

The SDE systems of :mod:`sdelip.sde` keep a batch of flattened parameter vectors, one
per simulated trajectory, instead of deep copies of the model. This module maps that
state to parameter dictionaries (:class:`ParamLayout`), draws data
(:class:`DataSource`) and evaluates, at every trajectory's own parameters,

- the expected gradient ∇L(θ) (the drift of Def 4, THEORY.md §5), on the whole
  training set when it is small or on an independent large batch, and
- the per-sample gradients g_i = ∇ℓ(θ; x_i, y_i) of a fresh mini-batch of M samples
  (the gradient noise of Prop 5, THEORY.md §2),

with ``functional_call`` + ``vmap(grad)`` over samples and ``vmap`` over trajectories
(:class:`ModelGradients`).

Cost of one evaluation for n trajectories, P parameters, mini-batch M and N samples
for the expected gradient: n·M per-sample forward/backward passes plus n·N batched
ones, and O(n·M·P) memory for the per-sample gradients (chunk the trajectories with
``traj_chunk`` and the data with ``data_chunk`` to bound it).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import attrs
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..layers import TrackedLayer
from ..rules.attention import vmap_safe_attention

__all__ = ["ParamSpec", "ParamBlock", "ParamLayout", "DataSource", "GradientEstimate", "ModelGradients",
           "activation_numel"]


@attrs.frozen
class ParamSpec:
    """One trainable parameter inside the flattened state vector.

    Attributes:
        name: parameter name as in ``model.named_parameters()``.
        shape: its shape.
        start, stop: its slice of the flattened vector (row-major flattening).
        block: index of the :class:`ParamBlock` it belongs to.
    """

    name: str
    shape: torch.Size
    start: int
    stop: int
    block: int


@attrs.frozen
class ParamBlock:
    """The parameters of one module, driven by one M-dimensional Brownian motion.

    Assumption 3 makes the gradient noise block-diagonal across layers; a tracked
    layer's weight and bias share the layer's block (the same per-sample rows drive
    both, which is the exact joint noise of the two).

    Attributes:
        module: module path ('' for the root module).
        params: the names of its trainable parameters.
        start, stop: the block's contiguous slice of the flattened state.
        layer: index of the (first) tracked layer whose weight the module holds, else None.
    """

    module: str
    params: tuple
    start: int
    stop: int
    layer: Optional[int]


class ParamLayout:
    """Maps a model's trainable parameters to and from a flat vector (per trajectory).

    Parameters are ordered block by block (one block per owning module, in
    ``named_parameters`` order), so every block is a contiguous slice.

    Args:
        model: the network.
        layers: its tracked layers (:func:`sdelip.tracked_layers`).
    """

    def __init__(self, model: nn.Module, layers: Sequence[TrackedLayer]):
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        owners: Dict[str, list] = {}
        for name, p in trainable:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            owners.setdefault(owner, []).append((name, p))
        self.weight_names = [layer.parameter_name for layer in layers]
        owner_of = {wn: (wn.rsplit(".", 1)[0] if "." in wn else "") for wn in self.weight_names}
        layer_index: Dict[str, int] = {}
        for i, wn in enumerate(self.weight_names):
            layer_index.setdefault(owner_of[wn], i)
        specs, blocks, offset = [], [], 0
        for owner, plist in owners.items():
            start = offset
            for name, p in plist:
                specs.append(ParamSpec(name, p.shape, offset, offset + p.numel(), len(blocks)))
                offset += p.numel()
            blocks.append(ParamBlock(owner, tuple(n for n, _ in plist), start, offset, layer_index.get(owner)))
        names = {s.name for s in specs}
        for wn in self.weight_names:
            if wn not in names:
                raise ValueError(f"tracked weight {wn!r} is not a trainable parameter of the model")
        self.specs: list = specs
        self.blocks: list = blocks
        block_of = {owner: b for b, owner in enumerate(owners)}
        #: the noise block of each tracked layer (the block of the module holding its weight)
        self.layer_blocks: list = [block_of[owner_of[wn]] for wn in self.weight_names]
        self.size: int = offset
        self._by_name = {s.name: s for s in specs}
        self.frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}

    def __getitem__(self, name: str) -> ParamSpec:
        return self._by_name[name]

    def flatten_model(self, model: nn.Module) -> torch.Tensor:
        """The model's current trainable parameters as one detached vector (P,)."""
        params = dict(model.named_parameters())
        return torch.cat([params[s.name].detach().reshape(-1) for s in self.specs])

    def unflatten(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split (..., P) into {name: (..., *shape)} views."""
        lead = theta.shape[:-1]
        return {s.name: theta[..., s.start : s.stop].reshape(*lead, *s.shape) for s in self.specs}

    def flatten(self, tensors: Dict[str, torch.Tensor], lead: int = 1) -> torch.Tensor:
        """Concatenate {name: (*lead_dims, *shape)} into (*lead_dims, P); ``lead`` leading dims."""
        parts = []
        for s in self.specs:
            x = tensors[s.name]
            parts.append(x.reshape(*x.shape[:lead], -1))
        return torch.cat(parts, -1)


def _split_xy(batch):
    if isinstance(batch, dict):
        raise TypeError("data batches must be (inputs, targets) pairs, got a dict")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"data batches must be (inputs, targets) pairs, got {type(batch).__name__}")
    return batch[0], batch[1]


class DataSource:
    """Draws i.i.d. samples from a training set, reproducibly.

    Samples are drawn with replacement (i.i.d., as the CLT behind Def 4 and Prop 5
    assumes: Σ = Var[g]/M exactly), from an own seeded generator, so the loader's
    shuffling plays no part. A map-style dataset with at most ``max_cached`` samples
    is materialised once as tensors (random augmentations are then frozen); larger
    ones are indexed and collated per draw; an iterable dataset is read in order.

    Args:
        data: a ``DataLoader``, a map-style ``Dataset`` of (x, y) pairs, or a tuple
            (X, Y) of tensors with the samples along dimension 0.
        max_cached: largest dataset materialised in memory.
        seed: seed of the sampling generator.
    """

    def __init__(self, data, max_cached: int = 50_000, seed: int = 0):
        self.batch_size: Optional[int] = None
        self._loader = None
        self._iter = None
        self._collate = torch.utils.data.default_collate
        self._X = self._Y = None
        self._dataset = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            X, Y = data
            if len(X) != len(Y):
                raise ValueError(f"X and Y have {len(X)} and {len(Y)} samples")
            self._X, self._Y = X, Y
        else:
            if isinstance(data, torch.utils.data.DataLoader):
                self._loader = data
                self.batch_size = data.batch_size
                if data.collate_fn is not None:
                    self._collate = data.collate_fn
                dataset = data.dataset
            else:
                dataset = data
            iterable = isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__")
            if iterable:
                if self._loader is None:
                    raise TypeError("an iterable dataset must be passed as a DataLoader")
            else:
                self._dataset = dataset
                if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2:
                    self._X, self._Y = dataset.tensors
                elif len(dataset) <= max_cached:
                    self._X, self._Y = _split_xy(self._collate_indices(range(len(dataset))))
                    self._dataset = None
        self._gen = torch.Generator()
        self.reseed(seed)
        self._device_cache: dict = {}

    def reseed(self, seed: int) -> None:
        """Restart the sampling generator from ``seed``."""
        self._gen.manual_seed(int(seed) % (1 << 63))

    def __len__(self) -> int:
        if self._X is not None:
            return len(self._X)
        if self._dataset is not None:
            return len(self._dataset)
        raise TypeError("the number of samples of an iterable dataset is unknown")

    @property
    def sized(self) -> bool:
        return self._X is not None or self._dataset is not None

    def _collate_indices(self, idx):
        ds = self._dataset if self._dataset is not None else self._loader.dataset
        idx = list(idx)
        items = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
        return self._collate(items)

    def _on(self, X, Y, device, dtype):
        X = X.to(device)
        if X.is_floating_point() and dtype is not None:
            X = X.to(dtype)
        return X, Y.to(device)

    def full(self, device=None, dtype=None):
        """The whole training set (X, Y) on ``device`` (None if it is not materialised)."""
        if self._X is None:
            return None
        key = (str(device), dtype)
        if key not in self._device_cache:
            self._device_cache = {key: self._on(self._X, self._Y, device, dtype)}
        return self._device_cache[key]

    def example(self, device=None, dtype=None):
        """One sample (x[None], y[None]) for shapes, without advancing the sampling generator."""
        if self._X is not None:
            X, Y = self._X[:1], self._Y[:1]
        elif self._dataset is not None:
            X, Y = _split_xy(self._collate_indices([0]))
        else:
            X, Y = _split_xy(next(iter(self._loader)))
            X, Y = X[:1], Y[:1]
        return self._on(X, Y, device, dtype)

    def sample(self, M: int, n: Optional[int] = None, device=None, dtype=None):
        """M i.i.d. samples (leading shape (M,)), or n independent sets (n, M).

        Args:
            M: samples per set.
            n: number of independent sets, or None for one set.
            device, dtype: where to put the inputs (floating inputs are cast to dtype).
        """
        shape = (M,) if n is None else (n, M)
        total = M if n is None else n * M
        if self.sized:
            idx = torch.randint(len(self), (total,), generator=self._gen)
            if self._X is not None:
                X, Y = self._X[idx], self._Y[idx]
            else:
                X, Y = _split_xy(self._collate_indices(idx.tolist()))
        else:
            xs, ys, got, fresh = [], [], 0, False
            while got < total:
                if self._iter is None:
                    self._iter, fresh = iter(self._loader), True
                try:
                    xb, yb = _split_xy(next(self._iter))
                except StopIteration:
                    self._iter = None
                    if fresh:
                        raise ValueError("the data loader yields no batches") from None
                    continue
                fresh = False
                xs.append(xb)
                ys.append(yb)
                got += len(xb)
            X, Y = torch.cat(xs)[:total], torch.cat(ys)[:total]
        X = X.reshape(*shape, *X.shape[1:])
        Y = Y.reshape(*shape, *Y.shape[1:])
        return self._on(X, Y, device, dtype)


@attrs.frozen
class GradientEstimate:
    """Gradients at every trajectory's parameters.

    Attributes:
        grad: {name: (n, *shape)} the expected gradient ∇L(θ) (drift, THEORY.md §5).
        per_sample: {name: (n, M, *shape)} per-sample gradients of a fresh mini-batch
            (Prop 5); tensors may be expanded views.
    """

    grad: Dict[str, torch.Tensor]
    per_sample: Dict[str, torch.Tensor]


def activation_numel(model: nn.Module, params: Dict[str, torch.Tensor], consts: Dict[str, torch.Tensor],
                     x1: torch.Tensor) -> int:
    """Numbers in the input and every leaf module's output for one sample x1 (1, …).

    An estimate of the activations a forward pass keeps per sample, for memory budgets.
    """
    total = [x1[0].numel()]

    def count(mod, inp, out):
        if isinstance(out, torch.Tensor):
            total.append(out[0].numel() if out.ndim else 1)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            functional_call(model, {**consts, **params}, (x1,))
    finally:
        for h in handles:
            h.remove()
    return int(sum(total))


def _couples_samples(model: nn.Module) -> bool:
    from ..engines import coupling_modules

    return bool(coupling_modules(model))


class ModelGradients:
    """Expected and per-sample gradients of a model at a batch of parameter vectors.

    Args:
        model: the network (its trainable parameters are replaced functionally; the
            module itself is never modified).
        layout: the :class:`ParamLayout` of the state.
        data: the :class:`DataSource` of the training set.
        loss_fn: ``loss_fn(output, target)`` returning the *mean* loss over the batch
            (default ``torch.nn.functional.cross_entropy``).
        noise_batch_size: M, the mini-batch size of the noise (≥ 2, Prop 5).
        grad_source: ``"full"`` (the whole training set), ``"batch"`` (an independent
            batch of ``grad_batch_size`` samples per evaluation) or ``"auto"`` (full when
            the training set has at most ``full_max`` samples).
        full_max: threshold of ``"auto"``.
        grad_batch_size: size of the independent batch.
        shared_noise_batch: one noise mini-batch for all trajectories of an evaluation
            (cheaper to draw; the trajectories' diffusion estimates are then correlated)
            instead of one per trajectory (default).
        traj_chunk: trajectories per vmapped call (None: all at once).
        data_chunk: samples per vmapped call of the expected gradient.

    Raises:
        NotImplementedError: the model has a BatchNorm layer in training mode, whose
            per-sample losses are coupled through the batch statistics (THEORY.md §6).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        data: DataSource,
        loss_fn: Optional[Callable] = None,
        noise_batch_size: int = 32,
        grad_source: str = "auto",
        full_max: int = 10_000,
        grad_batch_size: int = 4096,
        shared_noise_batch: bool = False,
        traj_chunk: Optional[int] = None,
        data_chunk: int = 4096,
    ):
        if _couples_samples(model):
            raise NotImplementedError(
                "BatchNorm in training mode couples the per-sample losses through the batch statistics "
                "(THEORY.md §6); per-sample gradients by vmap do not apply. Use model.eval() for BatchNorm "
                "layers or a model without them"
            )
        if grad_source not in ("auto", "full", "batch"):
            raise ValueError(f"grad_source must be 'auto', 'full' or 'batch', got {grad_source!r}")
        if grad_source == "auto":
            grad_source = "full" if data.sized and len(data) <= full_max and data.full() is not None else "batch"
        if grad_source == "full" and data.full() is None:
            raise ValueError("grad_source='full' needs a map-style training set small enough to materialise")
        self.model = model
        self.layout = layout
        self.data = data
        self.loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.M = int(noise_batch_size)
        if self.M < 2:
            raise ValueError(f"the noise mini-batch needs M >= 2 samples (Prop 5 divides by M − 1), got {self.M}")
        self.grad_source = grad_source
        self.grad_batch_size = int(grad_batch_size)
        self.shared_noise_batch = bool(shared_noise_batch)
        self.traj_chunk = traj_chunk
        self.data_chunk = int(data_chunk)

        loss_fn_ = self.loss_fn
        self._consts: Dict[str, torch.Tensor] = {}

        def batch_loss(p, x, y):
            return loss_fn_(functional_call(model, {**self._consts, **p}, (x,)), y)

        def sample_loss(p, x, y):
            return batch_loss(p, x.unsqueeze(0), y.unsqueeze(0))

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
        in_xy = None if self.shared_noise_batch else 0
        self._per_sample = vmap(per_sample, in_dims=(0, in_xy, in_xy), randomness="different")
        self._batch_grad = vmap(grad(batch_loss), in_dims=(0, None, None), randomness="different")
        self._batch_grad_each = vmap(grad(batch_loss), in_dims=(0, 0, 0), randomness="different")

    def consts(self, ref: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Frozen parameters and buffers, read now (the model may have moved device) and cast to ref's dtype."""
        self._refresh_consts(ref)
        return self._consts

    def _refresh_consts(self, ref: torch.Tensor) -> None:
        consts = {n: p for n, p in self.model.named_parameters() if not p.requires_grad}
        consts.update(dict(self.model.named_buffers()))
        self._consts = {
            k: v.detach().to(device=ref.device, dtype=ref.dtype if v.is_floating_point() else v.dtype)
            for k, v in consts.items()
        }

    def expected_gradient(self, params: Dict[str, torch.Tensor], traj_chunk: Optional[int] = None,
                          data_chunk: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """∇L at each trajectory's parameters ({name: (n, *shape)}).

        ``grad_source="full"``: the mean gradient over the whole training set (the same for
        every evaluation). ``"batch"``: over an independent batch of ``grad_batch_size``
        samples drawn for each trajectory (trajectories stay independent). ``traj_chunk``
        bounds the trajectories per batched call (the constructor's ``traj_chunk`` wins),
        ``data_chunk`` the samples per call (at most the constructor's).
        """
        ref = next(iter(params.values()))
        self._refresh_consts(ref)
        chunk = self.traj_chunk if self.traj_chunk is not None else traj_chunk
        rows = self.data_chunk if data_chunk is None else max(1, min(int(data_chunk), self.data_chunk))
        if self.grad_source == "full":
            X, Y = self.data.full(device=ref.device, dtype=ref.dtype)
            return self._mean_gradient(params, X, Y, False, chunk, rows)
        n = ref.shape[0]
        X, Y = self.data.sample(self.grad_batch_size, n, device=ref.device, dtype=ref.dtype)
        return self._mean_gradient(params, X, Y, True, chunk, rows)

    def _mean_gradient(self, params, X, Y, batched: bool, chunk: Optional[int], rows: int):
        N = X.shape[1] if batched else len(X)
        total = None
        for s in range(0, N, rows):
            if batched:
                xs, ys = X[:, s : s + rows], Y[:, s : s + rows]
                g = self._chunked(lambda p, x, y: self._batch_grad_each(p, x, y), params, xs, ys, chunk=chunk)
            else:
                xs, ys = X[s : s + rows], Y[s : s + rows]
                g = self._chunked(lambda p: self._batch_grad(p, xs, ys), params, chunk=chunk)
            w = ys.shape[-1] / N if batched else len(xs) / N
            total = {k: v * w for k, v in g.items()} if total is None else {k: total[k] + v * w for k, v in g.items()}
        return total

    def noise_batch(self, n: int, ref: torch.Tensor):
        """Draw the noise mini-batches of n trajectories: (n, M, …), or (M, …) when shared."""
        if self.shared_noise_batch:
            return self.data.sample(self.M, device=ref.device, dtype=ref.dtype)
        return self.data.sample(self.M, n, device=ref.device, dtype=ref.dtype)

    def per_sample_gradients(self, params: Dict[str, torch.Tensor], batch=None, traj_chunk: Optional[int] = None
                             ) -> Dict[str, torch.Tensor]:
        """Per-sample gradients of a mini-batch: {name: (n, M, *shape)}.

        Args:
            params: {name: (n, *shape)}.
            batch: (X, Y) from :meth:`noise_batch`; None draws a fresh one.
            traj_chunk: trajectories per batched call (the constructor's ``traj_chunk`` wins).
        """
        ref = next(iter(params.values()))
        self._refresh_consts(ref)
        X, Y = batch if batch is not None else self.noise_batch(ref.shape[0], ref)
        chunk = self.traj_chunk if self.traj_chunk is not None else traj_chunk
        if self.shared_noise_batch:
            return self._chunked(lambda p: self._per_sample(p, X, Y), params, chunk=chunk)
        return self._chunked(lambda p, X, Y: self._per_sample(p, X, Y), params, X, Y, chunk=chunk)

    def _chunked(self, fn, params, *batched, chunk: Optional[int] = None):
        n = next(iter(params.values())).shape[0]
        c = chunk
        with vmap_safe_attention():  # attention dropout drawn per sample under vmap
            if c is None or c >= n:
                return fn(params, *batched)
            outs = []
            for s in range(0, n, c):
                p = {k: v[s : s + c] for k, v in params.items()}
                outs.append(fn(p, *(b[s : s + c] for b in batched)))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def __call__(self, params: Dict[str, torch.Tensor]) -> GradientEstimate:
        return GradientEstimate(grad=self.expected_gradient(params), per_sample=self.per_sample_gradients(params))
